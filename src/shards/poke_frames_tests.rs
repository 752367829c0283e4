use super::*;
use crate::cvr::issue_spec as spec;
use crate::cvr::{Cvr, QueryRows, QuerySpec};
use crate::protocol::cookie::Version;
use crate::zql::value::Value;
use serde_json::Value as Json;

/// Rows made once and shared, as the shared queries hand them to every group.
struct Rows(FastMap<String, (RowKey, Rc<RowData>)>);

impl Rows {
    fn new() -> Self {
        Rows(FastMap::default())
    }

    fn set(&mut self, id: &str, title: &str) {
        let key = RowKey::new("issue", format!("{{\"id\":\"{id}\"}}"));
        let row = vec![Value::Text(id.into()), Value::Text(title.into())];
        self.0.insert(id.into(), (key, RowData::new(spec(), row)));
    }

    fn of(&self, ids: &[&str]) -> QueryRows {
        ids.iter()
            .map(|id| self.0[*id].clone())
            .collect::<FastMap<_, _>>()
    }
}

fn version(state: u64) -> Version {
    Version { state, config: 0 }
}

fn group(id: &str, rows: &Rows, ids: &[&str]) -> Cvr {
    let mut cvr = Cvr::new(id);
    let v1 = version(1);
    cvr.put_desired("c1", "q1", QuerySpec::Ast(serde_json::json!({})), None, v1);
    cvr.set_query_rows("q1", &rows.of(ids), v1);
    cvr.version = v1;
    cvr
}

/// The messages of frames (server frames are unmasked: a 2- or 4-byte header here).
fn messages(frames: &[Bytes]) -> Vec<Json> {
    frames
        .iter()
        .map(|f| {
            let header = if f[1] & 0x7f == 126 { 4 } else { 2 };
            let mut m: Json = serde_json::from_slice(&f[header..]).expect("json");
            if let Some(rows) = m[1]["rowsPatch"].as_array_mut() {
                rows.sort_by_key(|r| r.to_string());
            }
            m
        })
        .collect()
}

/// The poke as a group builds it alone (`PokeBuilder` over the whole record).
fn built(cvr: &Cvr, base: Version) -> Vec<Bytes> {
    let mut poke = PokeBuilder::new(&cvr.version.cookie(), Some(&base.cookie()));
    cvr.write_patches(Some(base), &mut poke);
    poke.finish(&cvr.version.cookie())
        .iter()
        .map(|m| text_frame(m.as_bytes()))
        .collect()
}

#[test]
fn groups_with_the_same_diff_share_one_part_and_each_poke_is_what_the_group_would_build() {
    let mut rows = Rows::new();
    for id in ["a", "b", "c", "d"] {
        rows.set(id, "old");
    }
    let mut g1 = group("g1", &rows, &["a", "b", "c"]);
    let mut g2 = group("g2", &rows, &["a", "b", "c"]);
    let mut g3 = group("g3", &rows, &["a", "b", "d"]);
    // One version: b edited, c leaves (a tombstone in g1 and g2), d edited.
    rows.set("b", "new");
    rows.set("d", "new");
    let v2 = version(2);
    for (cvr, ids) in [
        (&mut g1, ["a", "b"]),
        (&mut g2, ["a", "b"]),
        (&mut g3, ["b", "d"]),
    ] {
        cvr.set_query_rows("q1", &rows.of(&ids), v2);
        cvr.version = v2;
    }
    let mut cache = PokeFrames::default();
    let cookie = v2.cookie();
    let base = version(1).cookie();
    let mut poke = |cvr: &Cvr| {
        let patch = cvr.rows_only_patch(version(1)).expect("rows only");
        cache.frames(&cookie, &base, patch)
    };
    let (f1, f2, f3) = (poke(&g1), poke(&g2), poke(&g3));
    assert_eq!(cache.parts_reused, 1, "g2's part is g1's");
    for (frames, cvr) in [(&f1, &g1), (&f2, &g2), (&f3, &g3)] {
        assert_eq!(
            messages(frames),
            messages(&built(cvr, version(1))),
            "{}",
            cvr.id
        );
    }
    assert_eq!(f1.len(), 3);
    for i in 0..3 {
        assert_eq!(
            f1[i].as_ptr(),
            f2[i].as_ptr(),
            "frame {i} is the same bytes"
        );
    }
    assert_ne!(f1[1].as_ptr(), f3[1].as_ptr(), "another diff, another part");
    assert_eq!(f1[0].as_ptr(), f3[0].as_ptr(), "same base, same start");
    assert_eq!(f1[2].as_ptr(), f3[2].as_ptr(), "same cookie, same end");
}

#[test]
fn a_poke_with_query_entries_is_not_rows_only_and_another_cookie_empties_the_cache() {
    let mut rows = Rows::new();
    rows.set("a", "old");
    let mut g1 = group("g1", &rows, &["a"]);
    let v2 = version(2);
    g1.put_desired(
        "c1",
        "q2",
        QuerySpec::Ast(serde_json::json!({"t": 1})),
        None,
        v2,
    );
    g1.version = v2;
    assert!(g1.rows_only_patch(version(1)).is_none(), "a desired query");
    let mut cache = PokeFrames::default();
    let mut g2 = group("g2", &rows, &["a"]);
    rows.set("a", "new");
    g2.set_query_rows("q1", &rows.of(&["a"]), v2);
    g2.version = v2;
    let patch = || g2.rows_only_patch(version(1)).expect("rows only");
    let first = cache.frames("c1", "01", patch());
    let again = cache.frames("c1", "01", patch());
    assert_eq!(first.len(), 3, "a part with the edited row");
    assert_eq!(first[1].as_ptr(), again[1].as_ptr());
    let other = cache.frames("c2", "01", patch());
    assert_ne!(first[1].as_ptr(), other[1].as_ptr(), "built again for c2");
    assert_eq!(messages(&other)[2][1]["cookie"], "c2");
}

proptest::proptest! {
    /// Whatever the groups' diffs, each gets from the cache what it would build alone.
    #[test]
    fn shared_frames_equal_the_groups_own(
        groups in proptest::collection::vec(
            (proptest::collection::vec(0u8..6, 0..5), proptest::collection::vec(0u8..6, 0..5)),
            1..8,
        ),
        edited in proptest::collection::vec(0u8..6, 0..4),
    ) {
        let mut rows = Rows::new();
        for id in 0..6 {
            rows.set(&id.to_string(), "old");
        }
        let ids = |v: &[u8]| -> Vec<String> { v.iter().map(u8::to_string).collect() };
        let mut cvrs: Vec<Cvr> = groups
            .iter()
            .enumerate()
            .map(|(i, (before, _))| {
                let before = ids(before);
                let before: Vec<&str> = before.iter().map(String::as_str).collect();
                group(&format!("g{i}"), &rows, &before)
            })
            .collect();
        for id in &edited {
            rows.set(&id.to_string(), "new");
        }
        let v2 = version(2);
        for (cvr, (_, after)) in cvrs.iter_mut().zip(&groups) {
            let after = ids(after);
            let after: Vec<&str> = after.iter().map(String::as_str).collect();
            cvr.set_query_rows("q1", &rows.of(&after), v2);
            cvr.version = v2;
        }
        let mut cache = PokeFrames::default();
        for cvr in &cvrs {
            let patch = cvr.rows_only_patch(version(1)).expect("rows only");
            let frames = cache.frames(&v2.cookie(), &version(1).cookie(), patch);
            proptest::prop_assert_eq!(messages(&frames), messages(&built(cvr, version(1))));
        }
    }
}

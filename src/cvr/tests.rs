use super::*;
use crate::zql::schema::{ColumnKind, ColumnSpec};
use crate::zql::value::Value;

fn spec() -> Rc<TableSpec> {
    Rc::new(TableSpec {
        name: "issue".into(),
        columns: vec![
            ColumnSpec {
                name: "id".into(),
                kind: ColumnKind::String,
                pg_type_oid: 25,
            },
            ColumnSpec {
                name: "title".into(),
                kind: ColumnKind::String,
                pg_type_oid: 25,
            },
        ],
        primary_key: vec![0],
    })
}

fn rows(items: &[(&str, &str)]) -> QueryRows {
    items
        .iter()
        .map(|(id, title)| {
            (
                ("issue".to_string(), format!("{{\"id\":\"{id}\"}}")),
                (
                    spec(),
                    vec![Value::Text(id.to_string()), Value::Text(title.to_string())],
                ),
            )
        })
        .collect()
}

fn named() -> QuerySpec {
    QuerySpec::Named {
        name: "q".into(),
        args: vec![],
    }
}

/// The poke from `base` as parsed JSON parts merged: (desired, got, rows).
fn poke_json(cvr: &Cvr, base: Option<Version>) -> Vec<serde_json::Value> {
    let mut p = PokeBuilder::new("p", base.map(|b| b.cookie()).as_deref());
    cvr.write_patches(base, &mut p);
    p.finish(&cvr.version.cookie())
        .iter()
        .map(|m| serde_json::from_str(m).expect("json"))
        .collect()
}

fn row_ops(parts: &[serde_json::Value]) -> Vec<String> {
    let mut ops: Vec<String> = parts
        .iter()
        .filter(|m| m[0] == "pokePart")
        .flat_map(|m| m[1]["rowsPatch"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            format!(
                "{} {}",
                r["op"].as_str().unwrap_or(""),
                r.get("value")
                    .map(|v| v["id"].to_string())
                    .unwrap_or_else(|| r["id"]["id"].to_string())
            )
        })
        .collect();
    ops.sort();
    ops
}

#[test]
fn two_queries_share_a_row_until_both_drop_it() {
    let mut cvr = Cvr::new("g");
    let v1 = cvr.next_config_version();
    cvr.ensure_client("c1");
    assert!(cvr.put_desired("c1", "q1", named(), v1));
    assert!(cvr.put_desired("c1", "q2", named(), v1));
    cvr.version = v1;

    let v2 = cvr.next_data_version(100);
    assert!(cvr.set_query_rows("q1", rows(&[("a", "A"), ("b", "B")]), v2));
    assert!(cvr.set_query_rows("q2", rows(&[("b", "B")]), v2));
    cvr.version = v2;
    assert_eq!(
        row_ops(&poke_json(&cvr, Some(v1))),
        vec!["put \"a\"", "put \"b\""]
    );

    // q1 no longer reaches b: still referenced by q2, so no patch
    let v3 = cvr.next_data_version(101);
    assert!(!cvr.set_query_rows("q1", rows(&[("a", "A")]), v3));
    // a's title changes: a put
    assert!(cvr.set_query_rows("q1", rows(&[("a", "A2")]), v3));
    cvr.version = v3;
    assert_eq!(row_ops(&poke_json(&cvr, Some(v2))), vec!["put \"a\""]);

    // dropping q2 deletes b
    let v4 = cvr.next_config_version();
    assert!(cvr.remove_query("q2", v4));
    cvr.version = v4;
    let parts = poke_json(&cvr, Some(v3));
    assert_eq!(row_ops(&parts), vec!["del \"b\""]);
    assert_eq!(parts[1][1]["gotQueriesPatch"][0]["op"], "del");
}

#[test]
fn catch_up_from_any_cookie_equals_the_live_pokes() {
    let mut cvr = Cvr::new("g");
    let v1 = cvr.next_config_version();
    cvr.put_desired("c1", "q1", named(), v1);
    cvr.version = v1;
    let v2 = cvr.next_data_version(5);
    cvr.set_query_rows("q1", rows(&[("a", "A"), ("b", "B")]), v2);
    cvr.version = v2;
    let v3 = cvr.next_data_version(6);
    cvr.set_query_rows("q1", rows(&[("b", "B"), ("c", "C")]), v3);
    cvr.version = v3;

    // a client that has nothing gets exactly the live rows, no tombstones
    assert_eq!(
        row_ops(&poke_json(&cvr, None)),
        vec!["put \"b\"", "put \"c\""]
    );
    // a client at v2 gets the del of a and the put of c
    assert_eq!(
        row_ops(&poke_json(&cvr, Some(v2))),
        vec!["del \"a\"", "put \"c\""]
    );
    // a client at v3 gets nothing
    assert!(row_ops(&poke_json(&cvr, Some(v3))).is_empty());
}

#[test]
fn lmids_and_mutation_results_patch_only_changes() {
    let mut cvr = Cvr::new("g");
    let v1 = cvr.next_data_version(10);
    assert!(cvr.set_lmids([("c1".to_string(), 1)].into(), v1));
    assert!(!cvr.set_lmids([("c1".to_string(), 1)].into(), v1));
    assert!(cvr.set_mutation_results(
        [(("c1".to_string(), 1), "{\"error\":\"app\"}".to_string())].into(),
        v1
    ));
    cvr.version = v1;
    let parts = poke_json(&cvr, Some(Version::default()));
    assert_eq!(parts[1][1]["lastMutationIDChanges"]["c1"], 1);
    assert_eq!(
        parts[1][1]["mutationsPatch"][0]["mutation"]["result"]["error"],
        "app"
    );

    let v2 = cvr.next_data_version(11);
    assert!(cvr.set_mutation_results(BTreeMap::new(), v2));
    cvr.version = v2;
    let parts = poke_json(&cvr, Some(v1));
    assert_eq!(parts[1][1]["mutationsPatch"][0]["op"], "del");
    assert!(parts[1][1].get("lastMutationIDChanges").is_none());
}

#[test]
fn desired_echo_and_undesired() {
    let mut cvr = Cvr::new("g");
    let v1 = cvr.next_config_version();
    cvr.put_desired("c1", "q1", named(), v1);
    cvr.version = v1;
    assert!(!cvr.put_desired("c1", "q1", named(), cvr.next_config_version()));
    let parts = poke_json(&cvr, None);
    assert_eq!(parts[1][1]["desiredQueriesPatches"]["c1"][0]["hash"], "q1");
    let v2 = cvr.next_config_version();
    assert!(cvr.del_desired("c1", "q1", v2));
    assert_eq!(cvr.undesired_queries(), vec!["q1".to_string()]);
}

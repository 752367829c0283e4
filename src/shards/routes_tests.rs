use super::*;
use crate::zql::schema::{ColumnKind, ColumnSpec};
use crate::zql::value::Row;
use std::sync::Arc;

fn spec() -> Rc<TableSpec> {
    let col = |name: &str, kind| ColumnSpec {
        name: name.into(),
        kind,
        pg_type_oid: 25,
    };
    Rc::new(TableSpec {
        name: "issue".into(),
        columns: vec![
            col("id", ColumnKind::String),
            col("owner", ColumnKind::Number),
            col("status", ColumnKind::String),
        ],
        primary_key: vec![0],
    })
}

fn row(id: &str, owner: Value, status: &str) -> Row {
    vec![Value::Text(id.into()), owner, Value::Text(status.into())]
}

fn version(rows: Vec<(Option<Row>, Option<Row>)>) -> VersionReady {
    VersionReady {
        watermark: 1,
        committed_at: std::time::Instant::now(),
        tables: vec!["issue".into()],
        rows: Some(Arc::new(
            rows.into_iter()
                .map(|(old, new)| ChangedRow {
                    table: "issue".into(),
                    key: vec![old.as_ref().or(new.as_ref()).expect("a state")[0].clone()],
                    old,
                    new,
                })
                .collect(),
        )),
    }
}

fn keyed(column: &str, v: Value) -> Interest {
    Interest::Keyed {
        table: "issue".into(),
        column: column.into(),
        key: route_key(&v).expect("a key"),
    }
}

fn routes() -> Routes {
    let mut r = Routes::default();
    r.set("by-id", [keyed("id", Value::Text("i1".into()))].into());
    r.set("by-owner", [keyed("owner", Value::Int(7))].into());
    r.set("all", [Interest::Table("issue".into())].into());
    r.set("other", [Interest::Table("comment".into())].into());
    r
}

fn names(set: HashSet<Rc<str>>) -> BTreeSet<String> {
    set.into_iter().map(|s| s.to_string()).collect()
}

fn routed(r: &Routes, v: &VersionReady, usable: bool) -> BTreeSet<String> {
    names(r.groups_for(v, |_| Some(spec()), usable))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_change_reaches_the_groups_pinned_to_its_old_or_new_values() {
    let r = routes();
    let edit = version(vec![(
        Some(row("i2", Value::Int(3), "open")),
        Some(row("i2", Value::Int(3), "done")),
    )]);
    assert_eq!(routed(&r, &edit, true), set(&["all"]));
    let moved_in = version(vec![(
        Some(row("i2", Value::Int(3), "open")),
        Some(row("i2", Value::Float(7.0), "open")),
    )]);
    assert_eq!(routed(&r, &moved_in, true), set(&["all", "by-owner"]));
    let moved_out = version(vec![(Some(row("i1", Value::Int(7), "open")), None)]);
    assert_eq!(
        routed(&r, &moved_out, true),
        set(&["all", "by-id", "by-owner"])
    );
}

#[test]
fn unlisted_or_unusable_rows_reach_every_group_of_the_table() {
    let r = routes();
    let mut v = version(vec![(None, Some(row("i9", Value::Int(1), "x")))]);
    let every = set(&["all", "by-id", "by-owner"]);
    assert_eq!(routed(&r, &v, false), every);
    v.rows = None;
    assert_eq!(routed(&r, &v, true), every);
    // A row shorter than the spec (another layout): nothing can be told from its values.
    let short = version(vec![(None, Some(vec![Value::Text("i9".into())]))]);
    assert_eq!(routed(&r, &short, true), every);
}

#[test]
fn strictly_equal_values_share_a_key() {
    assert_eq!(route_key(&Value::Int(7)), route_key(&Value::Float(7.0)));
    assert_eq!(route_key(&Value::Float(-0.0)), route_key(&Value::Int(0)));
    assert_eq!(
        route_key(&Value::Json("\"a\"".into())),
        route_key(&Value::Text("a".into()))
    );
    assert_ne!(
        route_key(&Value::Text("7".into())),
        route_key(&Value::Int(7))
    );
    assert_ne!(route_key(&Value::Bool(true)), route_key(&Value::Int(1)));
    for never in [
        Value::Null,
        Value::Float(f64::NAN),
        Value::Json("{\"a\":1}".into()),
    ] {
        assert_eq!(route_key(&never), None, "{never:?} equals nothing");
    }
}

#[test]
fn replacing_and_removing_a_group_leaves_no_trace() {
    let mut r = routes();
    r.set("by-id", [keyed("id", Value::Text("i2".into()))].into());
    let v = version(vec![(None, Some(row("i1", Value::Int(1), "x")))]);
    assert_eq!(routed(&r, &v, true), set(&["all"]));
    for g in ["by-id", "by-owner", "all", "other"] {
        r.remove(g);
        assert!(r.interests(g).is_none());
    }
    assert!(r.tables.is_empty() && r.keyed.is_empty() && r.by_group.is_empty());
}

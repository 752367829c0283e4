//! Semantics of the fresh evaluator, over a real in-memory row source.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use serde_json::json;
use zcache::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, parse_ast, row_key_json, Evaluation, Node, Source, ZqlError};

/// Tables held in memory. `fetch` scans with SQL equality and returns rows in reverse
/// insertion order, so nothing can depend on the source's order. Every fetch is logged.
/// One logged fetch: table and constraints.
type Fetch = (String, Vec<(usize, Value)>);

#[derive(Default)]
struct MemSource {
    tables: HashMap<String, (Rc<TableSpec>, Vec<Row>)>,
    fetches: RefCell<Vec<Fetch>>,
}

impl MemSource {
    fn table_def(&mut self, name: &str, cols: &[(&str, ColumnKind)], pk: &[&str]) {
        let columns: Vec<ColumnSpec> = cols
            .iter()
            .map(|(n, k)| ColumnSpec {
                name: n.to_string(),
                kind: *k,
                pg_type_oid: 0,
            })
            .collect();
        let primary_key = pk
            .iter()
            .map(|p| columns.iter().position(|c| c.name == *p).unwrap())
            .collect();
        let spec = TableSpec {
            name: name.into(),
            columns,
            primary_key,
        };
        self.tables.insert(name.into(), (Rc::new(spec), Vec::new()));
    }

    fn insert(&mut self, table: &str, row: Row) {
        let t = self.tables.get_mut(table).unwrap();
        assert_eq!(row.len(), t.0.columns.len());
        t.1.push(row);
    }

    fn spec(&self, table: &str) -> Rc<TableSpec> {
        self.tables[table].0.clone()
    }
}

impl Source for MemSource {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.tables.get(name).map(|t| t.0.clone())
    }

    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError> {
        self.fetches.borrow_mut().push((table.into(), eq.to_vec()));
        let (_, rows) = self
            .tables
            .get(table)
            .ok_or_else(|| ZqlError::Source(format!("no table {table}")))?;
        Ok(rows
            .iter()
            .rev()
            .filter(|r| eq.iter().all(|(c, v)| r[*c].sql_eq(v)))
            .cloned()
            .collect())
    }
}

fn t(s: &str) -> Value {
    Value::Text(s.into())
}
fn i(n: i64) -> Value {
    Value::Int(n)
}
const N: Value = Value::Null;

use ColumnKind::{Number as Num, String as Str};

/// issue(id, title, status, created, owner_id, n); comment(id, issue_id, created, body);
/// label(id, name); issue_label(issue_id, label_id); user(id, name).
fn tracker() -> MemSource {
    let mut s = MemSource::default();
    s.table_def(
        "issue",
        &[
            ("id", Str),
            ("title", Str),
            ("status", Str),
            ("created", Num),
            ("owner_id", Str),
            ("assignee_id", Str),
        ],
        &["id"],
    );
    s.table_def(
        "comment",
        &[
            ("id", Str),
            ("issue_id", Str),
            ("created", Num),
            ("body", Str),
        ],
        &["id"],
    );
    s.table_def("label", &[("id", Str), ("name", Str)], &["id"]);
    s.table_def(
        "issue_label",
        &[("issue_id", Str), ("label_id", Str)],
        &["issue_id", "label_id"],
    );
    s.table_def("user", &[("id", Str), ("name", Str)], &["id"]);
    for (id, title, status, created, owner, assignee) in [
        ("i1", "Fix login", "open", i(30), t("u1"), t("u1")),
        ("i2", "Crash on save", "open", i(10), t("u2"), N),
        ("i3", "Docs", "closed", i(20), N, t("u2")),
        ("i4", "Slow query", "open", i(20), t("u1"), t("u2")),
    ] {
        s.insert(
            "issue",
            vec![t(id), t(title), t(status), created, owner, assignee],
        );
    }
    for (id, issue, created) in [
        ("c1", "i1", 1),
        ("c2", "i1", 2),
        ("c3", "i1", 3),
        ("c4", "i1", 4),
        ("c5", "i2", 5),
        ("c6", "i3", 6),
    ] {
        s.insert("comment", vec![t(id), t(issue), i(created), t("text")]);
    }
    for (id, name) in [("l1", "bug"), ("l2", "ui"), ("l3", "perf")] {
        s.insert("label", vec![t(id), t(name)]);
    }
    for (issue, label) in [("i1", "l1"), ("i1", "l2"), ("i2", "l1"), ("i4", "l3")] {
        s.insert("issue_label", vec![t(issue), t(label)]);
    }
    for (id, name) in [("u1", "Ann"), ("u2", "Bob")] {
        s.insert("user", vec![t(id), t(name)]);
    }
    s
}

fn eval(src: &MemSource, ast: serde_json::Value) -> Evaluation {
    evaluate(&parse_ast(&ast).unwrap(), src).unwrap()
}

fn eval_err(src: &MemSource, ast: serde_json::Value) -> ZqlError {
    evaluate(&parse_ast(&ast).unwrap(), src).unwrap_err()
}

/// The first column of each root node.
fn ids(e: &Evaluation) -> Vec<String> {
    e.nodes.iter().map(|n| text(&n.row[0])).collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

fn rel<'a>(n: &'a Node, alias: &str) -> &'a [Node] {
    &n.relationships
        .iter()
        .find(|(a, _)| a == alias)
        .unwrap_or_else(|| panic!("no relationship {alias}"))
        .1
}

fn count(e: &Evaluation, table: &str, key: &str) -> u32 {
    e.rows
        .get(&zcache::zql::RowKey::new(table, key.to_string()))
        .map_or(0, |r| r.1)
}

fn synced(e: &Evaluation, table: &str) -> Vec<String> {
    let mut v: Vec<String> = e
        .rows
        .keys()
        .filter(|k| k.table() == table)
        .map(|k| k.key().to_string())
        .collect();
    v.sort();
    v
}

fn simple(col: &str, op: &str, value: serde_json::Value) -> serde_json::Value {
    json!({"type":"simple","left":{"type":"column","name":col},"op":op,"right":{"type":"literal","value":value}})
}

// ---------------------------------------------------------------- AST

#[test]
fn parses_the_app_server_ast_and_round_trips() {
    let wire = json!({"table":"issue","where":{"type":"simple","left":{"type":"column","name":"status"},"right":{"type":"literal","value":"open"},"op":"="},"related":[{"correlation":{"parentField":["id"],"childField":["issue_id"]},"subquery":{"table":"comment","alias":"comments","orderBy":[["created","desc"]]},"system":"client"}],"limit":100,"orderBy":[["created","desc"]]});
    let ast = parse_ast(&wire).unwrap();
    assert_eq!(ast.limit, Some(100));
    assert_eq!(serde_json::to_value(&ast).unwrap(), wire);
}

#[test]
fn parse_ignores_unknown_fields_and_rejects_bad_shapes() {
    let ok = json!({"table":"issue","futureField":1,"where":{"type":"and","conditions":[],"extra":true}});
    assert!(parse_ast(&ok).is_ok());
    let bad_op = json!({"table":"issue","where":simple("status","~~",json!("x"))});
    assert!(matches!(parse_ast(&bad_op), Err(ZqlError::InvalidAst(_))));
    let bad_dir = json!({"table":"issue","orderBy":[["id","up"]]});
    assert!(matches!(parse_ast(&bad_dir), Err(ZqlError::InvalidAst(_))));
    let all_ops = [
        "=",
        "!=",
        "IS",
        "IS NOT",
        "<",
        ">",
        "<=",
        ">=",
        "LIKE",
        "NOT LIKE",
        "ILIKE",
        "NOT ILIKE",
        "IN",
        "NOT IN",
    ];
    for op in all_ops {
        let ast = json!({"table":"issue","where":simple("status",op,json!(["a", 1, true, null]))});
        let parsed = parse_ast(&ast).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), ast, "{op}");
    }
    let exists = json!({"table":"issue","where":{"type":"correlatedSubquery","op":"NOT EXISTS","flip":false,"scalar":true,
        "related":{"correlation":{"parentField":["id"],"childField":["issue_id"]},"subquery":{"table":"comment","alias":"zsubq_comments"},"system":"permissions","hidden":true}},
        "start":{"row":{"id":"i1"},"exclusive":true}});
    let parsed = parse_ast(&exists).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), exists);
}

#[test]
fn unknown_names_are_errors_naming_them() {
    let s = tracker();
    assert_eq!(
        eval_err(&s, json!({"table":"nope"})),
        ZqlError::UnknownTable("nope".into())
    );
    let unknown = |table: &str, column: &str| ZqlError::UnknownColumn {
        table: table.into(),
        column: column.into(),
    };
    assert_eq!(
        eval_err(
            &s,
            json!({"table":"issue","where":simple("bogus","=",json!(1))})
        ),
        unknown("issue", "bogus")
    );
    assert_eq!(
        eval_err(&s, json!({"table":"issue","orderBy":[["bogus","asc"]]})),
        unknown("issue", "bogus")
    );
    let bad_corr = json!({"table":"issue","related":[{"correlation":{"parentField":["id"],"childField":["nope"]},"subquery":{"table":"comment","alias":"c"}}]});
    assert_eq!(eval_err(&s, bad_corr), unknown("comment", "nope"));
    let bad_child_table = json!({"table":"issue","related":[{"correlation":{"parentField":["id"],"childField":["x"]},"subquery":{"table":"ghost","alias":"g"}}]});
    assert_eq!(
        eval_err(&s, bad_child_table),
        ZqlError::UnknownTable("ghost".into())
    );
    // Checked even where no row would reach the name.
    let mut empty = MemSource::default();
    empty.table_def("e", &[("id", Str)], &["id"]);
    assert_eq!(
        eval_err(
            &empty,
            json!({"table":"e","where":simple("x","=",json!(1))})
        ),
        unknown("e", "x")
    );
}

#[test]
fn invalid_constructs_are_errors() {
    let s = tracker();
    let static_param = json!({"table":"issue","where":{"type":"simple","op":"=","left":{"type":"column","name":"owner_id"},
        "right":{"type":"static","anchor":"authData","field":"sub"}}});
    assert!(matches!(
        eval_err(&s, static_param),
        ZqlError::InvalidAst(_)
    ));
    let in_scalar = json!({"table":"issue","where":simple("status","IN",json!("open"))});
    assert!(matches!(eval_err(&s, in_scalar), ZqlError::InvalidAst(_)));
    let like_trailing_escape =
        json!({"table":"issue","where":simple("title","LIKE",json!("Fix\\"))});
    assert!(matches!(
        eval_err(&s, like_trailing_escape),
        ZqlError::InvalidLikePattern { .. }
    ));
    let mismatched = json!({"table":"issue","related":[{"correlation":{"parentField":["id","title"],"childField":["issue_id"]},"subquery":{"table":"comment","alias":"c"}}]});
    assert!(matches!(eval_err(&s, mismatched), ZqlError::InvalidAst(_)));
}

// ---------------------------------------------------------------- ordering

#[test]
fn primary_key_breaks_ties_and_desc_reverses() {
    let s = tracker();
    let asc = eval(&s, json!({"table":"issue","orderBy":[["created","asc"]]}));
    assert_eq!(ids(&asc), ["i2", "i3", "i4", "i1"]);
    // desc on created only: the appended PK stays ascending.
    let desc = eval(&s, json!({"table":"issue","orderBy":[["created","desc"]]}));
    assert_eq!(ids(&desc), ["i1", "i3", "i4", "i2"]);
    let no_order = eval(&s, json!({"table":"issue"}));
    assert_eq!(ids(&no_order), ["i1", "i2", "i3", "i4"]);
    let pk_desc = eval(&s, json!({"table":"issue","orderBy":[["id","desc"]]}));
    assert_eq!(ids(&pk_desc), ["i4", "i3", "i2", "i1"]);
}

#[test]
fn composite_primary_key_completes_the_order() {
    let s = tracker();
    let e = eval(&s, json!({"table":"issue_label"}));
    let keys: Vec<String> = e
        .nodes
        .iter()
        .map(|n| format!("{}/{}", text(&n.row[0]), text(&n.row[1])))
        .collect();
    assert_eq!(keys, ["i1/l1", "i1/l2", "i2/l1", "i4/l3"]);
}

#[test]
fn nulls_first_ascending_and_last_descending() {
    let s = tracker();
    let asc = eval(&s, json!({"table":"issue","orderBy":[["owner_id","asc"]]}));
    assert_eq!(ids(&asc), ["i3", "i1", "i4", "i2"]);
    let desc = eval(&s, json!({"table":"issue","orderBy":[["owner_id","desc"]]}));
    assert_eq!(ids(&desc), ["i2", "i1", "i4", "i3"]);
}

#[test]
fn strings_order_by_utf8_bytes() {
    let mut s = MemSource::default();
    s.table_def("w", &[("id", Num), ("s", Str)], &["id"]);
    // UTF-16 order would put the emoji (surrogates D83D..) before U+FF5E.
    for (id, v) in [
        (1, "\u{1f600}"),
        (2, "\u{ff5e}"),
        (3, "Z"),
        (4, "a"),
        (5, "é"),
    ] {
        s.insert("w", vec![i(id), t(v)]);
    }
    let e = eval(&s, json!({"table":"w","orderBy":[["s","asc"]]}));
    let got: Vec<String> = e.nodes.iter().map(|n| text(&n.row[1])).collect();
    assert_eq!(got, ["Z", "a", "é", "\u{ff5e}", "\u{1f600}"]);
    // Range comparison uses the same order.
    let gt = eval(
        &s,
        json!({"table":"w","where":simple("s",">",json!("\u{ff5e}"))}),
    );
    assert_eq!(gt.nodes.len(), 1);
    assert_eq!(gt.nodes[0].row[1], t("\u{1f600}"));
}

#[test]
fn booleans_order_false_first() {
    let mut s = MemSource::default();
    s.table_def("b", &[("id", Num), ("f", ColumnKind::Boolean)], &["id"]);
    for (id, f) in [(1, Value::Bool(true)), (2, N), (3, Value::Bool(false))] {
        s.insert("b", vec![i(id), f]);
    }
    let e = eval(&s, json!({"table":"b","orderBy":[["f","asc"]]}));
    let got: Vec<Value> = e.nodes.iter().map(|n| n.row[0].clone()).collect();
    assert_eq!(got, [i(2), i(3), i(1)]);
    let e = eval(&s, json!({"table":"b","where":simple("f","=",json!(true))}));
    assert_eq!(e.nodes.len(), 1);
    assert_eq!(e.nodes[0].row[0], i(1));
}

#[test]
fn start_exclusive_and_inclusive() {
    let s = tracker();
    // Order: i2(10) i3(20) i4(20) i1(30)
    let q = |row: serde_json::Value, exclusive: bool| json!({"table":"issue","orderBy":[["created","asc"]],"start":{"row":row,"exclusive":exclusive}});
    let at = eval(&s, q(json!({"id":"i3","created":20}), false));
    assert_eq!(ids(&at), ["i3", "i4", "i1"]);
    let after = eval(&s, q(json!({"id":"i3","created":20}), true));
    assert_eq!(ids(&after), ["i4", "i1"]);
    // A cursor that is not a row: between rows, exclusivity does not matter.
    let between = eval(&s, q(json!({"id":"i35","created":20}), true));
    assert_eq!(ids(&between), ["i4", "i1"]);
    // Missing PK in the cursor reads as null, which sorts first within created=20.
    let no_pk = eval(&s, q(json!({"created":20}), true));
    assert_eq!(ids(&no_pk), ["i3", "i4", "i1"]);
    // Desc: "after" means smaller.
    let desc = eval(
        &s,
        json!({"table":"issue","orderBy":[["created","desc"]],"start":{"row":{"id":"i3","created":20},"exclusive":true},"limit":1}),
    );
    assert_eq!(ids(&desc), ["i4"]);
}

#[test]
fn start_with_null_cursor_values() {
    let s = tracker();
    // owner asc: i3(null) i1(u1) i4(u1) i2(u2)
    let e = eval(
        &s,
        json!({"table":"issue","orderBy":[["owner_id","asc"]],"start":{"row":{"id":"i3","owner_id":null},"exclusive":true}}),
    );
    assert_eq!(ids(&e), ["i1", "i4", "i2"]);
    // owner desc: i2 i1 i4 i3(null last)
    let e = eval(
        &s,
        json!({"table":"issue","orderBy":[["owner_id","desc"]],"start":{"row":{"id":"i4","owner_id":"u1"},"exclusive":true}}),
    );
    assert_eq!(ids(&e), ["i3"]);
}

#[test]
fn limit_at_root() {
    let s = tracker();
    let e = eval(
        &s,
        json!({"table":"issue","orderBy":[["created","desc"]],"limit":2}),
    );
    assert_eq!(ids(&e), ["i1", "i3"]);
    assert_eq!(synced(&e, "issue"), [r#"{"id":"i1"}"#, r#"{"id":"i3"}"#]);
    let zero = eval(&s, json!({"table":"issue","limit":0}));
    assert!(zero.nodes.is_empty() && zero.rows.is_empty());
}

// ---------------------------------------------------------------- relationships

fn comments_rel(limit: Option<u64>) -> serde_json::Value {
    let mut sq = json!({"table":"comment","alias":"comments","orderBy":[["created","desc"]]});
    if let Some(l) = limit {
        sq["limit"] = json!(l);
    }
    json!({"correlation":{"parentField":["id"],"childField":["issue_id"]},"subquery":sq,"system":"client"})
}

#[test]
fn related_limit_applies_per_parent() {
    let s = tracker();
    let e = eval(
        &s,
        json!({"table":"issue","related":[comments_rel(Some(2))]}),
    );
    let per_issue: Vec<Vec<String>> = e
        .nodes
        .iter()
        .map(|n| rel(n, "comments").iter().map(|c| text(&c.row[0])).collect())
        .collect();
    assert_eq!(
        per_issue,
        [vec!["c4", "c3"], vec!["c5"], vec!["c6"], Vec::<&str>::new()]
    );
    assert_eq!(
        synced(&e, "comment"),
        [
            r#"{"id":"c3"}"#,
            r#"{"id":"c4"}"#,
            r#"{"id":"c5"}"#,
            r#"{"id":"c6"}"#
        ]
    );
}

#[test]
fn related_lookups_are_pushed_down_as_constraints() {
    let s = tracker();
    let e = eval(
        &s,
        json!({"table":"issue","where":{"type":"and","conditions":[simple("status","=",json!("open")),simple("created",">",json!(0))]},
            "related":[comments_rel(None)]}),
    );
    assert_eq!(ids(&e), ["i1", "i2", "i4"]);
    let fetches = s.fetches.borrow();
    // One root fetch constrained by status, then one constrained fetch per parent.
    assert_eq!(fetches.len(), 4);
    assert_eq!(fetches[0], ("issue".to_string(), vec![(2, t("open"))]));
    for (f, issue) in fetches[1..].iter().zip(["i1", "i2", "i4"]) {
        assert_eq!(*f, ("comment".to_string(), vec![(1, t(issue))]));
    }
}

#[test]
fn null_correlation_values_match_nothing() {
    let mut s = tracker();
    s.insert("user", vec![N, t("ghost")]); // a user row with a null id
    let e = eval(
        &s,
        json!({"table":"issue","related":[{"correlation":{"parentField":["owner_id"],"childField":["id"]},"subquery":{"table":"user","alias":"owner"}}]}),
    );
    let i3 = e.nodes.iter().find(|n| n.row[0] == t("i3")).unwrap();
    assert!(rel(i3, "owner").is_empty());
    let fetches = s.fetches.borrow();
    assert_eq!(fetches.iter().filter(|f| f.0 == "user").count(), 3);
}

#[test]
fn multi_column_correlation() {
    let mut s = MemSource::default();
    s.table_def("a", &[("x", Num), ("y", Num)], &["x", "y"]);
    s.table_def("b", &[("id", Num), ("x", Num), ("y", Num)], &["id"]);
    for (x, y) in [(1, 1), (1, 2), (2, 1)] {
        s.insert("a", vec![i(x), i(y)]);
    }
    for (id, x, y) in [(1, 1, 1), (2, 1, 2), (3, 1, 2), (4, 2, 2)] {
        s.insert("b", vec![i(id), i(x), i(y)]);
    }
    let e = eval(
        &s,
        json!({"table":"a","related":[{"correlation":{"parentField":["x","y"],"childField":["x","y"]},"subquery":{"table":"b","alias":"bs"}}]}),
    );
    let got: Vec<Vec<Value>> = e
        .nodes
        .iter()
        .map(|n| rel(n, "bs").iter().map(|c| c.row[0].clone()).collect())
        .collect();
    assert_eq!(got, [vec![i(1)], vec![i(2), i(3)], vec![]]);
}

#[test]
fn row_counts_are_path_multiplicities() {
    let s = tracker();
    let user = |alias: &str, field: &str| json!({"correlation":{"parentField":[field],"childField":["id"]},"subquery":{"table":"user","alias":alias}});
    let e = eval(
        &s,
        json!({"table":"issue","where":simple("id","=",json!("i1")),"related":[user("owner","owner_id"),user("assignee","assignee_id")]}),
    );
    assert_eq!(count(&e, "user", r#"{"id":"u1"}"#), 2);
    assert_eq!(count(&e, "issue", r#"{"id":"i1"}"#), 1);
    let (row, _) = &e.rows[&zcache::zql::RowKey::new("user", r#"{"id":"u1"}"#.to_string())];
    assert_eq!(row, &vec![t("u1"), t("Ann")]);
}

#[test]
fn nested_related_three_levels() {
    let s = tracker();
    let e = eval(
        &s,
        json!({"table":"user","where":simple("id","=",json!("u2")),"related":[{
            "correlation":{"parentField":["id"],"childField":["owner_id"]},
            "subquery":{"table":"issue","alias":"issues","related":[comments_rel(Some(1))]}}]}),
    );
    let issues = rel(&e.nodes[0], "issues");
    assert_eq!(issues.len(), 1);
    let comments = rel(&issues[0], "comments");
    assert_eq!(comments[0].row[0], t("c5"));
    assert_eq!(e.rows.len(), 3);
}

#[test]
fn duplicate_related_aliases_last_wins() {
    let s = tracker();
    let e = eval(
        &s,
        json!({"table":"issue","where":simple("id","=",json!("i1")),"related":[comments_rel(Some(1)), comments_rel(Some(3))]}),
    );
    assert_eq!(e.nodes[0].relationships.len(), 1);
    assert_eq!(rel(&e.nodes[0], "comments").len(), 3);
    assert_eq!(synced(&e, "comment").len(), 3);
}

fn labels_junction() -> serde_json::Value {
    json!({"correlation":{"parentField":["id"],"childField":["issue_id"]},"hidden":true,
        "subquery":{"table":"issue_label","alias":"labels","related":[{
            "correlation":{"parentField":["label_id"],"childField":["id"]},
            "subquery":{"table":"label","alias":"labels","orderBy":[["name","asc"]]}}]}})
}

#[test]
fn junction_rows_are_synced_and_hidden_from_the_view() {
    let s = tracker();
    let e = eval(&s, json!({"table":"issue","related":[labels_junction()]}));
    let names: Vec<Vec<String>> = e
        .nodes
        .iter()
        .map(|n| rel(n, "labels").iter().map(|l| text(&l.row[1])).collect())
        .collect();
    // Lifted labels are in the label subquery's order (name asc), not the junction's.
    assert_eq!(
        names,
        [vec!["bug", "ui"], vec!["bug"], vec![], vec!["perf"]]
    );
    assert_eq!(synced(&e, "issue_label").len(), 4);
    assert_eq!(
        count(&e, "issue_label", r#"{"issue_id":"i1","label_id":"l2"}"#),
        1
    );
    // l1 hangs under two issues: two paths.
    assert_eq!(count(&e, "label", r#"{"id":"l1"}"#), 2);
    assert_eq!(count(&e, "label", r#"{"id":"l3"}"#), 1);
}

// ---------------------------------------------------------------- EXISTS

fn exists(op: &str, sub: serde_json::Value) -> serde_json::Value {
    json!({"type":"correlatedSubquery","op":op,"related":{
        "correlation":{"parentField":["id"],"childField":["issue_id"]},"subquery":sub,"system":"client"}})
}

#[test]
fn exists_and_not_exists() {
    let s = tracker();
    let sub = json!({"table":"comment","alias":"zsubq_comments"});
    let e = eval(
        &s,
        json!({"table":"issue","where":exists("EXISTS", sub.clone())}),
    );
    assert_eq!(ids(&e), ["i1", "i2", "i3"]);
    // EXISTS rows are synced, capped at 3 per parent, but not in the view.
    assert!(e.nodes.iter().all(|n| n.relationships.is_empty()));
    assert_eq!(
        synced(&e, "comment"),
        [
            r#"{"id":"c1"}"#,
            r#"{"id":"c2"}"#,
            r#"{"id":"c3"}"#,
            r#"{"id":"c5"}"#,
            r#"{"id":"c6"}"#
        ]
    );
    let e = eval(
        &s,
        json!({"table":"issue","where":exists("NOT EXISTS", sub)}),
    );
    assert_eq!(ids(&e), ["i4"]);
    assert!(synced(&e, "comment").is_empty());
}

#[test]
fn exists_subquery_has_its_own_where() {
    let s = tracker();
    let sub = json!({"table":"comment","alias":"zsubq_c","where":simple("created",">=",json!(5))});
    let e = eval(&s, json!({"table":"issue","where":exists("EXISTS", sub)}));
    assert_eq!(ids(&e), ["i2", "i3"]);
    let sub = json!({"table":"comment","alias":"zsubq_c","where":simple("created",">=",json!(6))});
    let e = eval(
        &s,
        json!({"table":"issue","where":exists("NOT EXISTS", sub)}),
    );
    assert_eq!(ids(&e), ["i1", "i2", "i4"]);
}

#[test]
fn exists_with_limit_zero_is_constant() {
    let s = tracker();
    let sub = json!({"table":"comment","alias":"zsubq_c","limit":0});
    let e = eval(
        &s,
        json!({"table":"issue","where":exists("EXISTS", sub.clone())}),
    );
    assert!(e.nodes.is_empty());
    let e = eval(
        &s,
        json!({"table":"issue","where":exists("NOT EXISTS", sub)}),
    );
    assert_eq!(ids(&e), ["i1", "i2", "i3", "i4"]);
    assert!(synced(&e, "comment").is_empty());
}

#[test]
fn exists_in_or_syncs_rows_of_every_branch() {
    let s = tracker();
    let sub = json!({"table":"comment","alias":"zsubq_c","where":simple("created","<",json!(3))});
    let e = eval(
        &s,
        json!({"table":"issue","where":{"type":"or","conditions":[simple("status","=",json!("closed")), exists("EXISTS", sub)]}}),
    );
    assert_eq!(ids(&e), ["i1", "i3"]);
    // i1 passed through EXISTS; i3 through status, and its (empty) subquery is still walked.
    assert_eq!(synced(&e, "comment"), [r#"{"id":"c1"}"#, r#"{"id":"c2"}"#]);
    // Nothing pushed down from an OR.
    assert_eq!(s.fetches.borrow()[0], ("issue".to_string(), vec![]));
}

#[test]
fn exists_inside_and_inside_or_and_nested() {
    let s = tracker();
    let has_label = |label: &str| {
        json!({"type":"correlatedSubquery","op":"EXISTS","related":{
            "correlation":{"parentField":["id"],"childField":["issue_id"]},
            "subquery":{"table":"issue_label","alias":"zsubq_il","where":{"type":"correlatedSubquery","op":"EXISTS","related":{
                "correlation":{"parentField":["label_id"],"childField":["id"]},
                "subquery":{"table":"label","alias":"zsubq_l","where":simple("name","=",json!(label))}}}}}})
    };
    let e = eval(
        &s,
        json!({"table":"issue","where":{"type":"or","conditions":[
            {"type":"and","conditions":[simple("status","=",json!("open")), has_label("ui")]},
            has_label("perf")]}}),
    );
    assert_eq!(ids(&e), ["i1", "i4"]);
    assert_eq!(synced(&e, "label"), [r#"{"id":"l2"}"#, r#"{"id":"l3"}"#]);
}

#[test]
fn permission_subquery_rows_are_not_synced() {
    let s = tracker();
    let cond = json!({"type":"correlatedSubquery","op":"EXISTS","related":{
        "correlation":{"parentField":["owner_id"],"childField":["id"]},
        "subquery":{"table":"user","alias":"zsubq_owner"},"system":"permissions"}});
    let e = eval(&s, json!({"table":"issue","where":cond}));
    assert_eq!(ids(&e), ["i1", "i2", "i4"]);
    assert!(synced(&e, "user").is_empty());
}

#[test]
fn flipped_exists_syncs_every_matching_child() {
    let s = tracker();
    let mut cond = exists("EXISTS", json!({"table":"comment","alias":"zsubq_c"}));
    cond["flip"] = json!(true);
    let e = eval(&s, json!({"table":"issue","where":cond}));
    assert_eq!(ids(&e), ["i1", "i2", "i3"]);
    assert_eq!(synced(&e, "comment").len(), 6);
}

#[test]
fn exists_children_are_fetched_once_per_parent_key() {
    let s = tracker();
    let cond = json!({"type":"correlatedSubquery","op":"EXISTS","related":{
        "correlation":{"parentField":["owner_id"],"childField":["id"]},
        "subquery":{"table":"user","alias":"zsubq_owner"}}});
    let e = eval(&s, json!({"table":"issue","where":cond}));
    assert_eq!(ids(&e), ["i1", "i2", "i4"]);
    // i1 and i4 share owner u1; i3's owner is null (no fetch).
    assert_eq!(
        s.fetches.borrow().iter().filter(|f| f.0 == "user").count(),
        2
    );
    assert_eq!(count(&e, "user", r#"{"id":"u1"}"#), 2);
}

// ---------------------------------------------------------------- simple operators

/// A table `v(id, n, s)` with n in {1, 2, 3, null} and matching strings.
fn values() -> MemSource {
    let mut s = MemSource::default();
    s.table_def("v", &[("id", Num), ("n", Num), ("s", Str)], &["id"]);
    for (id, n, st) in [
        (1, i(1), t("apple")),
        (2, i(2), t("Banana")),
        (3, Value::Float(3.5), t("50% off")),
        (4, N, N),
        (5, i(2), t("a_b\nc")),
    ] {
        s.insert("v", vec![i(id), n, st]);
    }
    s
}

fn matching(s: &MemSource, cond: serde_json::Value) -> Vec<i64> {
    let e = eval(s, json!({"table":"v","where":cond}));
    e.nodes
        .iter()
        .map(|n| match n.row[0] {
            Value::Int(x) => x,
            _ => unreachable!(),
        })
        .collect()
}

#[test]
fn comparison_operators_with_null_semantics() {
    let s = values();
    assert_eq!(matching(&s, simple("n", "=", json!(2))), [2, 5]);
    assert_eq!(matching(&s, simple("n", "=", json!(3.5))), [3]);
    assert_eq!(matching(&s, simple("n", "!=", json!(2))), [1, 3]);
    assert_eq!(matching(&s, simple("n", "<", json!(2))), [1]);
    assert_eq!(matching(&s, simple("n", "<=", json!(2))), [1, 2, 5]);
    assert_eq!(matching(&s, simple("n", ">", json!(2))), [3]);
    assert_eq!(matching(&s, simple("n", ">=", json!(2))), [2, 3, 5]);
    // Null on the right: always false, even for != and with a null row value.
    for op in ["=", "!=", "<", ">", "<=", ">="] {
        assert!(
            matching(&s, simple("n", op, json!(null))).is_empty(),
            "{op}"
        );
    }
    assert_eq!(matching(&s, simple("n", "IS", json!(null))), [4]);
    assert_eq!(
        matching(&s, simple("n", "IS NOT", json!(null))),
        [1, 2, 3, 5]
    );
    assert_eq!(matching(&s, simple("n", "IS", json!(2))), [2, 5]);
    assert_eq!(matching(&s, simple("n", "IS NOT", json!(2))), [1, 3, 4]);
    // Strict equality: no coercion between strings and numbers.
    assert!(matching(&s, simple("n", "=", json!("2"))).is_empty());
}

#[test]
fn like_and_ilike() {
    let s = values();
    assert_eq!(matching(&s, simple("s", "LIKE", json!("a%"))), [1, 5]);
    assert_eq!(
        matching(&s, simple("s", "LIKE", json!("A%"))),
        Vec::<i64>::new()
    );
    assert_eq!(matching(&s, simple("s", "ILIKE", json!("A%"))), [1, 5]);
    assert_eq!(matching(&s, simple("s", "ILIKE", json!("BANANA"))), [2]);
    assert_eq!(matching(&s, simple("s", "LIKE", json!("%\\%%"))), [3]);
    assert_eq!(matching(&s, simple("s", "LIKE", json!("a\\_b%"))), [5]);
    assert_eq!(matching(&s, simple("s", "LIKE", json!("a_b_c"))), [5]);
    assert_eq!(matching(&s, simple("s", "LIKE", json!("_____"))), [1, 5]);
    // NOT LIKE is still false on null.
    assert_eq!(matching(&s, simple("s", "NOT LIKE", json!("a%"))), [2, 3]);
    assert_eq!(matching(&s, simple("s", "NOT ILIKE", json!("a%"))), [2, 3]);
}

#[test]
fn in_and_not_in() {
    let s = values();
    assert_eq!(matching(&s, simple("n", "IN", json!([1, 3.5]))), [1, 3]);
    assert_eq!(matching(&s, simple("n", "NOT IN", json!([1, 3.5]))), [2, 5]);
    // A null in the list never matches a null value, and NOT IN stays true for others.
    assert_eq!(matching(&s, simple("n", "IN", json!([2, null]))), [2, 5]);
    assert_eq!(
        matching(&s, simple("n", "NOT IN", json!([2, null]))),
        [1, 3]
    );
    assert!(matching(&s, simple("n", "IN", json!([]))).is_empty());
    assert_eq!(matching(&s, simple("n", "NOT IN", json!([]))), [1, 2, 3, 5]);
    assert_eq!(matching(&s, simple("s", "IN", json!(["apple", "x"]))), [1]);
}

#[test]
fn literal_on_the_left_is_a_constant() {
    let s = values();
    let lit = |l: serde_json::Value, op: &str, r: serde_json::Value| json!({"type":"simple","op":op,"left":{"type":"literal","value":l},"right":{"type":"literal","value":r}});
    assert_eq!(matching(&s, lit(json!(1), "=", json!(1))).len(), 5);
    assert!(matching(&s, lit(json!(1), "=", json!(2))).is_empty());
    assert!(matching(&s, lit(json!(null), "!=", json!(2))).is_empty());
    assert_eq!(matching(&s, lit(json!(null), "IS", json!(null))).len(), 5);
    assert_eq!(
        matching(&s, lit(json!("b"), "IN", json!(["a", "b"]))).len(),
        5
    );
}

#[test]
fn and_or_nesting_and_empty_connectives() {
    let s = values();
    let and = |c: Vec<serde_json::Value>| json!({"type":"and","conditions":c});
    let or = |c: Vec<serde_json::Value>| json!({"type":"or","conditions":c});
    assert_eq!(
        matching(
            &s,
            or(vec![
                and(vec![
                    simple("n", "=", json!(2)),
                    simple("s", "LIKE", json!("B%"))
                ]),
                simple("id", "=", json!(1))
            ])
        ),
        [1, 2]
    );
    assert_eq!(matching(&s, and(vec![])).len(), 5);
    assert!(matching(&s, or(vec![])).is_empty());
}

#[test]
fn row_key_json_lists_primary_key_columns_in_key_order() {
    let s = tracker();
    let spec = s.spec("issue_label");
    assert_eq!(
        row_key_json(&spec, &vec![t("i\"1"), t("l1")]),
        r#"{"issue_id":"i\"1","label_id":"l1"}"#
    );
    let mut n = MemSource::default();
    n.table_def("k", &[("v", Str), ("b", Num), ("a", Num)], &["a", "b"]);
    assert_eq!(
        row_key_json(&n.spec("k"), &vec![t("x"), i(2), Value::Float(1.5)]),
        r#"{"a":1.5,"b":2}"#
    );
}

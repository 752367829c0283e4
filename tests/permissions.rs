//! Row-level permissions over a real replica (`sqlite::Replica` written, `ReplicaReader` read):
//!
//! - a differential proptest: a query transformed by `authorize_read` and evaluated by the
//!   engine returns exactly the rows (in order, within the limit, with the same related rows)
//!   that SQLite returns for the same query with the select rules inlined, bound to the same
//!   authData;
//! - the write authorizer's allow / deny / error cases of legacy-features.md 2.6 and 3.5;
//! - `load` of the replicated `{app}.permissions` row.

use std::path::Path;

use proptest::prelude::*;
use rusqlite::Connection;
use serde_json::{json, Value as Json};
use zcache::permissions::{
    authorize_read, authorize_write, load, parse, Permissions, PermissionsError, WriteError,
    MUTATION_OPS_MAX,
};
use zcache::protocol::crud::CrudOp;
use zcache::sqlite::{Replica, ReplicaReader};
use zcache::zql::ast::Ast;
use zcache::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, Evaluation};

fn spec(name: &str, cols: &[(&str, ColumnKind)], pk: Vec<usize>) -> TableSpec {
    TableSpec {
        name: name.into(),
        columns: cols
            .iter()
            .map(|(n, k)| ColumnSpec {
                name: n.to_string(),
                kind: *k,
                pg_type_oid: match k {
                    ColumnKind::Number => 20,
                    ColumnKind::Boolean => 16,
                    ColumnKind::Json => 3802,
                    _ => 25,
                },
            })
            .collect(),
        primary_key: pk,
    }
}

/// Writes the tables and rows into a new replica at `path` and opens a reader on it, inside a
/// snapshot.
fn replica(path: &Path, tables: &[(TableSpec, Vec<Row>)]) -> ReplicaReader {
    let mut w = Replica::open(path).expect("open replica");
    for (spec, _) in tables {
        w.create_table(spec).expect("create table");
    }
    w.begin().expect("begin");
    for (spec, rows) in tables {
        for row in rows {
            w.upsert(&spec.name, row).expect("upsert");
        }
    }
    w.commit(1).expect("commit");
    let r = ReplicaReader::open(path).expect("reader");
    r.begin_snapshot().expect("snapshot");
    r
}

// ================================================================ read: differential proptest

/// t(id, a, b, c): a and c small ints, b short text. u(id, k, v): joined on u.k = t.a.
#[derive(Debug, Clone)]
struct TRow {
    a: Option<i64>,
    b: Option<String>,
    c: Option<i64>,
}

#[derive(Debug, Clone)]
struct URow {
    k: Option<i64>,
    v: Option<i64>,
}

fn t_row() -> impl Strategy<Value = TRow> {
    (
        prop::option::weighted(0.85, -1i64..3),
        prop::option::weighted(0.8, prop::sample::select(&["x", "y", "é"][..])),
        prop::option::weighted(0.8, 0i64..3),
    )
        .prop_map(|(a, b, c)| TRow {
            a,
            b: b.map(str::to_owned),
            c,
        })
}

fn u_row() -> impl Strategy<Value = URow> {
    (
        prop::option::weighted(0.85, -1i64..3),
        prop::option::weighted(0.85, 0i64..3),
    )
        .prop_map(|(k, v)| URow { k, v })
}

/// authData: `sub` and `meta.level` ints, `name` text; None = the key is absent.
#[derive(Debug, Clone)]
struct Auth {
    sub: Option<i64>,
    level: Option<i64>,
    name: Option<String>,
}

fn auth() -> impl Strategy<Value = Option<Auth>> {
    prop::option::weighted(
        0.85,
        (
            prop::option::weighted(0.8, -1i64..3),
            prop::option::weighted(0.7, 0i64..3),
            prop::option::weighted(0.7, prop::sample::select(&["x", "y"][..])),
        )
            .prop_map(|(sub, level, name)| Auth {
                sub,
                level,
                name: name.map(str::to_owned),
            }),
    )
}

impl Auth {
    fn json(&self) -> Json {
        let mut m = serde_json::Map::new();
        if let Some(s) = self.sub {
            m.insert("sub".into(), json!(s));
        }
        if let Some(l) = self.level {
            m.insert("meta".into(), json!({"level": l}));
        } else {
            m.insert("meta".into(), json!({}));
        }
        if let Some(n) = &self.name {
            m.insert("name".into(), json!(n));
        }
        Json::Object(m)
    }
}

/// The right side of a rule's comparison.
#[derive(Debug, Clone)]
enum Rhs {
    Int(Option<i64>),
    Text(Option<String>),
    /// authData.sub (int)
    Sub,
    /// authData.meta.level (int, a path)
    Level,
    /// authData.name (text)
    Name,
    /// authData.nope (always missing)
    Missing,
}

const CMP_OPS: &[&str] = &["=", "!=", "<", ">", "<=", ">=", "IS", "IS NOT"];

#[derive(Debug, Clone)]
enum Cond {
    Cmp {
        col: &'static str,
        op: &'static str,
        rhs: Rhs,
    },
    /// EXISTS on u (u.k = t.a) with `u.v op rhs`; as a rule, a `system: permissions` subquery.
    Exists {
        op: &'static str,
        rhs: Rhs,
    },
    And(Vec<Cond>),
    Or(Vec<Cond>),
}

/// A comparison on an int column of `cols` or on text column `text_col`.
fn cmp(
    int_cols: &'static [&'static str],
    text_col: Option<&'static str>,
    with_auth: bool,
) -> BoxedStrategy<Cond> {
    let int_rhs = if with_auth {
        prop_oneof![
            prop::option::weighted(0.9, -1i64..3).prop_map(Rhs::Int),
            Just(Rhs::Sub),
            Just(Rhs::Level),
            Just(Rhs::Missing),
        ]
        .boxed()
    } else {
        prop::option::weighted(0.9, -1i64..3)
            .prop_map(Rhs::Int)
            .boxed()
    };
    let ints = (
        prop::sample::select(int_cols),
        prop::sample::select(CMP_OPS),
        int_rhs,
    )
        .prop_map(|(col, op, rhs)| Cond::Cmp { col, op, rhs });
    match text_col {
        None => ints.boxed(),
        Some(col) => {
            let text_rhs = if with_auth {
                prop_oneof![
                    prop::option::weighted(0.9, prop::sample::select(&["x", "y"][..]))
                        .prop_map(|t| Rhs::Text(t.map(str::to_owned))),
                    Just(Rhs::Name),
                ]
                .boxed()
            } else {
                prop::option::weighted(0.9, prop::sample::select(&["x", "y"][..]))
                    .prop_map(|t| Rhs::Text(t.map(str::to_owned)))
                    .boxed()
            };
            let texts = (prop::sample::select(CMP_OPS), text_rhs)
                .prop_map(move |(op, rhs)| Cond::Cmp { col, op, rhs });
            prop_oneof![3 => ints, 1 => texts].boxed()
        }
    }
}

fn tree(leaf: BoxedStrategy<Cond>) -> BoxedStrategy<Cond> {
    leaf.prop_recursive(3, 10, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Cond::And),
            prop::collection::vec(inner, 0..3).prop_map(Cond::Or),
        ]
    })
    .boxed()
}

/// Conditions of t's select rules: comparisons with literals and authData, EXISTS on u.
fn t_rule() -> BoxedStrategy<Cond> {
    let exists = (
        prop::sample::select(CMP_OPS),
        prop_oneof![
            prop::option::weighted(0.9, 0i64..3).prop_map(Rhs::Int),
            Just(Rhs::Sub),
            Just(Rhs::Level),
        ],
    )
        .prop_map(|(op, rhs)| Cond::Exists { op, rhs });
    tree(prop_oneof![3 => cmp(&["a", "c", "id"], Some("b"), true), 1 => exists].boxed())
}

fn u_rule() -> BoxedStrategy<Cond> {
    tree(cmp(&["k", "v", "id"], None, true))
}

/// A table's select policy: None = no rules (deny all); an empty vec = `NOBODY_CAN`.
type Rules = Option<Vec<Cond>>;

fn rules(rule: BoxedStrategy<Cond>) -> impl Strategy<Value = Rules> {
    prop::option::weighted(0.9, prop::collection::vec(rule, 0..3))
}

#[derive(Debug, Clone)]
struct Query {
    filter: Option<Cond>,
    /// The user's own EXISTS on u (with `u.v op literal`), which gets u's rules.
    exists: Option<(&'static str, i64)>,
    order: Option<(&'static str, bool)>,
    limit: Option<u64>,
    related: bool,
}

fn query() -> impl Strategy<Value = Query> {
    (
        prop::option::weighted(0.6, tree(cmp(&["a", "c", "id"], Some("b"), false))),
        prop::option::weighted(0.3, (prop::sample::select(&["=", "<", ">="][..]), 0i64..3)),
        prop::option::of((prop::sample::select(&["a", "b", "c"][..]), any::<bool>())),
        prop::option::weighted(0.5, 0u64..6),
        any::<bool>(),
    )
        .prop_map(|(filter, exists, order, limit, related)| Query {
            filter,
            exists,
            order,
            limit,
            related,
        })
}

fn rhs_json(rhs: &Rhs) -> Json {
    let lit = |v: Json| json!({"type":"literal","value":v});
    let auth = |f: Json| json!({"type":"static","anchor":"authData","field":f});
    match rhs {
        Rhs::Int(i) => lit(json!(i)),
        Rhs::Text(t) => lit(json!(t)),
        Rhs::Sub => auth(json!("sub")),
        Rhs::Level => auth(json!(["meta", "level"])),
        Rhs::Name => auth(json!("name")),
        Rhs::Missing => auth(json!("nope")),
    }
}

/// The rule or query condition as the wire AST; `system` marks EXISTS as a permission rule's.
fn cond_ast(c: &Cond, system: bool) -> Json {
    match c {
        Cond::Cmp { col, op, rhs } => json!({"type":"simple","op":op,
            "left":{"type":"column","name":col},"right":rhs_json(rhs)}),
        Cond::Exists { op, rhs } => {
            let mut related = json!({
                "correlation":{"parentField":["a"],"childField":["k"]},
                "subquery":{"table":"u","alias":"zsubq_u","where":{"type":"simple","op":op,
                    "left":{"type":"column","name":"v"},"right":rhs_json(rhs)}}});
            if system {
                related["system"] = json!("permissions");
            }
            json!({"type":"correlatedSubquery","op":"EXISTS","related":related})
        }
        Cond::And(cs) => {
            json!({"type":"and","conditions":cs.iter().map(|c| cond_ast(c, system)).collect::<Vec<_>>()})
        }
        Cond::Or(cs) => {
            json!({"type":"or","conditions":cs.iter().map(|c| cond_ast(c, system)).collect::<Vec<_>>()})
        }
    }
}

fn rules_json(rules: &Rules) -> Option<Json> {
    rules.as_ref().map(|rs| {
        json!({"row":{"select": rs.iter().map(|r| json!(["allow", cond_ast(r, true)])).collect::<Vec<_>>(),
            "update":{}}})
    })
}

fn sql_lit_int(i: Option<i64>) -> String {
    i.map_or("NULL".into(), |i| i.to_string())
}

fn sql_lit_text(t: Option<&str>) -> String {
    t.map_or("NULL".into(), |t| format!("'{}'", t.replace('\'', "''")))
}

/// The right side as SQL, with authData values inlined (missing = NULL).
fn rhs_sql(rhs: &Rhs, auth: Option<&Auth>) -> String {
    match rhs {
        Rhs::Int(i) => sql_lit_int(*i),
        Rhs::Text(t) => sql_lit_text(t.as_deref()),
        Rhs::Sub => sql_lit_int(auth.and_then(|a| a.sub)),
        Rhs::Level => sql_lit_int(auth.and_then(|a| a.level)),
        Rhs::Name => sql_lit_text(auth.and_then(|a| a.name.as_deref())),
        Rhs::Missing => "NULL".into(),
    }
}

/// A condition on `table` as SQL. Without NOT, SQL's three-valued logic under WHERE agrees
/// with the client's (every comparison with null is false; IS / IS NOT are null-safe).
/// `u_rules` are ANDed into the user's EXISTS subqueries (None for rules' own subqueries).
fn cond_sql(c: &Cond, table: &str, auth: Option<&Auth>, u_rules: Option<&str>) -> String {
    match c {
        Cond::Cmp { col, op, rhs } => format!("({table}.{col} {op} {})", rhs_sql(rhs, auth)),
        Cond::Exists { op, rhs } => format!(
            "EXISTS (SELECT 1 FROM u AS s WHERE s.k = {table}.a AND (s.v {op} {}) AND {})",
            rhs_sql(rhs, auth),
            u_rules.unwrap_or("1")
        ),
        Cond::And(cs) => {
            let mut s = String::from("(1");
            for c in cs {
                s.push_str(" AND ");
                s.push_str(&cond_sql(c, table, auth, u_rules));
            }
            s.push(')');
            s
        }
        Cond::Or(cs) => {
            let mut s = String::from("(0");
            for c in cs {
                s.push_str(" OR ");
                s.push_str(&cond_sql(c, table, auth, u_rules));
            }
            s.push(')');
            s
        }
    }
}

fn rules_sql(rules: &Rules, table: &str, auth: Option<&Auth>) -> String {
    match rules {
        None => "0".into(),
        Some(rs) => cond_sql(&Cond::Or(rs.clone()), table, auth, None),
    }
}

fn ids(conn: &Connection, sql: &str) -> Vec<i64> {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let rows = stmt.query_map([], |r| r.get(0)).expect("query");
    rows.map(|r| r.expect("row")).collect()
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => panic!("not an int id: {other:?}"),
    }
}

fn t_spec() -> TableSpec {
    spec(
        "t",
        &[
            ("id", ColumnKind::Number),
            ("a", ColumnKind::Number),
            ("b", ColumnKind::String),
            ("c", ColumnKind::Number),
        ],
        vec![0],
    )
}

fn u_spec() -> TableSpec {
    spec(
        "u",
        &[
            ("id", ColumnKind::Number),
            ("k", ColumnKind::Number),
            ("v", ColumnKind::Number),
        ],
        vec![0],
    )
}

fn opt_int(i: Option<i64>) -> Value {
    i.map_or(Value::Null, Value::Int)
}

#[allow(clippy::too_many_arguments)]
fn check_read(
    t_rows: &[TRow],
    u_rows: &[URow],
    t_rules: &Rules,
    u_rules: &Rules,
    auth: Option<&Auth>,
    q: &Query,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let t_data: Vec<Row> = t_rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            vec![
                Value::Int(i as i64),
                opt_int(r.a),
                r.b.clone().map_or(Value::Null, Value::Text),
                opt_int(r.c),
            ]
        })
        .collect();
    let u_data: Vec<Row> = u_rows
        .iter()
        .enumerate()
        .map(|(i, r)| vec![Value::Int(i as i64), opt_int(r.k), opt_int(r.v)])
        .collect();
    let reader = replica(&path, &[(t_spec(), t_data), (u_spec(), u_data)]);

    let mut tables = serde_json::Map::new();
    if let Some(t) = rules_json(t_rules) {
        tables.insert("t".into(), t);
    }
    if let Some(u) = rules_json(u_rules) {
        tables.insert("u".into(), u);
    }
    let perms = parse(&json!({ "tables": tables }).to_string()).expect("generated rules parse");

    // The user's query.
    let mut conds = Vec::new();
    if let Some(f) = &q.filter {
        conds.push(cond_ast(f, false));
    }
    if let Some((op, v)) = q.exists {
        conds.push(cond_ast(
            &Cond::Exists {
                op,
                rhs: Rhs::Int(Some(v)),
            },
            false,
        ));
    }
    let mut ast = json!({"table":"t"});
    if !conds.is_empty() {
        ast["where"] = json!({"type":"and","conditions":conds});
    }
    if let Some((col, desc)) = q.order {
        ast["orderBy"] = json!([[col, if desc { "desc" } else { "asc" }]]);
    }
    if let Some(l) = q.limit {
        ast["limit"] = json!(l);
    }
    if q.related {
        ast["related"] = json!([{"correlation":{"parentField":["a"],"childField":["k"]},
            "subquery":{"table":"u","alias":"us","orderBy":[["id","asc"]]}}]);
    }
    let ast: Ast = serde_json::from_value(ast).expect("query ast");
    let auth_json = auth.map(Auth::json);
    let transformed = authorize_read(&ast, Some(&perms), auth_json.as_ref());
    let text = serde_json::to_string(&transformed).expect("json");
    prop_assert!(!text.contains("\"static\""), "unbound static: {}", text);
    let ev: Evaluation = evaluate(&transformed, &reader).expect("evaluates");

    // The same in SQL.
    let conn = Connection::open(&path).expect("sql connection");
    let u_rules_sql = format!("({})", rules_sql(u_rules, "s", auth));
    let mut where_ = vec![rules_sql(t_rules, "t", auth)];
    if let Some(f) = &q.filter {
        where_.push(cond_sql(f, "t", auth, Some(&u_rules_sql)));
    }
    if let Some((op, v)) = q.exists {
        where_.push(cond_sql(
            &Cond::Exists {
                op,
                rhs: Rhs::Int(Some(v)),
            },
            "t",
            auth,
            Some(&u_rules_sql),
        ));
    }
    let mut sql = format!("SELECT t.id FROM t WHERE {}", where_.join(" AND "));
    match q.order {
        Some((col, desc)) => sql.push_str(&format!(
            " ORDER BY t.{col} {}, t.id ASC",
            if desc { "DESC" } else { "ASC" }
        )),
        None => sql.push_str(" ORDER BY t.id ASC"),
    }
    if let Some(l) = q.limit {
        sql.push_str(&format!(" LIMIT {l}"));
    }
    let expected = ids(&conn, &sql);
    let got: Vec<i64> = ev.nodes.iter().map(|n| int(&n.row[0])).collect();
    prop_assert_eq!(&got, &expected, "sql: {}\nast: {}", sql, text);

    if q.related {
        let u_rules_u = rules_sql(u_rules, "u", auth);
        for node in &ev.nodes {
            let a = &node.row[1];
            let expected = match a {
                Value::Int(a) => ids(
                    &conn,
                    &format!("SELECT u.id FROM u WHERE u.k = {a} AND {u_rules_u} ORDER BY u.id"),
                ),
                _ => Vec::new(),
            };
            let got: Vec<i64> = node
                .relationships
                .iter()
                .find(|(alias, _)| alias == "us")
                .map(|(_, ns)| ns.iter().map(|n| int(&n.row[0])).collect())
                .unwrap_or_default();
            prop_assert_eq!(&got, &expected, "related of {:?}; ast: {}", node.row, text);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    /// authorize_read + the engine = SQL with the select rules inlined (root order and limit,
    /// related rows under their own table's rules, the user's EXISTS under u's rules, the
    /// rules' own EXISTS not).
    #[test]
    fn transformed_queries_return_exactly_the_permitted_rows(
        t_rows in prop::collection::vec(t_row(), 0..10),
        u_rows in prop::collection::vec(u_row(), 0..8),
        t_rules in rules(t_rule()),
        u_rules in rules(u_rule()),
        auth in auth(),
        q in query(),
    ) {
        check_read(&t_rows, &u_rows, &t_rules, &u_rules, auth.as_ref(), &q)?;
    }
}

/// Rows under a rule's `system: "permissions"` EXISTS decide membership but are never synced;
/// rows under the user's own EXISTS are (up to its limit of 3).
#[test]
fn permission_subquery_rows_are_not_synced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let t_data = vec![
        vec![Value::Int(1), Value::Int(7), Value::Null, Value::Null],
        vec![Value::Int(2), Value::Int(8), Value::Null, Value::Null],
    ];
    let u_data: Vec<Row> = (0..5)
        .map(|i| vec![Value::Int(i), Value::Int(7), Value::Int(1)])
        .collect();
    let reader = replica(&path, &[(t_spec(), t_data), (u_spec(), u_data)]);
    let perms = parse(
        &json!({"tables":{
            "t":{"row":{"select":[["allow", cond_ast(&Cond::Exists{op:"=", rhs: Rhs::Int(Some(1))}, true)]]}},
            "u":{"row":{"select":[["allow",{"type":"and","conditions":[]}]]}}}})
        .to_string(),
    )
    .expect("parses");
    let plain: Ast = serde_json::from_value(json!({"table":"t"})).expect("ast");
    let ev = evaluate(&authorize_read(&plain, Some(&perms), None), &reader).expect("evaluates");
    assert_eq!(ev.nodes.len(), 1, "only t.1 has u children");
    assert!(
        ev.rows.keys().all(|k| k.table() == "t"),
        "{:?}",
        ev.rows.keys()
    );
    // The user's own EXISTS syncs up to 3 of u's rows.
    let with_exists: Ast = serde_json::from_value(json!({"table":"t",
        "where": cond_ast(&Cond::Exists{op:"=", rhs: Rhs::Int(Some(1))}, false)}))
    .expect("ast");
    let ev = evaluate(&authorize_read(&with_exists, Some(&perms), None), &reader).expect("ev");
    assert_eq!(ev.rows.keys().filter(|k| k.table() == "u").count(), 3);
    // Nothing deployed: nothing read.
    let ev = evaluate(&authorize_read(&plain, None, None), &reader).expect("evaluates");
    assert!(ev.nodes.is_empty());
}

// ================================================================ write authorizer

fn issue_spec() -> TableSpec {
    spec(
        "issue",
        &[
            ("id", ColumnKind::String),
            ("owner_id", ColumnKind::String),
            ("title", ColumnKind::String),
            ("level", ColumnKind::Number),
        ],
        vec![0],
    )
}

fn comment_spec() -> TableSpec {
    spec(
        "comment",
        &[("id", ColumnKind::String), ("issue_id", ColumnKind::String)],
        vec![0],
    )
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// issue i1 (owner u1), i2 (owner u2); comment c1 on i1.
fn write_replica(path: &Path) -> ReplicaReader {
    replica(
        path,
        &[
            (
                issue_spec(),
                vec![
                    vec![text("i1"), text("u1"), text("one"), Value::Int(1)],
                    vec![text("i2"), text("u2"), text("two"), Value::Int(2)],
                ],
            ),
            (comment_spec(), vec![vec![text("c1"), text("i1")]]),
        ],
    )
}

fn owner_is_sub() -> Json {
    json!(["allow",{"type":"simple","left":{"type":"column","name":"owner_id"},
        "right":{"type":"static","anchor":"authData","field":"sub"},"op":"="}])
}

fn anyone() -> Json {
    json!(["allow",{"type":"and","conditions":[]}])
}

/// issue: insert and update (pre and post) by the owner, delete by the owner; title cells
/// updatable only when level >= 2 before the update. comment: select only.
fn write_perms() -> Permissions {
    parse(
        &json!({"tables":{
            "issue":{
                "row":{"select":[anyone()],"insert":[owner_is_sub()],
                    "update":{"preMutation":[owner_is_sub()],"postMutation":[owner_is_sub()]},
                    "delete":[owner_is_sub()]},
                "cell":{"title":{"update":{"preMutation":[["allow",{"type":"simple",
                    "left":{"type":"column","name":"level"},
                    "right":{"type":"literal","value":2},"op":">="}]]}}}},
            "comment":{"row":{"select":[anyone()],"update":{}}}
        }})
        .to_string(),
    )
    .expect("parses")
}

fn ops(v: Json) -> Vec<CrudOp> {
    serde_json::from_value(v).expect("ops")
}

fn op(kind: &str, table: &str, value: Json) -> Json {
    json!({"op":kind,"tableName":table,"primaryKey":["id"],"value":value})
}

#[test]
fn write_allow_and_deny() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = write_replica(&dir.path().join("replica.db"));
    let p = write_perms();
    let u1 = json!({"sub":"u1"});
    let check = |ops_json: Json, auth: Option<&Json>| {
        authorize_write(&r, Some(&p), &ops(ops_json), auth).expect("no error")
    };

    // Allowed insert: the post-mutation row (only in the overlay) is the user's.
    assert!(check(
        json!([op("insert", "issue", json!({"id":"i9","owner_id":"u1"}))]),
        Some(&u1)
    ));
    // Denied insert: someone else's row; a table with no insert rule; nothing deployed.
    assert!(!check(
        json!([op("insert", "issue", json!({"id":"i9","owner_id":"u2"}))]),
        Some(&u1)
    ));
    assert!(!check(
        json!([op("insert", "comment", json!({"id":"c9","issue_id":"i1"}))]),
        Some(&u1)
    ));
    assert!(!authorize_write(
        &r,
        None,
        &ops(json!([op(
            "insert",
            "issue",
            json!({"id":"i9","owner_id":"u1"})
        )])),
        Some(&u1)
    )
    .expect("no error"));

    // Update: preMutation owner mismatch is denied; the owner may update.
    assert!(!check(
        json!([op("update", "issue", json!({"id":"i2","level":5}))]),
        Some(&u1)
    ));
    assert!(check(
        json!([op("update", "issue", json!({"id":"i1","level":5}))]),
        Some(&u1)
    ));
    // postMutation sees the merged row: giving the issue away is denied.
    assert!(!check(
        json!([op("update", "issue", json!({"id":"i1","owner_id":"u2"}))]),
        Some(&u1)
    ));
    // Anonymous update guarded by authData.sub: denied.
    assert!(!check(
        json!([op("update", "issue", json!({"id":"i1","level":5}))]),
        None
    ));

    // Cell policies apply only to the columns an update sets: i1 has level 1 < 2.
    assert!(!check(
        json!([op("update", "issue", json!({"id":"i1","title":"x"}))]),
        Some(&u1)
    ));
    // ... evaluated on the pre-mutation row, so raising level in the same op does not help.
    assert!(!check(
        json!([op(
            "update",
            "issue",
            json!({"id":"i1","title":"x","level":3})
        )]),
        Some(&u1)
    ));
    // ... and a later op sees the earlier ones only in the post phase.
    let u2 = json!({"sub":"u2"});
    assert!(check(
        json!([op("update", "issue", json!({"id":"i2","title":"x"}))]),
        Some(&u2)
    ));

    // Delete: the owner's rule; a table with no delete rule is denied.
    assert!(check(
        json!([op("delete", "issue", json!({"id":"i1"}))]),
        Some(&u1)
    ));
    assert!(!check(
        json!([op("delete", "issue", json!({"id":"i2"}))]),
        Some(&u1)
    ));
    assert!(!check(
        json!([op("delete", "comment", json!({"id":"c1"}))]),
        Some(&u1)
    ));

    // Upsert: an update when the row exists (i2 is not u1's: denied), an insert when not.
    assert!(!check(
        json!([op("upsert", "issue", json!({"id":"i2","owner_id":"u1"}))]),
        Some(&u1)
    ));
    assert!(!check(
        json!([op("upsert", "issue", json!({"id":"i1","title":"t"}))]),
        Some(&u2)
    ));
    assert!(check(
        json!([op("upsert", "issue", json!({"id":"i7","owner_id":"u1"}))]),
        Some(&u1)
    ));

    // One mutation, several ops: insert then update of the new row passes (the update's
    // pre check runs on the replica, where i9 is missing: denied).
    assert!(!check(
        json!([
            op("insert", "issue", json!({"id":"i9","owner_id":"u1"})),
            op("update", "issue", json!({"id":"i9","level":3}))
        ]),
        Some(&u1)
    ));
    // Every op must pass.
    assert!(!check(
        json!([
            op("insert", "issue", json!({"id":"i9","owner_id":"u1"})),
            op("insert", "issue", json!({"id":"i8","owner_id":"u2"}))
        ]),
        Some(&u1)
    ));
    assert!(check(
        json!([
            op("insert", "issue", json!({"id":"i9","owner_id":"u1"})),
            op("delete", "issue", json!({"id":"i1"}))
        ]),
        Some(&u1)
    ));
}

#[test]
fn upsert_normalization_picks_the_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = write_replica(&dir.path().join("replica.db"));
    // Anyone may insert; nobody may update.
    let insert_only =
        parse(&json!({"tables":{"issue":{"row":{"insert":[anyone()],"update":{}}}}}).to_string())
            .expect("parses");
    let upsert = |id: &str| {
        ops(json!([op(
            "upsert",
            "issue",
            json!({"id":id,"owner_id":"u1"})
        )]))
    };
    assert!(authorize_write(&r, Some(&insert_only), &upsert("new"), None).expect("ok"));
    assert!(!authorize_write(&r, Some(&insert_only), &upsert("i1"), None).expect("ok"));
    // Anyone may update; nobody may insert.
    let update_only = parse(
        &json!({"tables":{"issue":{"row":{"update":{"preMutation":[anyone()],"postMutation":[anyone()]}}}}})
            .to_string(),
    )
    .expect("parses");
    assert!(!authorize_write(&r, Some(&update_only), &upsert("new"), None).expect("ok"));
    assert!(authorize_write(&r, Some(&update_only), &upsert("i1"), None).expect("ok"));
}

#[test]
fn write_errors_carry_zero_cache_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = write_replica(&dir.path().join("replica.db"));
    let p = write_perms();
    let u1 = json!({"sub":"u1"});
    let err = |ops_json: Json| {
        authorize_write(&r, Some(&p), &ops(ops_json), Some(&u1))
            .expect_err("must fail")
            .to_string()
    };
    assert_eq!(
        err(json!([op("insert", "nope", json!({"id":"x"}))])),
        "Table 'nope' is not a valid table."
    );
    // The table check comes first, even after an op that would fail otherwise.
    assert_eq!(
        err(json!([
            op("update", "issue", json!({"id":"missing"})),
            op("insert", "nope", json!({}))
        ])),
        "Table 'nope' is not a valid table."
    );
    assert_eq!(
        err(json!([op(
            "insert",
            "issue",
            json!({"id":"i1","owner_id":"u1"})
        )])),
        r#"Row already exists [0,{"id":"i1","owner_id":"u1"},null]"#
    );
    assert_eq!(
        err(json!([op(
            "update",
            "issue",
            json!({"id":"missing","title":"x"})
        )])),
        r#"Pre-mutation row not found for {"id":"missing","title":"x"}"#
    );
    assert_eq!(
        err(json!([op("delete", "issue", json!({"id":"missing"}))])),
        r#"Pre-mutation row not found for {"id":"missing"}"#
    );
    // Deleting twice in one mutation: the second finds no row.
    assert_eq!(
        err(json!([
            op("delete", "issue", json!({"id":"i1"})),
            op("delete", "issue", json!({"id":"i1"}))
        ])),
        r#"Pre-mutation row not found for {"id":"i1"}"#
    );
    // An error wins over a denial (no rules at all for comment updates).
    assert_eq!(
        err(json!([op("update", "comment", json!({"id":"missing"}))])),
        r#"Pre-mutation row not found for {"id":"missing"}"#
    );
    for kind in ["insert", "upsert", "update", "delete"] {
        assert_eq!(
            err(json!([op(kind, "issue", json!({"title":"x"}))])),
            "Primary key column 'id' is missing from operation value for table issue",
            "{kind}"
        );
    }
    // The primary key is the replica's, not the client's `primaryKey`.
    let client_key = ops(
        json!([{"op":"update","tableName":"issue","primaryKey":["title"],
        "value":{"title":"one"}}]),
    );
    assert_eq!(
        authorize_write(&r, Some(&p), &client_key, Some(&u1))
            .expect_err("fails")
            .to_string(),
        "Primary key column 'id' is missing from operation value for table issue"
    );
    assert!(matches!(
        authorize_write(
            &r,
            Some(&p),
            &ops(json!([op("update", "issue", json!({"id":null}))])),
            Some(&u1)
        ),
        Err(WriteError::InvalidPrimaryKeyValue { .. })
    ));
    let many: Vec<CrudOp> = (0..=MUTATION_OPS_MAX)
        .flat_map(|i| {
            ops(json!([op(
                "insert",
                "issue",
                json!({"id":format!("n{i}"),"owner_id":"u1"})
            )]))
        })
        .collect();
    assert!(matches!(
        authorize_write(&r, Some(&p), &many, Some(&u1)),
        Err(WriteError::TooManyOps { .. })
    ));
}

// ================================================================ load

fn permissions_spec(app: &str) -> TableSpec {
    spec(
        &format!("{app}.permissions"),
        &[
            ("permissions", ColumnKind::Json),
            ("hash", ColumnKind::String),
            ("lock", ColumnKind::Boolean),
        ],
        vec![2],
    )
}

#[test]
fn load_reads_the_replicated_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No table, then a NULL row (the state after ensureGlobalTables): nothing deployed.
    let r = replica(&dir.path().join("none.db"), &[]);
    assert_eq!(load(&r, "zero").expect("ok"), None);
    let null_row = vec![Value::Null, Value::Null, Value::Bool(true)];
    let r = replica(
        &dir.path().join("null.db"),
        &[(permissions_spec("zero"), vec![null_row])],
    );
    assert_eq!(load(&r, "zero").expect("ok"), None);

    let text = json!({"tables":{"issue":{"row":{"select":[anyone()]}}}}).to_string();
    let row = vec![
        Value::Json(text.clone()),
        text_value("abc123"),
        Value::Bool(true),
    ];
    let r = replica(
        &dir.path().join("set.db"),
        &[(permissions_spec("myapp"), vec![row])],
    );
    let (perms, hash) = load(&r, "myapp").expect("ok").expect("deployed");
    assert_eq!(perms, parse(&text).expect("parses"));
    assert_eq!(hash, "abc123");
    assert_eq!(load(&r, "zero").expect("other app"), None);

    let bad = vec![
        Value::Json(r#"{"tables":{"t":{"rows":{}}}}"#.into()),
        text_value("h"),
        Value::Bool(true),
    ];
    let r = replica(
        &dir.path().join("bad.db"),
        &[(permissions_spec("zero"), vec![bad])],
    );
    assert!(matches!(
        load(&r, "zero"),
        Err(PermissionsError::Parse { .. })
    ));
}

fn text_value(s: &str) -> Value {
    Value::Text(s.into())
}

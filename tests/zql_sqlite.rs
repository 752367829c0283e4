//! Differential test: the fresh evaluator against the same query written as SQLite SQL, over
//! random small tables (int and text columns with nulls) and random where / orderBy / start /
//! limit. SQLite's BINARY collation is UTF-8 byte order and its ASC puts NULLs first, which is
//! exactly the client's `compareValues`.

use std::rc::Rc;

use proptest::prelude::*;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection};
use serde_json::json;
use zcache::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, parse_ast, row_key_json, Source, ZqlError};

/// A `Source` over a rusqlite connection: one indexed-or-scanned SELECT per fetch.
struct SqliteSource {
    conn: Connection,
    specs: Vec<Rc<TableSpec>>,
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Float(f) => SqlValue::Real(*f),
        Value::Text(s) | Value::Json(s) => SqlValue::Text(s.clone()),
    }
}

fn from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8(t.to_vec()).unwrap()),
        ValueRef::Blob(_) => panic!("no blobs here"),
    }
}

impl SqliteSource {
    fn query(&self, sql: &str, params: &[SqlValue], width: usize) -> Vec<Row> {
        let mut stmt = self.conn.prepare(sql).unwrap();
        let rows = stmt
            .query_map(params_from_iter(params.iter()), |r| {
                Ok((0..width)
                    .map(|i| from_sql(r.get_ref(i).unwrap()))
                    .collect())
            })
            .unwrap();
        rows.map(|r| r.unwrap()).collect()
    }
}

impl Source for SqliteSource {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.specs.iter().find(|s| s.name == name).cloned()
    }

    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError> {
        let spec = self
            .table(table)
            .ok_or_else(|| ZqlError::Source(format!("no table {table}")))?;
        let cols: Vec<&str> = spec.columns.iter().map(|c| c.name.as_str()).collect();
        let mut sql = format!("SELECT {} FROM {table} WHERE 1", cols.join(", "));
        for (c, _) in eq {
            sql.push_str(&format!(" AND {} = ?", cols[*c]));
        }
        let params: Vec<SqlValue> = eq.iter().map(|(_, v)| to_sql(v)).collect();
        Ok(self.query(&sql, &params, cols.len()))
    }
}

fn spec(name: &str, cols: &[(&str, ColumnKind)]) -> Rc<TableSpec> {
    Rc::new(TableSpec {
        name: name.into(),
        columns: cols
            .iter()
            .map(|(n, k)| ColumnSpec {
                name: n.to_string(),
                kind: *k,
                pg_type_oid: 0,
            })
            .collect(),
        primary_key: vec![0],
    })
}

// ------------------------------------------------------------------ random data

/// t(id, a, b, c): a and c small ints, b short strings mixing ASCII, BMP and astral chars.
#[derive(Debug, Clone)]
struct TRow {
    a: Option<i64>,
    b: Option<String>,
    c: Option<i64>,
}

/// u(id, k, v): the child table of EXISTS conditions, correlated on u.k = t.a.
#[derive(Debug, Clone)]
struct URow {
    k: Option<i64>,
    v: Option<i64>,
}

const PIECES: &[&str] = &["a", "b", "A", "B", "é", "\u{ff5e}", "\u{1f600}", "%", "_"];

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PIECES), 0..4).prop_map(|p| p.concat())
}

fn small_int() -> impl Strategy<Value = i64> {
    -2i64..3
}

fn t_row() -> impl Strategy<Value = TRow> {
    (
        prop::option::weighted(0.8, small_int()),
        prop::option::weighted(0.8, text()),
        prop::option::weighted(0.7, 0i64..2),
    )
        .prop_map(|(a, b, c)| TRow { a, b, c })
}

fn u_row() -> impl Strategy<Value = URow> {
    (
        prop::option::weighted(0.85, small_int()),
        prop::option::weighted(0.8, 0i64..3),
    )
        .prop_map(|(k, v)| URow { k, v })
}

#[derive(Debug, Clone)]
enum Cond {
    Int {
        col: &'static str,
        op: &'static str,
        lit: Option<i64>,
    },
    In {
        col: &'static str,
        negate: bool,
        list: Vec<i64>,
    },
    Text {
        op: &'static str,
        lit: Option<String>,
    },
    Like {
        op: &'static str,
        pattern: String,
    },
    Exists {
        negate: bool,
        /// A condition on u.v.
        sub: Option<(&'static str, i64)>,
    },
    And(Vec<Cond>),
    Or(Vec<Cond>),
}

const CMP_OPS: &[&str] = &["=", "!=", "<", ">", "<=", ">=", "IS", "IS NOT"];
const LIKE_OPS: &[&str] = &["LIKE", "NOT LIKE", "ILIKE", "NOT ILIKE"];
/// LIKE pattern tokens. No bare `_`: SQLite's `_` is one code point, the client's one UTF-16
/// unit; that difference is covered by the unit tests.
const PATTERN_PIECES: &[&str] = &["%", "a", "b", "A", "é", "\u{1f600}", "\\%", "\\_"];

fn leaf() -> impl Strategy<Value = Cond> {
    prop_oneof![
        (
            prop::sample::select(&["a", "c", "id"][..]),
            prop::sample::select(CMP_OPS),
            prop::option::weighted(0.85, small_int())
        )
            .prop_map(|(col, op, lit)| Cond::Int { col, op, lit }),
        (
            prop::sample::select(&["a", "c"][..]),
            any::<bool>(),
            prop::collection::vec(small_int(), 0..3)
        )
            .prop_map(|(col, negate, list)| Cond::In { col, negate, list }),
        (
            prop::sample::select(CMP_OPS),
            prop::option::weighted(0.85, text())
        )
            .prop_map(|(op, lit)| Cond::Text { op, lit }),
        (
            prop::sample::select(LIKE_OPS),
            prop::collection::vec(prop::sample::select(PATTERN_PIECES), 0..4)
        )
            .prop_map(|(op, p)| Cond::Like {
                op,
                pattern: p.concat()
            }),
        (
            any::<bool>(),
            prop::option::of((prop::sample::select(&["=", "<", ">="][..]), 0i64..3))
        )
            .prop_map(|(negate, sub)| Cond::Exists { negate, sub }),
    ]
}

fn cond() -> impl Strategy<Value = Cond> {
    leaf().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Cond::And),
            prop::collection::vec(inner, 0..3).prop_map(Cond::Or),
        ]
    })
}

#[derive(Debug, Clone)]
struct Query {
    filter: Option<Cond>,
    order: Vec<(&'static str, bool /*desc*/)>,
    /// (row index into t, or a made-up row; exclusive)
    start: Option<(Result<usize, TRow>, i64, bool)>,
    limit: Option<u64>,
}

fn query() -> impl Strategy<Value = Query> {
    (
        prop::option::weighted(0.8, cond()),
        prop::collection::vec(
            (
                prop::sample::select(&["a", "b", "c", "id"][..]),
                any::<bool>(),
            ),
            0..3,
        ),
        prop::option::weighted(
            0.3,
            (
                prop_oneof![(0usize..12).prop_map(Ok), t_row().prop_map(Err)],
                -1i64..14,
                any::<bool>(),
            ),
        ),
        prop::option::weighted(0.5, 0u64..8),
    )
        .prop_map(|(filter, order, start, limit)| Query {
            filter,
            order,
            start,
            limit,
        })
}

// ------------------------------------------------------------------ the two renderings

fn json_lit<T: serde::Serialize>(v: &Option<T>) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

fn simple(col: &str, op: &str, value: serde_json::Value) -> serde_json::Value {
    json!({"type":"simple","op":op,"left":{"type":"column","name":col},"right":{"type":"literal","value":value}})
}

fn cond_ast(c: &Cond) -> serde_json::Value {
    match c {
        Cond::Int { col, op, lit } => simple(col, op, json_lit(lit)),
        Cond::In { col, negate, list } => {
            simple(col, if *negate { "NOT IN" } else { "IN" }, json!(list))
        }
        Cond::Text { op, lit } => simple("b", op, json_lit(lit)),
        Cond::Like { op, pattern } => simple("b", op, json!(pattern)),
        Cond::Exists { negate, sub } => {
            let mut subquery = json!({"table":"u","alias":"zsubq_u"});
            if let Some((op, v)) = sub {
                subquery["where"] = simple("v", op, json!(v));
            }
            json!({"type":"correlatedSubquery","op":if *negate {"NOT EXISTS"} else {"EXISTS"},
                "related":{"correlation":{"parentField":["a"],"childField":["k"]},"subquery":subquery}})
        }
        Cond::And(cs) => {
            json!({"type":"and","conditions":cs.iter().map(cond_ast).collect::<Vec<_>>()})
        }
        Cond::Or(cs) => {
            json!({"type":"or","conditions":cs.iter().map(cond_ast).collect::<Vec<_>>()})
        }
    }
}

/// The client's semantics written in SQL: a null operand makes every operator but IS / IS NOT
/// false, which SQL's NULL already does here because conditions are never negated as a whole.
fn cond_sql(c: &Cond, params: &mut Vec<SqlValue>) -> String {
    let lit_sql = |lit: Option<SqlValue>, params: &mut Vec<SqlValue>| match lit {
        None => "NULL".to_string(),
        Some(v) => {
            params.push(v);
            "?".to_string()
        }
    };
    match c {
        Cond::Int { col, op, lit } => {
            let l = lit_sql(lit.map(SqlValue::Integer), params);
            format!("(t.{col} {op} {l})")
        }
        Cond::In { col, negate, list } => {
            let items: Vec<String> = list.iter().map(|i| i.to_string()).collect();
            let not = if *negate { "NOT " } else { "" };
            // SQLite makes `NULL NOT IN ()` true; the client is false on any null operand.
            format!(
                "(t.{col} IS NOT NULL AND t.{col} {not}IN ({}))",
                items.join(",")
            )
        }
        Cond::Text { op, lit } => {
            let l = lit_sql(lit.clone().map(SqlValue::Text), params);
            format!("(t.b {op} {l})")
        }
        Cond::Like { op, pattern } => {
            params.push(SqlValue::Text(pattern.clone()));
            match *op {
                "LIKE" => "(t.b LIKE ? ESCAPE '\\')".into(),
                "NOT LIKE" => "(t.b NOT LIKE ? ESCAPE '\\')".into(),
                "ILIKE" => "(lower(t.b) LIKE lower(?) ESCAPE '\\')".into(),
                _ => "(lower(t.b) NOT LIKE lower(?) ESCAPE '\\')".into(),
            }
        }
        Cond::Exists { negate, sub } => {
            let not = if *negate { "NOT " } else { "" };
            let extra = match sub {
                Some((op, v)) => format!(" AND u.v {op} {v}"),
                None => String::new(),
            };
            format!("({not}EXISTS (SELECT 1 FROM u WHERE u.k = t.a{extra}))")
        }
        Cond::And(cs) if cs.is_empty() => "1".into(),
        Cond::Or(cs) if cs.is_empty() => "0".into(),
        Cond::And(cs) => format!(
            "({})",
            cs.iter()
                .map(|c| cond_sql(c, params))
                .collect::<Vec<_>>()
                .join(" AND ")
        ),
        Cond::Or(cs) => format!(
            "({})",
            cs.iter()
                .map(|c| cond_sql(c, params))
                .collect::<Vec<_>>()
                .join(" OR ")
        ),
    }
}

/// The completed ordering: the user's, then `id` ascending unless already present.
fn completed(order: &[(&'static str, bool)]) -> Vec<(&'static str, bool)> {
    let mut o = order.to_vec();
    if !o.iter().any(|(c, _)| *c == "id") {
        o.push(("id", false));
    }
    o
}

/// "Row is after the cursor" as a lexicographic OR-expansion with explicit null handling.
fn start_sql(
    order: &[(&'static str, bool)],
    cursor: &[(&'static str, SqlValue)],
    exclusive: bool,
    params: &mut Vec<SqlValue>,
) -> String {
    let val = |col: &str| cursor.iter().find(|(c, _)| *c == col).unwrap().1.clone();
    let mut terms = Vec::new();
    for i in 0..=order.len() {
        if i == order.len() && exclusive {
            break;
        }
        let mut parts = Vec::new();
        for (col, _) in &order[..i] {
            params.push(val(col));
            parts.push(format!("t.{col} IS ?"));
        }
        if let Some((col, desc)) = order.get(i) {
            let v = val(col);
            let after = match (v, desc) {
                (SqlValue::Null, false) => format!("t.{col} IS NOT NULL"),
                (SqlValue::Null, true) => "0".into(),
                (v, false) => {
                    params.push(v);
                    format!("t.{col} > ?")
                }
                (v, true) => {
                    params.push(v);
                    format!("(t.{col} IS NULL OR t.{col} < ?)")
                }
            };
            parts.push(after);
        }
        terms.push(if parts.is_empty() {
            "1".to_string()
        } else {
            format!("({})", parts.join(" AND "))
        });
    }
    format!("({})", terms.join(" OR "))
}

fn setup(t_rows: &[TRow], u_rows: &[URow]) -> SqliteSource {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(
        "PRAGMA case_sensitive_like = ON;
         CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c INTEGER);
         CREATE TABLE u (id INTEGER PRIMARY KEY, k INTEGER, v INTEGER);",
    )
    .unwrap();
    for (id, r) in t_rows.iter().enumerate() {
        conn.execute(
            "INSERT INTO t VALUES (?, ?, ?, ?)",
            rusqlite::params![id as i64, r.a, r.b, r.c],
        )
        .unwrap();
    }
    for (id, r) in u_rows.iter().enumerate() {
        conn.execute(
            "INSERT INTO u VALUES (?, ?, ?)",
            rusqlite::params![id as i64, r.k, r.v],
        )
        .unwrap();
    }
    use ColumnKind::{Number as N, String as S};
    SqliteSource {
        conn,
        specs: vec![
            spec("t", &[("id", N), ("a", N), ("b", S), ("c", N)]),
            spec("u", &[("id", N), ("k", N), ("v", N)]),
        ],
    }
}

fn cursor_row(q: &Query, t_rows: &[TRow]) -> Option<(TRow, i64, bool)> {
    let (which, id, exclusive) = q.start.clone()?;
    let row = match which {
        Ok(i) if !t_rows.is_empty() => {
            return Some((
                t_rows[i % t_rows.len()].clone(),
                (i % t_rows.len()) as i64,
                exclusive,
            ))
        }
        Ok(_) => TRow {
            a: None,
            b: None,
            c: None,
        },
        Err(r) => r,
    };
    Some((row, id, exclusive))
}

fn check(t_rows: &[TRow], u_rows: &[URow], q: &Query) -> Result<(), TestCaseError> {
    let src = setup(t_rows, u_rows);
    let order = completed(&q.order);

    let mut ast = json!({"table":"t"});
    if let Some(f) = &q.filter {
        ast["where"] = cond_ast(f);
    }
    if !q.order.is_empty() {
        ast["orderBy"] = json!(q
            .order
            .iter()
            .map(|(c, d)| json!([c, if *d { "desc" } else { "asc" }]))
            .collect::<Vec<_>>());
    }
    if let Some(l) = q.limit {
        ast["limit"] = json!(l);
    }

    let mut params = Vec::new();
    let mut wheres = Vec::new();
    if let Some(f) = &q.filter {
        wheres.push(cond_sql(f, &mut params));
    }
    if let Some((row, id, exclusive)) = cursor_row(q, t_rows) {
        ast["start"] = json!({"row":{"id":id,"a":row.a,"b":row.b,"c":row.c},"exclusive":exclusive});
        let cursor = [
            ("id", SqlValue::Integer(id)),
            ("a", row.a.map_or(SqlValue::Null, SqlValue::Integer)),
            ("b", row.b.clone().map_or(SqlValue::Null, SqlValue::Text)),
            ("c", row.c.map_or(SqlValue::Null, SqlValue::Integer)),
        ];
        wheres.push(start_sql(&order, &cursor, exclusive, &mut params));
    }
    let mut sql = "SELECT t.id, t.a, t.b, t.c FROM t".to_string();
    if !wheres.is_empty() {
        sql.push_str(&format!(" WHERE {}", wheres.join(" AND ")));
    }
    let order_sql: Vec<String> = order
        .iter()
        .map(|(c, d)| format!("t.{c} {}", if *d { "DESC" } else { "ASC" }))
        .collect();
    sql.push_str(&format!(" ORDER BY {}", order_sql.join(", ")));
    if let Some(l) = q.limit {
        sql.push_str(&format!(" LIMIT {l}"));
    }
    let expected = src.query(&sql, &params, 4);

    let parsed = parse_ast(&ast).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let got = evaluate(&parsed, &src).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let got_rows: Vec<Row> = got.nodes.iter().map(|n| n.row.clone()).collect();
    prop_assert_eq!(&got_rows, &expected, "ast {}\nsql {}", ast, sql);

    // Every root row is synced once; EXISTS children are synced as well, nothing else of t.
    let t_spec = src.table("t").unwrap();
    for row in &expected {
        let key = zcache::zql::RowKey::new("t", row_key_json(&t_spec, row));
        prop_assert_eq!(got.rows.get(&key).map(|r| r.1), Some(1));
    }
    let t_synced = got.rows.keys().filter(|k| k.table() == "t").count();
    prop_assert_eq!(t_synced, expected.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn evaluator_matches_sqlite(
        t_rows in prop::collection::vec(t_row(), 0..12),
        u_rows in prop::collection::vec(u_row(), 0..8),
        q in query(),
    ) {
        check(&t_rows, &u_rows, &q)?;
    }
}

#[test]
fn sqlite_like_is_case_sensitive_here() {
    // Guards the reference: without the pragma SQLite's LIKE folds ASCII case.
    let src = setup(&[], &[]);
    let n: i64 = src
        .conn
        .query_row("SELECT 'abc' LIKE 'ABC'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

//! Differential test of the incremental engine: random data, random queries (filters, order,
//! limit, start, related one/many with per-parent limits, junction hops, EXISTS / NOT EXISTS,
//! OR with EXISTS, nesting) and random change batches (inserts, updates of sort keys, filter
//! columns and join keys, primary-key changes, deletes). After every batch the maintained
//! result must equal a fresh evaluation of the query over the changed data: the same rows with
//! the same path counts, and the same roots in the same order.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use proptest::prelude::*;
use serde_json::{json, Value as Json};
use zcache::zql::ast::Direction;
use zcache::zql::ivm::{LiveQuery, RowChange};
use zcache::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, parse_ast, RowKey, Source, ZqlError};

/// Tables keyed by their primary-key values; fetch scans (the engine must not rely on order).
#[derive(Default)]
struct MemSource {
    specs: HashMap<String, Rc<TableSpec>>,
    rows: RefCell<HashMap<String, BTreeMap<Vec<KeyPart>, Row>>>,
    /// Set while the oracle evaluates: equality reads only, so the fresh evaluation does not
    /// share the ordered and batched read paths with the engine under test.
    plain: std::cell::Cell<bool>,
}

/// An orderable stand-in for a key value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    Null,
    Int(i64),
    Text(String),
}

fn key_part(v: &Value) -> KeyPart {
    match v {
        Value::Int(i) => KeyPart::Int(*i),
        Value::Text(s) => KeyPart::Text(s.clone()),
        _ => KeyPart::Null,
    }
}

impl MemSource {
    fn def(&mut self, name: &str, cols: &[(&str, ColumnKind)], pk: &[usize]) {
        let columns = cols
            .iter()
            .map(|(n, k)| ColumnSpec {
                name: n.to_string(),
                kind: *k,
                pg_type_oid: 0,
            })
            .collect();
        let spec = TableSpec {
            name: name.into(),
            columns,
            primary_key: pk.to_vec(),
        };
        self.specs.insert(name.into(), Rc::new(spec));
        self.rows.borrow_mut().insert(name.into(), BTreeMap::new());
    }

    fn key(&self, table: &str, row: &Row) -> Vec<KeyPart> {
        self.specs[table]
            .primary_key
            .iter()
            .map(|&i| key_part(&row[i]))
            .collect()
    }

    fn get(&self, table: &str, key: &[KeyPart]) -> Option<Row> {
        self.rows.borrow()[table].get(key).cloned()
    }

    fn put(&self, table: &str, row: Row) {
        let key = self.key(table, &row);
        self.rows
            .borrow_mut()
            .get_mut(table)
            .unwrap()
            .insert(key, row);
    }

    fn remove(&self, table: &str, key: &[KeyPart]) {
        self.rows.borrow_mut().get_mut(table).unwrap().remove(key);
    }

    fn all(&self, table: &str) -> Vec<Row> {
        self.rows.borrow()[table].values().cloned().collect()
    }
}

impl Source for MemSource {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.specs.get(name).cloned()
    }

    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError> {
        let rows = self.rows.borrow();
        let t = rows
            .get(table)
            .ok_or_else(|| ZqlError::Source(format!("no table {table}")))?;
        // Reversed key order: nothing may depend on the source's order.
        Ok(t.values()
            .rev()
            .filter(|r| eq.iter().all(|(c, v)| r[*c].sql_eq(v)))
            .cloned()
            .collect())
    }

    fn fetch_in(
        &self,
        table: &str,
        column: usize,
        values: &[Value],
        eq: &[(usize, Value)],
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        if self.plain.get() {
            return Ok(None);
        }
        let rows = self.fetch(table, eq)?;
        Ok(Some(
            rows.into_iter()
                .filter(|r| values.iter().any(|v| r[column].sql_eq(v)))
                .collect(),
        ))
    }

    fn fetch_ordered(
        &self,
        table: &str,
        eq: &[(usize, Value)],
        order: &[(usize, Direction)],
        cursor: Option<(&[Value], bool)>,
        limit: usize,
    ) -> Result<Option<Vec<Row>>, ZqlError> {
        if self.plain.get() {
            return Ok(None);
        }
        let cmp_values = |a: &[Value], b: &[Value]| {
            for ((x, y), (_, d)) in a.iter().zip(b).zip(order) {
                let o = x.compare(y);
                let o = if *d == Direction::Desc {
                    o.reverse()
                } else {
                    o
                };
                if o != std::cmp::Ordering::Equal {
                    return o;
                }
            }
            std::cmp::Ordering::Equal
        };
        let project =
            |r: &Row| -> Vec<Value> { order.iter().map(|(c, _)| r[*c].clone()).collect() };
        let mut rows = self.fetch(table, eq)?;
        rows.sort_by(|a, b| cmp_values(&project(a), &project(b)));
        if let Some((values, inclusive)) = cursor {
            rows.retain(|r| match cmp_values(&project(r), values) {
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Equal => inclusive,
                std::cmp::Ordering::Less => false,
            });
        }
        rows.truncate(limit);
        Ok(Some(rows))
    }
}

const N: ColumnKind = ColumnKind::Number;
const S: ColumnKind = ColumnKind::String;

/// user(id, name, n); issue(id, status, owner, pri, title); comment(id, issue, author, body);
/// label(id, name); issue_label(issue, label).
fn schema() -> MemSource {
    let mut s = MemSource::default();
    s.def("user", &[("id", N), ("name", S), ("n", N)], &[0]);
    s.def(
        "issue",
        &[
            ("id", N),
            ("status", S),
            ("owner", N),
            ("pri", N),
            ("title", S),
        ],
        &[0],
    );
    s.def(
        "comment",
        &[("id", N), ("issue", N), ("author", N), ("body", S)],
        &[0],
    );
    s.def("label", &[("id", N), ("name", S)], &[0]);
    s.def("issue_label", &[("issue", N), ("label", N)], &[0, 1]);
    s
}

fn opt_int(max: i64) -> impl Strategy<Value = Value> {
    prop_oneof![1 => Just(Value::Null), 6 => (0..max).prop_map(Value::Int)]
}

fn opt_text(choices: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        6 => proptest::sample::select(choices).prop_map(|s| Value::Text(s.to_string())),
    ]
}

const STATUSES: &[&str] = &["open", "closed", "wip"];
const WORDS: &[&str] = &["a", "ab", "b", "ba", "é", "Z", ""];

/// A random row of `table`, its key drawn from a small range so changes collide.
fn row_of(table: &'static str) -> BoxedStrategy<Row> {
    match table {
        "user" => (0..6i64, opt_text(WORDS), opt_int(5))
            .prop_map(|(id, name, n)| vec![Value::Int(id), name, n])
            .boxed(),
        "issue" => (
            0..14i64,
            opt_text(STATUSES),
            opt_int(6),
            opt_int(4),
            opt_text(WORDS),
        )
            .prop_map(|(id, st, o, p, t)| vec![Value::Int(id), st, o, p, t])
            .boxed(),
        "comment" => (0..24i64, opt_int(14), opt_int(6), opt_text(WORDS))
            .prop_map(|(id, i, a, b)| vec![Value::Int(id), i, a, b])
            .boxed(),
        "label" => (0..4i64, opt_text(WORDS))
            .prop_map(|(id, n)| vec![Value::Int(id), n])
            .boxed(),
        _ => (0..14i64, 0..4i64)
            .prop_map(|(i, l)| vec![Value::Int(i), Value::Int(l)])
            .boxed(),
    }
}

const TABLES: &[&str] = &["user", "issue", "comment", "label", "issue_label"];

#[derive(Debug, Clone)]
enum Op {
    /// Insert or overwrite the row with this key.
    Put(&'static str, Row),
    /// Delete the row with this key (if any).
    Delete(&'static str, Row),
    /// Move the row with the first key to the second row's key and contents.
    Rekey(&'static str, Row, Row),
}

fn op() -> impl Strategy<Value = Op> {
    proptest::sample::select(TABLES).prop_flat_map(|t| {
        prop_oneof![
            5 => row_of(t).prop_map(move |r| Op::Put(t, r)),
            2 => row_of(t).prop_map(move |r| Op::Delete(t, r)),
            1 => (row_of(t), row_of(t)).prop_map(move |(a, b)| Op::Rekey(t, a, b)),
        ]
    })
}

fn simple(col: &str, op: &str, value: Json) -> Json {
    json!({"type":"simple","left":{"type":"column","name":col},"op":op,"right":{"type":"literal","value":value}})
}

fn corr(parent: &str, child: &str) -> Json {
    json!({"parentField":[parent],"childField":[child]})
}

fn exists(op: &str, related: Json) -> Json {
    json!({"type":"correlatedSubquery","op":op,"related":related})
}

/// Random queries over the schema, each built from a template and random parameters.
fn query() -> impl Strategy<Value = Json> {
    let limit = prop_oneof![2 => Just(None), 3 => (0..5u64).prop_map(Some)];
    let order = proptest::sample::select(vec![
        json!([["pri", "desc"]]),
        json!([["pri", "asc"], ["status", "desc"]]),
        json!([["title", "asc"]]),
        json!([]),
    ]);
    let status = proptest::sample::select(STATUSES);
    let child_limit = prop_oneof![Just(None), (0..3u64).prop_map(Some)];
    (
        0..9usize,
        limit,
        order,
        status,
        child_limit,
        0..5i64,
        any::<bool>(),
    )
        .prop_map(|(shape, limit, order, status, child_limit, k, flag)| {
            let mut comments = json!({"table":"comment","alias":"comments","orderBy":[["body","desc"]]});
            if let Some(l) = child_limit {
                comments["limit"] = json!(l);
            }
            let comments_rel = json!({"correlation":corr("id","issue"),"subquery":comments.clone()});
            let owner_rel = json!({"correlation":corr("owner","id"),"subquery":{"table":"user","alias":"owner"}});
            let labels_rel = json!({"correlation":corr("id","issue"),"hidden":true,
                "subquery":{"table":"issue_label","alias":"labels","related":[{
                    "correlation":corr("label","id"),
                    "subquery":{"table":"label","alias":"labels","orderBy":[["name","asc"]]}}]}});
            let mut q = json!({"table":"issue","orderBy":order});
            match shape {
                0 => {
                    q["where"] = simple("status", "=", json!(status));
                    q["related"] = json!([comments_rel, owner_rel]);
                }
                1 => {
                    let op = if flag { "EXISTS" } else { "NOT EXISTS" };
                    let mut sub = json!({"table":"comment","alias":"c",
                        "where":simple("body","LIKE",json!("a%"))});
                    if let Some(l) = child_limit {
                        sub["limit"] = json!(l);
                    }
                    q["where"] = exists(op, json!({"correlation":corr("id","issue"),"subquery":sub}));
                    q["related"] = json!([owner_rel]);
                }
                2 => {
                    q["where"] = json!({"type":"or","conditions":[
                        simple("status","=",json!(status)),
                        exists("EXISTS", json!({"correlation":corr("owner","id"),
                            "subquery":{"table":"user","alias":"o","where":simple("n",">",json!(k))}}))]});
                }
                3 => {
                    q["where"] = simple("pri", if flag { ">=" } else { "IS NOT" }, if flag { json!(k) } else { Json::Null });
                    q["related"] = json!([labels_rel]);
                }
                4 => {
                    // Nested: issues with their comments, each with its author.
                    let mut nested = comments.clone();
                    nested["related"] = json!([{"correlation":corr("author","id"),
                        "subquery":{"table":"user","alias":"author"}}]);
                    q["related"] = json!([{"correlation":corr("id","issue"),"subquery":nested}]);
                    q["where"] = json!({"type":"and","conditions":[
                        simple("status","!=",json!(status)),
                        exists("EXISTS", json!({"correlation":corr("owner","id"),
                            "subquery":{"table":"user","alias":"o"}}))]});
                }
                5 => {
                    // Comments of open issues whose owner has n > k (EXISTS nested in EXISTS).
                    let issue_sub = json!({"table":"issue","alias":"i","where":{"type":"and","conditions":[
                        simple("status","=",json!(status)),
                        exists("EXISTS", json!({"correlation":corr("owner","id"),
                            "subquery":{"table":"user","alias":"u","where":simple("n",">",json!(k))}}))]}});
                    q = json!({"table":"comment","orderBy":[["issue","asc"]],
                        "where":exists("EXISTS", json!({"correlation":corr("issue","id"),"subquery":issue_sub})),
                        "related":[{"correlation":corr("issue","id"),"subquery":{"table":"issue","alias":"issue",
                            "related":[owner_rel]}}]});
                }
                6 => {
                    // A start cursor.
                    q["start"] = json!({"row":{"id":k,"pri":k,"status":status,"title":"b"},"exclusive":flag});
                    q["orderBy"] = json!([["pri","asc"]]);
                    q["related"] = json!([comments_rel]);
                }
                7 => {
                    // Users with their issues (a per-parent limit) and, under each, its labels.
                    let mut issues = json!({"table":"issue","alias":"issues","orderBy":[["pri","desc"]],
                        "related":[labels_rel]});
                    if let Some(l) = child_limit {
                        issues["limit"] = json!(l);
                    }
                    q = json!({"table":"user","orderBy":[["name","asc"]],
                        "related":[{"correlation":corr("id","owner"),"subquery":issues}]});
                }
                _ => {
                    q["where"] = json!({"type":"or","conditions":[
                        simple("title","ILIKE",json!("A%")),
                        exists("NOT EXISTS", json!({"correlation":corr("id","issue"),
                            "subquery":{"table":"issue_label","alias":"l"}}))]});
                }
            }
            if let Some(l) = limit {
                q["limit"] = json!(l);
            }
            q
        })
}

/// Applies `ops` and returns each changed key's net change over the batch.
fn apply(src: &MemSource, ops: &[Op]) -> Vec<RowChange> {
    let mut before: BTreeMap<(String, Vec<KeyPart>), Option<Row>> = BTreeMap::new();
    let mut note = |table: &str, key: Vec<KeyPart>| {
        let old = src.get(table, &key);
        before.entry((table.to_string(), key)).or_insert(old);
    };
    for op in ops {
        match op {
            Op::Put(t, row) => {
                note(t, src.key(t, row));
                src.put(t, row.clone());
            }
            Op::Delete(t, row) => {
                let key = src.key(t, row);
                note(t, key.clone());
                src.remove(t, &key);
            }
            Op::Rekey(t, from, to) => {
                let from_key = src.key(t, from);
                if src.get(t, &from_key).is_some() {
                    note(t, from_key.clone());
                    note(t, src.key(t, to));
                    src.remove(t, &from_key);
                    src.put(t, to.clone());
                }
            }
        }
    }
    before
        .into_iter()
        .map(|((table, key), old)| {
            let new = src.get(&table, &key);
            RowChange { table, old, new }
        })
        .filter(|c| c.old != c.new)
        .collect()
}

fn check_equal(
    live: &LiveQuery,
    src: &MemSource,
    ast: &zcache::zql::Ast,
) -> Result<(), TestCaseError> {
    src.plain.set(true);
    let fresh = evaluate(ast, src);
    src.plain.set(false);
    let fresh = fresh.map_err(|e| TestCaseError::fail(e.to_string()))?;
    let fresh_roots: Vec<&Row> = fresh.nodes.iter().map(|n| &n.row).collect();
    let live_roots: Vec<&Row> = live.roots().iter().collect();
    prop_assert_eq!(live_roots, fresh_roots, "roots differ");
    let sorted = |m: &zcache::zql::eval::RowCounts| {
        let mut v: Vec<_> = m
            .iter()
            .map(|(k, (r, n))| (k.clone(), r.clone(), *n))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    prop_assert_eq!(
        sorted(live.rows()),
        sorted(&fresh.rows),
        "synced rows differ"
    );
    Ok(())
}

fn run_case(seed_ops: &[Op], query: &Json, batches: &[Vec<Op>]) -> Result<(), TestCaseError> {
    run_case_on(schema(), seed_ops, query, batches)
}

fn run_case_on(
    src: MemSource,
    seed_ops: &[Op],
    query: &Json,
    batches: &[Vec<Op>],
) -> Result<(), TestCaseError> {
    apply(&src, seed_ops);
    let ast = parse_ast(query).map_err(|e| TestCaseError::fail(format!("{e}: {query}")))?;
    let mut live =
        LiveQuery::hydrate(&ast, &src).map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_equal(&live, &src, &ast)?;
    for batch in batches {
        let changes = apply(&src, batch);
        let touched = live
            .push(&changes, &src)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_equal(&live, &src, &ast)?;
        // Every row whose count or contents changed is reported as touched.
        let _ = touched;
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn incremental_result_equals_fresh_evaluation(
        seed_ops in proptest::collection::vec(op(), 10..60),
        query in query(),
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..12),
    ) {
        run_case(&seed_ops, &query, &batches)?;
    }

    /// The same over random schemas: 2-4 tables of random int and text columns, and queries
    /// built from a shrinkable choice tape over them (any table, random conditions, orderings, limits, related
    /// and EXISTS subqueries joined on columns of the same type, two levels deep).
    #[test]
    fn incremental_result_equals_fresh_evaluation_on_random_schemas(
        (schema, seed_ops, batches) in random_schema().prop_flat_map(|s| {
            let ops = proptest::collection::vec(random_op(&s), 5..50);
            let batches = proptest::collection::vec(
                proptest::collection::vec(random_op(&s), 1..4), 1..10);
            (Just(s), ops, batches)
        }),
        query_tape in query_tape(),
    ) {
        let query = random_query(&schema, query_tape);
        // The query is derived from the tape, so the shrunk failure names it itself.
        run_case_on(schema.source(), &seed_ops, &query, &batches)
            .map_err(|e| TestCaseError::fail(format!("{e}\nquery: {query}")))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Random schemas

const RTABLES: &[&str] = &["t0", "t1", "t2", "t3"];

#[derive(Debug, Clone)]
struct RandomSchema {
    /// Per table, the kinds of its columns after `id` (an int primary key).
    kinds: Vec<Vec<ColumnKind>>,
}

fn random_schema() -> impl Strategy<Value = RandomSchema> {
    proptest::collection::vec(
        proptest::collection::vec(prop_oneof![Just(N), Just(S)], 1..4),
        2..=RTABLES.len(),
    )
    .prop_map(|kinds| RandomSchema { kinds })
}

impl RandomSchema {
    fn source(&self) -> MemSource {
        let mut src = MemSource::default();
        for (t, kinds) in self.kinds.iter().enumerate() {
            let names: Vec<String> = (0..=kinds.len()).map(col_name).collect();
            let mut cols: Vec<(&str, ColumnKind)> = vec![(names[0].as_str(), N)];
            cols.extend(
                kinds
                    .iter()
                    .enumerate()
                    .map(|(j, k)| (names[j + 1].as_str(), *k)),
            );
            src.def(RTABLES[t], &cols, &[0]);
        }
        src
    }

    fn kind(&self, t: usize, col: usize) -> ColumnKind {
        if col == 0 {
            N
        } else {
            self.kinds[t][col - 1]
        }
    }

    fn width(&self, t: usize) -> usize {
        self.kinds[t].len() + 1
    }
}

fn col_name(j: usize) -> String {
    if j == 0 {
        "id".into()
    } else {
        format!("c{j}")
    }
}

fn random_row(s: &RandomSchema, t: usize) -> BoxedStrategy<Row> {
    let mut cols: Vec<BoxedStrategy<Value>> = vec![(0..8i64).prop_map(Value::Int).boxed()];
    for k in &s.kinds[t] {
        cols.push(if *k == N {
            opt_int(4).boxed()
        } else {
            opt_text(WORDS).boxed()
        });
    }
    cols.boxed()
}

fn random_op(s: &RandomSchema) -> BoxedStrategy<Op> {
    let tables: Vec<BoxedStrategy<Op>> = (0..s.kinds.len())
        .map(|t| {
            let name = RTABLES[t];
            prop_oneof![
                5 => random_row(s, t).prop_map(move |r| Op::Put(name, r)),
                2 => random_row(s, t).prop_map(move |r| Op::Delete(name, r)),
                1 => (random_row(s, t), random_row(s, t))
                    .prop_map(move |(a, b)| Op::Rekey(name, a, b)),
            ]
            .boxed()
        })
        .collect();
    proptest::strategy::Union::new(tables).boxed()
}

/// The query generator's choices, read from a tape that proptest draws and shrinks: each
/// decision takes the next number, and a number shrunk to 0 (or a tape shortened past it)
/// picks the simplest option, so a failing case shrinks its query too, not only its data.
struct Dice {
    tape: Vec<u16>,
    next: usize,
}

impl Dice {
    fn below(&mut self, n: usize) -> usize {
        let value = self.tape.get(self.next).copied().unwrap_or(0);
        self.next += 1;
        value as usize % n.max(1)
    }

    /// 0 on the tape means "no": the feature is left out of the query.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) >= 100 - percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A query's choice tape: long enough for two levels of subqueries with nested conditions.
fn query_tape() -> impl Strategy<Value = Vec<u16>> {
    proptest::collection::vec(0u16..1000, 0..120)
}

fn random_query(s: &RandomSchema, tape: Vec<u16>) -> Json {
    let mut d = Dice { tape, next: 0 };
    let t = d.below(s.kinds.len());
    random_level(s, &mut d, t, 0)
}

fn random_level(s: &RandomSchema, d: &mut Dice, t: usize, depth: usize) -> Json {
    let mut q = json!({"table": RTABLES[t]});
    if d.chance(60) {
        q["where"] = random_condition(s, d, t, depth, 0);
    }
    let order: Vec<Json> = (0..d.below(3))
        .map(|_| json!([col_name(d.below(s.width(t))), *d.pick(&["asc", "desc"])]))
        .collect();
    q["orderBy"] = Json::Array(order);
    if d.chance(50) {
        q["limit"] = json!(d.below(5));
    }
    if depth < 2 && d.chance(50) {
        let related: Vec<Json> = (0..1 + d.below(2))
            .map(|i| {
                let u = d.below(s.kinds.len());
                let (a, b) = join_columns(s, d, t, u);
                let mut sub = random_level(s, d, u, depth + 1);
                sub["alias"] = json!(format!("r{i}"));
                json!({"correlation": corr(&col_name(a), &col_name(b)), "subquery": sub})
            })
            .collect();
        q["related"] = Json::Array(related);
    }
    q
}

/// A parent and a child column of the same type (ids always qualify).
fn join_columns(s: &RandomSchema, d: &mut Dice, t: usize, u: usize) -> (usize, usize) {
    for _ in 0..4 {
        let a = d.below(s.width(t));
        let b = d.below(s.width(u));
        if s.kind(t, a) == s.kind(u, b) {
            return (a, b);
        }
    }
    (0, 0)
}

fn random_condition(s: &RandomSchema, d: &mut Dice, t: usize, depth: usize, nest: usize) -> Json {
    match d.below(10) {
        6 | 7 if depth < 2 => {
            let u = d.below(s.kinds.len());
            let (a, b) = join_columns(s, d, t, u);
            let mut sub = random_level(s, d, u, depth + 1);
            sub["alias"] = json!("e");
            let op = *d.pick(&["EXISTS", "NOT EXISTS"]);
            exists(
                op,
                json!({"correlation": corr(&col_name(a), &col_name(b)), "subquery": sub}),
            )
        }
        8 | 9 if nest < 2 => {
            let op = *d.pick(&["and", "or"]);
            let conditions: Vec<Json> = (0..2)
                .map(|_| random_condition(s, d, t, depth, nest + 1))
                .collect();
            json!({"type": op, "conditions": conditions})
        }
        _ => {
            let col = d.below(s.width(t));
            let name = col_name(col);
            if s.kind(t, col) == N {
                let op = *d.pick(&["=", "!=", "<", ">", "<=", ">=", "IS", "IS NOT"]);
                let value = if op.starts_with("IS") && d.chance(50) {
                    Json::Null
                } else {
                    json!(d.below(4))
                };
                simple(&name, op, value)
            } else {
                let op = *d.pick(&["=", "!=", "<", ">", "LIKE", "NOT LIKE", "ILIKE", "IS NOT"]);
                let value = match op {
                    "IS NOT" => Json::Null,
                    "LIKE" | "NOT LIKE" | "ILIKE" => json!(*d.pick(&["a%", "%b", "_", "A%", "é"])),
                    _ => json!(*d.pick(WORDS)),
                };
                simple(&name, op, value)
            }
        }
    }
}

/// Data built for the reference kit's query shape: the window refills from past its bound
/// when members leave, and a sort-key edit moves a row across the window's edge.
#[test]
fn window_refills_and_rows_cross_the_edge() {
    let src = schema();
    let mut ops = Vec::new();
    for id in 0..10 {
        ops.push(Op::Put(
            "issue",
            vec![
                Value::Int(id),
                Value::Text("open".into()),
                Value::Int(id % 3),
                Value::Int(id),
                Value::Text(format!("t{id}")),
            ],
        ));
    }
    apply(&src, &ops);
    let query = json!({"table":"issue","where":simple("status","=",json!("open")),
        "orderBy":[["pri","desc"]],"limit":3});
    let ast = parse_ast(&query).unwrap();
    let mut live = LiveQuery::hydrate(&ast, &src).unwrap();
    let ids = |live: &LiveQuery| -> Vec<i64> {
        live.roots()
            .iter()
            .map(|r| match r[0] {
                Value::Int(i) => i,
                _ => unreachable!(),
            })
            .collect()
    };
    assert_eq!(ids(&live), [9, 8, 7]);
    // Close 9: 6 refills the window.
    let mut closed = src.all("issue")[9].clone();
    closed[1] = Value::Text("closed".into());
    let changes = apply(&src, &[Op::Put("issue", closed)]);
    live.push(&changes, &src).unwrap();
    assert_eq!(ids(&live), [8, 7, 6]);
    // Lower 8's priority below the edge: 5 comes in, 8 goes out.
    let mut lowered = src.all("issue")[8].clone();
    lowered[3] = Value::Int(-1);
    let changes = apply(&src, &[Op::Put("issue", lowered)]);
    let touched = live.push(&changes, &src).unwrap();
    assert_eq!(ids(&live), [7, 6, 5]);
    assert!(touched.contains(&key("issue", 8)));
    assert!(!live.rows().contains_key(&key("issue", 8)));
    // Raise 0 above everything: it enters first, 5 leaves.
    let mut raised = src.all("issue")[0].clone();
    raised[3] = Value::Int(100);
    let changes = apply(&src, &[Op::Put("issue", raised)]);
    live.push(&changes, &src).unwrap();
    assert_eq!(ids(&live), [0, 7, 6]);
    check_equal(&live, &src, &ast).unwrap();
}

fn issue(id: i64, status: &str, owner: Option<i64>, pri: i64) -> Row {
    vec![
        Value::Int(id),
        Value::Text(status.into()),
        owner.map_or(Value::Null, Value::Int),
        Value::Int(pri),
        Value::Text(format!("t{id}")),
    ]
}

fn comment(id: i64, issue: i64, body: &str) -> Row {
    vec![
        Value::Int(id),
        Value::Int(issue),
        Value::Null,
        Value::Text(body.into()),
    ]
}

fn key(table: &str, id: i64) -> RowKey {
    RowKey::new(table, format!("{{\"id\":{id}}}"))
}

/// Pushes `ops`, checks the result against a fresh evaluation, returns the touched keys.
fn step(
    live: &mut LiveQuery,
    src: &MemSource,
    ast: &zcache::zql::Ast,
    ops: &[Op],
) -> std::collections::HashSet<RowKey> {
    let changes = apply(src, ops);
    let touched = live.push(&changes, src).unwrap();
    check_equal(live, src, ast).unwrap();
    touched
}

/// A child change flips an EXISTS: the parent enters with the child that made it, and
/// leaves when its last matching child goes; a NOT EXISTS does the opposite.
#[test]
fn a_child_change_flips_exists_and_not_exists() {
    for op in ["EXISTS", "NOT EXISTS"] {
        let src = schema();
        apply(&src, &[Op::Put("issue", issue(1, "open", None, 1))]);
        let q = json!({"table":"issue","where":exists(op, json!({"correlation":corr("id","issue"),
            "subquery":{"table":"comment","alias":"c","where":simple("body","LIKE",json!("a%"))}}))});
        let ast = parse_ast(&q).unwrap();
        let mut live = LiveQuery::hydrate(&ast, &src).unwrap();
        let present = |live: &LiveQuery| live.rows().contains_key(&key("issue", 1));
        assert_eq!(present(&live), op == "NOT EXISTS");
        // A comment that does not match changes nothing.
        let touched = step(
            &mut live,
            &src,
            &ast,
            &[Op::Put("comment", comment(10, 1, "b"))],
        );
        assert!(touched.iter().all(|k| k.table() != "issue") || op == "NOT EXISTS");
        assert_eq!(present(&live), op == "NOT EXISTS");
        // A matching one flips it, and is synced with it under EXISTS.
        step(
            &mut live,
            &src,
            &ast,
            &[Op::Put("comment", comment(11, 1, "ab"))],
        );
        assert_eq!(present(&live), op == "EXISTS");
        assert_eq!(
            live.rows().contains_key(&key("comment", 11)),
            op == "EXISTS"
        );
        // Editing it to no longer match flips it back.
        step(
            &mut live,
            &src,
            &ast,
            &[Op::Put("comment", comment(11, 1, "zz"))],
        );
        assert_eq!(present(&live), op == "NOT EXISTS");
        assert!(!live.rows().contains_key(&key("comment", 11)));
    }
}

/// A parent's join key changes: its related rows follow it (old ones leave, new ones come).
#[test]
fn a_parent_key_change_moves_its_related_rows() {
    let src = schema();
    apply(
        &src,
        &[
            Op::Put(
                "user",
                vec![Value::Int(1), Value::Text("ann".into()), Value::Int(1)],
            ),
            Op::Put(
                "user",
                vec![Value::Int(2), Value::Text("bob".into()), Value::Int(2)],
            ),
            Op::Put("issue", issue(1, "open", Some(1), 1)),
        ],
    );
    let q = json!({"table":"issue","related":[{"correlation":corr("owner","id"),
        "subquery":{"table":"user","alias":"owner"}}]});
    let ast = parse_ast(&q).unwrap();
    let mut live = LiveQuery::hydrate(&ast, &src).unwrap();
    assert!(live.rows().contains_key(&key("user", 1)));
    let touched = step(
        &mut live,
        &src,
        &ast,
        &[Op::Put("issue", issue(1, "open", Some(2), 1))],
    );
    assert!(touched.contains(&key("user", 1)) && touched.contains(&key("user", 2)));
    assert!(!live.rows().contains_key(&key("user", 1)));
    assert!(live.rows().contains_key(&key("user", 2)));
    // An edit of the related row itself is a touched row with its new contents.
    let touched = step(
        &mut live,
        &src,
        &ast,
        &[Op::Put(
            "user",
            vec![Value::Int(2), Value::Text("bo".into()), Value::Int(2)],
        )],
    );
    assert!(touched.contains(&key("user", 2)));
    assert_eq!(live.rows()[&key("user", 2)].0[1], Value::Text("bo".into()));
    // A user nobody references changes nothing.
    let touched = step(
        &mut live,
        &src,
        &ast,
        &[Op::Put(
            "user",
            vec![Value::Int(1), Value::Text("x".into()), Value::Null],
        )],
    );
    assert!(touched.is_empty());
}

/// Per-parent limits: a new child enters its parent's window and pushes the last one out.
#[test]
fn a_child_enters_its_parents_window_and_evicts_the_last() {
    let src = schema();
    apply(
        &src,
        &[
            Op::Put("issue", issue(1, "open", None, 1)),
            Op::Put("comment", comment(1, 1, "b")),
            Op::Put("comment", comment(2, 1, "c")),
        ],
    );
    let q = json!({"table":"issue","related":[{"correlation":corr("id","issue"),
        "subquery":{"table":"comment","alias":"comments","orderBy":[["body","desc"]],"limit":2}}]});
    let ast = parse_ast(&q).unwrap();
    let mut live = LiveQuery::hydrate(&ast, &src).unwrap();
    step(
        &mut live,
        &src,
        &ast,
        &[Op::Put("comment", comment(3, 1, "d"))],
    );
    assert!(live.rows().contains_key(&key("comment", 3)));
    assert!(
        !live.rows().contains_key(&key("comment", 1)),
        "b fell out of the top 2"
    );
    step(
        &mut live,
        &src,
        &ast,
        &[Op::Delete("comment", comment(3, 1, "d"))],
    );
    assert!(
        live.rows().contains_key(&key("comment", 1)),
        "and came back"
    );
}

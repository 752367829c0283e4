//! Differential test of incremental query maintenance over the real pipeline: a real
//! PostgreSQL, the initial sync, the replicator streaming random transactions into the SQLite
//! replica, the changed rows it lists per version (`apply.rs`), a group's `Pending` gathering
//! them across versions (`pending.rs`), and `LiveQuery::push` (`ivm.rs`) reading the replica.
//!
//! Two client groups hold the same live queries: an eager one advances after every version,
//! a lagging one gathers 1 to 3 versions before it advances (and now and then puts back what
//! it took, as an advance that found its snapshot too new does). After every advance each
//! query's rows (with their path counts) and roots (in order) must equal a fresh evaluation in
//! the same replica snapshot, and every row whose count or contents changed must be reported
//! as touched. Each version's changed-row list is also checked directly against the replica:
//! every row that changed is listed, with the state it had before the version; a TRUNCATE
//! comes without a list, and the groups then re-hydrate.
//!
//! Seeded: IVM_REPLICA_SEED (default below) and IVM_REPLICA_TXNS pick another run.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use glommio::channels::shared_channel::ConnectedReceiver;
use serde_json::{json, Value as Json};
use support::*;
use zcache::embedded::pgcluster::PgCluster;
use zcache::replicator::apply::CHANGED_ROWS_PER_VERSION_MAX;
use zcache::shards::pending::Pending;
use zcache::shards::routes::{interests_of, Interest, Routes};
use zcache::shards::VersionReady;
use zcache::sqlite::ReplicaReader;
use zcache::zql::eval::RowCounts;
use zcache::zql::ivm::{LiveQuery, RowKey};
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, parse_ast, Ast};

const SEED_DEFAULT: u64 = 0x1f0_2025;
/// Upstream transactions streamed per run; each takes a few milliseconds of psql.
const TXNS_DEFAULT: usize = 200;
/// Transactions that truncate whatever else they draw (besides rare random truncates).
const FORCED_TRUNCATE_AT: [usize; 2] = [60, 140];
/// The transaction that also changes more rows than a version lists.
const OVERFLOW_AT: usize = 100;
/// Versions the lagging group gathers at most before it advances.
const LAG_VERSIONS_MAX: usize = 3;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// A seeded generator (splitmix64): the run is reproducible from its seed.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn int(&mut self, n: i64) -> i64 {
        self.below(n as u64) as i64
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream: the schema of tests/zql_ivm.rs, with a text key on label (so a composite key mixes
// an integer and a text) and a tick table every transaction writes, so each has a version.

const SCHEMA: &str = r#"
CREATE TABLE "user" (id int4 PRIMARY KEY, name text, n int4);
CREATE TABLE issue (id int4 PRIMARY KEY, status text, owner int4, pri int8, title text);
CREATE TABLE comment (id int4 PRIMARY KEY, issue int4, author int4, body text);
CREATE TABLE label (id text PRIMARY KEY, name text);
CREATE TABLE issue_label (issue int4, label text, PRIMARY KEY (issue, label));
CREATE TABLE tick (id int4 PRIMARY KEY, n int4);
"#;

/// The replica tables, as the test reads them back.
const TABLES: [&str; 6] = ["user", "issue", "comment", "label", "issue_label", "tick"];
const USERS: i64 = 6;
const ISSUES: i64 = 14;
const COMMENTS: i64 = 24;
const STATUSES: &[&str] = &["open", "closed", "wip"];
const WORDS: &[&str] = &["a", "ab", "b", "ba", "é", "Z", "", "A'x"];
const LABELS: &[&str] = &["bug", "é", "q\"x", "it's"];

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A nullable integer below `n` (null one time in seven).
fn opt_int(rng: &mut Rng, n: i64) -> String {
    if rng.chance(1, 7) {
        "NULL".into()
    } else {
        rng.int(n).to_string()
    }
}

fn opt_text(rng: &mut Rng, choices: &[&str]) -> String {
    if rng.chance(1, 7) {
        "NULL".into()
    } else {
        lit(rng.pick(choices))
    }
}

/// One table's generator: its key, its other columns and a random value for each.
#[derive(Clone, Copy)]
enum T {
    User,
    Issue,
    Comment,
    Label,
    IssueLabel,
}

const GENERATED: [T; 5] = [T::User, T::Issue, T::Comment, T::Label, T::IssueLabel];

impl T {
    fn sql_name(self) -> &'static str {
        match self {
            T::User => "\"user\"",
            T::Issue => "issue",
            T::Comment => "comment",
            T::Label => "label",
            T::IssueLabel => "issue_label",
        }
    }

    fn key_columns(self) -> &'static [&'static str] {
        match self {
            T::IssueLabel => &["issue", "label"],
            _ => &["id"],
        }
    }

    fn value_columns(self) -> &'static [&'static str] {
        match self {
            T::User => &["name", "n"],
            T::Issue => &["status", "owner", "pri", "title"],
            T::Comment => &["issue", "author", "body"],
            T::Label => &["name"],
            T::IssueLabel => &[],
        }
    }

    /// A key, drawn from a small range so that operations collide.
    fn key(self, rng: &mut Rng) -> Vec<String> {
        match self {
            T::User => vec![rng.int(USERS).to_string()],
            T::Issue => vec![rng.int(ISSUES).to_string()],
            T::Comment => vec![rng.int(COMMENTS).to_string()],
            T::Label => vec![lit(rng.pick(LABELS))],
            T::IssueLabel => vec![rng.int(ISSUES).to_string(), lit(rng.pick(LABELS))],
        }
    }

    fn value(self, column: &str, rng: &mut Rng) -> String {
        match column {
            "name" | "title" | "body" => opt_text(rng, WORDS),
            "n" => opt_int(rng, 5),
            "status" => opt_text(rng, STATUSES),
            "owner" | "author" => opt_int(rng, USERS),
            "pri" => opt_int(rng, 4),
            "issue" => opt_int(rng, ISSUES),
            other => unreachable!("no generator for {other}"),
        }
    }

    fn key_where(self, key: &[String]) -> String {
        let parts: Vec<String> = self
            .key_columns()
            .iter()
            .zip(key)
            .map(|(c, v)| format!("{c} = {v}"))
            .collect();
        parts.join(" AND ")
    }
}

/// A full-row upsert: an insert, or an update of every non-key column.
fn upsert(t: T, rng: &mut Rng) -> String {
    let key = t.key(rng);
    let values: Vec<String> = t.value_columns().iter().map(|c| t.value(c, rng)).collect();
    let all: Vec<String> = key.iter().chain(&values).cloned().collect();
    let on_conflict = if values.is_empty() {
        "DO NOTHING".to_string()
    } else {
        let sets: Vec<String> = t
            .value_columns()
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        format!("DO UPDATE SET {}", sets.join(", "))
    };
    format!(
        "INSERT INTO {} VALUES ({}) ON CONFLICT ({}) {on_conflict};",
        t.sql_name(),
        all.join(", "),
        t.key_columns().join(", ")
    )
}

/// One random statement (or a few, for the multi-row and truncating ones).
fn statement(rng: &mut Rng) -> String {
    let t = rng.pick(&GENERATED);
    let name = t.sql_name();
    match rng.below(20) {
        0..=6 => upsert(t, rng),
        // An update of one filter, sort or join column.
        7..=10 => match t.value_columns() {
            [] => upsert(t, rng),
            cols => {
                let col = rng.pick(cols);
                let key = t.key(rng);
                format!(
                    "UPDATE {name} SET {col} = {} WHERE {};",
                    t.value(col, rng),
                    t.key_where(&key)
                )
            }
        },
        // A primary-key change (none when the new key is taken), sometimes with a value.
        11..=13 => {
            let (from, to) = (t.key(rng), t.key(rng));
            let mut sets: Vec<String> = t
                .key_columns()
                .iter()
                .zip(&to)
                .map(|(c, v)| format!("{c} = {v}"))
                .collect();
            if let (false, [col, ..]) = (rng.chance(1, 2), t.value_columns()) {
                sets.push(format!("{col} = {}", t.value(col, rng)));
            }
            format!(
                "UPDATE {name} SET {} WHERE {} AND NOT EXISTS (SELECT FROM {name} WHERE {});",
                sets.join(", "),
                t.key_where(&from),
                t.key_where(&to)
            )
        }
        14..=16 => format!("DELETE FROM {name} WHERE {};", t.key_where(&t.key(rng))),
        // Statements changing several rows at once.
        17 => format!(
            "UPDATE issue SET pri = coalesce(pri, 0) + 1 WHERE status = {};",
            lit(rng.pick(STATUSES))
        ),
        18 => format!(
            "UPDATE comment SET issue = {} WHERE issue = {};",
            rng.int(ISSUES),
            rng.int(ISSUES)
        ),
        19 if rng.chance(1, 2) => format!("DELETE FROM comment WHERE author = {};", rng.int(USERS)),
        // Two rows swap keys through a free one: each key is reused within the transaction.
        _ => {
            let (t, n) = if rng.chance(1, 2) {
                ("\"user\"", USERS)
            } else {
                ("issue", ISSUES)
            };
            let (a, b, free) = (rng.int(n), rng.int(n), n + 50);
            format!(
                "UPDATE {t} SET id = {free} WHERE id = {a};\n\
                 UPDATE {t} SET id = {a} WHERE id = {b} AND NOT EXISTS (SELECT FROM {t} WHERE id = {a});\n\
                 UPDATE {t} SET id = {b} WHERE id = {free} AND NOT EXISTS (SELECT FROM {t} WHERE id = {b});"
            )
        }
    }
}

/// A TRUNCATE of one or two tables, sometimes refilled in the same transaction.
fn truncate(rng: &mut Rng) -> String {
    let mut names = vec![rng.pick(&GENERATED).sql_name()];
    if rng.chance(1, 2) {
        names.push(rng.pick(&GENERATED).sql_name());
    }
    names.sort();
    names.dedup();
    let mut sql = format!("TRUNCATE {};\n", names.join(", "));
    for _ in 0..rng.below(4) {
        sql.push_str(&upsert(rng.pick(&GENERATED), rng));
        sql.push('\n');
    }
    sql
}

/// Why a transaction's version comes without its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unlisted {
    No,
    Truncate,
    /// More changed rows than `CHANGED_ROWS_PER_VERSION_MAX`.
    Overflow,
}

/// One upstream transaction: its SQL and whether its version lists its rows.
fn transaction(rng: &mut Rng, i: usize) -> (String, Unlisted) {
    let statements = if rng.chance(1, 6) {
        4 + rng.below(6) // several tables at once
    } else {
        1 + rng.below(3)
    };
    let mut sql = String::new();
    for _ in 0..statements {
        sql.push_str(&statement(rng));
        sql.push('\n');
    }
    let mut unlisted = Unlisted::No;
    if FORCED_TRUNCATE_AT.contains(&i) || rng.chance(1, 80) {
        sql.push_str(&truncate(rng));
        unlisted = Unlisted::Truncate;
    } else if i == OVERFLOW_AT {
        // Rows no query reads come and go, next to the changes drawn above.
        let rows = CHANGED_ROWS_PER_VERSION_MAX as i64 / 2 + 1;
        sql.push_str(&format!(
            "INSERT INTO tick SELECT g, g FROM generate_series(2, {}) g;\n\
             DELETE FROM tick WHERE id > 1;\n",
            rows + 1
        ));
        unlisted = Unlisted::Overflow;
    }
    // Every transaction writes something, so each comes as a version.
    sql.push_str(&format!(
        "INSERT INTO tick VALUES (1, {i}) ON CONFLICT (id) DO UPDATE SET n = {i};\n"
    ));
    (sql, unlisted)
}

fn initial_data(rng: &mut Rng) -> String {
    let mut sql = String::new();
    for _ in 0..60 {
        sql.push_str(&upsert(rng.pick(&GENERATED), rng));
        sql.push('\n');
    }
    sql
}

// ---------------------------------------------------------------------------------------------
// The queries: the shapes of tests/zql_ivm.rs with fixed parameters.

fn simple(col: &str, op: &str, value: Json) -> Json {
    json!({"type":"simple","left":{"type":"column","name":col},"op":op,"right":{"type":"literal","value":value}})
}

fn corr(parent: &str, child: &str) -> Json {
    json!({"parentField":[parent],"childField":[child]})
}

fn exists(op: &str, related: Json) -> Json {
    json!({"type":"correlatedSubquery","op":op,"related":related})
}

struct Params {
    limit: Option<u64>,
    order: Json,
    status: &'static str,
    child_limit: Option<u64>,
    k: i64,
    flag: bool,
}

fn query(shape: usize, p: &Params) -> Json {
    let mut comments = json!({"table":"comment","alias":"comments","orderBy":[["body","desc"]]});
    if let Some(l) = p.child_limit {
        comments["limit"] = json!(l);
    }
    let comments_rel = json!({"correlation":corr("id","issue"),"subquery":comments.clone()});
    let owner_rel =
        json!({"correlation":corr("owner","id"),"subquery":{"table":"user","alias":"owner"}});
    let labels_rel = json!({"correlation":corr("id","issue"),"hidden":true,
        "subquery":{"table":"issue_label","alias":"labels","related":[{
            "correlation":corr("label","id"),
            "subquery":{"table":"label","alias":"labels","orderBy":[["name","asc"]]}}]}});
    let mut q = json!({"table":"issue","orderBy":p.order.clone()});
    match shape {
        // Filter, order, limit, related many (per-parent limit) and one.
        0 => {
            q["where"] = simple("status", "=", json!(p.status));
            q["related"] = json!([comments_rel, owner_rel]);
        }
        // EXISTS / NOT EXISTS with a limited subquery.
        1 => {
            let op = if p.flag { "EXISTS" } else { "NOT EXISTS" };
            let mut sub =
                json!({"table":"comment","alias":"c","where":simple("body","LIKE",json!("a%"))});
            if let Some(l) = p.child_limit {
                sub["limit"] = json!(l);
            }
            q["where"] = exists(op, json!({"correlation":corr("id","issue"),"subquery":sub}));
            q["related"] = json!([owner_rel]);
        }
        // OR with EXISTS.
        2 => {
            q["where"] = json!({"type":"or","conditions":[
                simple("status","=",json!(p.status)),
                exists("EXISTS", json!({"correlation":corr("owner","id"),
                    "subquery":{"table":"user","alias":"o","where":simple("n",">",json!(p.k))}}))]});
        }
        // A junction hop (hidden issue_label) to labels.
        3 => {
            q["where"] = if p.flag {
                simple("pri", ">=", json!(p.k))
            } else {
                simple("pri", "IS NOT", Json::Null)
            };
            q["related"] = json!([labels_rel]);
        }
        // Nested: issues with their comments, each with its author.
        4 => {
            let mut nested = comments.clone();
            nested["related"] = json!([{"correlation":corr("author","id"),
                "subquery":{"table":"user","alias":"author"}}]);
            q["related"] = json!([{"correlation":corr("id","issue"),"subquery":nested}]);
            q["where"] = json!({"type":"and","conditions":[
                simple("status","!=",json!(p.status)),
                exists("EXISTS", json!({"correlation":corr("owner","id"),
                    "subquery":{"table":"user","alias":"o"}}))]});
        }
        // Comments of issues in a status whose owner has n > k (EXISTS nested in EXISTS).
        5 => {
            let issue_sub = json!({"table":"issue","alias":"i","where":{"type":"and","conditions":[
                simple("status","=",json!(p.status)),
                exists("EXISTS", json!({"correlation":corr("owner","id"),
                    "subquery":{"table":"user","alias":"u","where":simple("n",">",json!(p.k))}}))]}});
            q = json!({"table":"comment","orderBy":[["issue","asc"]],
                "where":exists("EXISTS", json!({"correlation":corr("issue","id"),"subquery":issue_sub})),
                "related":[{"correlation":corr("issue","id"),"subquery":{"table":"issue","alias":"issue",
                    "related":[owner_rel]}}]});
        }
        // A start cursor.
        6 => {
            q["start"] = json!({"row":{"id":p.k,"pri":p.k,"status":p.status,"title":"b"},
                "exclusive":p.flag});
            q["orderBy"] = json!([["pri", "asc"]]);
            q["related"] = json!([comments_rel]);
        }
        // Users with their issues (a per-parent limit) and, under each, its labels.
        7 => {
            let mut issues = json!({"table":"issue","alias":"issues","orderBy":[["pri","desc"]],
                "related":[labels_rel]});
            if let Some(l) = p.child_limit {
                issues["limit"] = json!(l);
            }
            q = json!({"table":"user","orderBy":[["name","asc"]],
                "related":[{"correlation":corr("id","owner"),"subquery":issues}]});
        }
        // Pinned roots (one issue's comments, one owner's open issues): routed by value.
        9 => {
            q = json!({"table":"comment","orderBy":[["id","asc"]],
                "where":simple("issue","=",json!(p.k)),
                "related":[{"correlation":corr("issue","id"),"subquery":{"table":"issue","alias":"issue"}}]});
        }
        10 => {
            q["where"] = json!({"type":"and","conditions":[
                simple("owner","=",json!(p.k)), simple("status","=",json!(p.status))]});
            q["related"] = json!([comments_rel]);
        }
        // OR with NOT EXISTS over the junction table.
        _ => {
            q["where"] = json!({"type":"or","conditions":[
                simple("title","ILIKE",json!("A%")),
                exists("NOT EXISTS", json!({"correlation":corr("id","issue"),
                    "subquery":{"table":"issue_label","alias":"l"}}))]});
        }
    }
    if let Some(l) = p.limit {
        q["limit"] = json!(l);
    }
    q
}

fn queries() -> Vec<(String, Ast)> {
    let pri_desc = || json!([["pri", "desc"]]);
    let pri_status = || json!([["pri", "asc"], ["status", "desc"]]);
    let title = || json!([["title", "asc"]]);
    let p = |limit, order, status, child_limit, k, flag| Params {
        limit,
        order,
        status,
        child_limit,
        k,
        flag,
    };
    let list = vec![
        (0, p(Some(3), pri_desc(), "open", Some(2), 0, false)),
        (0, p(None, json!([]), "closed", None, 0, false)),
        (1, p(None, title(), "open", None, 0, true)),
        (1, p(Some(2), pri_status(), "open", Some(1), 0, false)),
        (2, p(Some(4), pri_desc(), "closed", None, 2, false)),
        (3, p(None, json!([]), "open", None, 1, true)),
        (3, p(Some(2), title(), "open", None, 0, false)),
        (4, p(Some(3), pri_desc(), "closed", Some(2), 0, false)),
        (5, p(None, json!([]), "open", None, 1, false)),
        (5, p(Some(2), json!([]), "wip", None, 0, false)),
        (6, p(Some(3), json!([]), "open", Some(1), 1, true)),
        (6, p(None, json!([]), "wip", None, 2, false)),
        (7, p(Some(3), json!([]), "open", Some(1), 0, false)),
        (7, p(None, json!([]), "open", None, 0, false)),
        (8, p(Some(3), pri_status(), "open", None, 0, false)),
        (9, p(None, json!([]), "open", None, 3, false)),
        (10, p(Some(2), pri_desc(), "open", Some(1), 1, false)),
        (10, p(None, json!([]), "closed", None, 2, false)),
    ];
    list.into_iter()
        .enumerate()
        .map(|(i, (shape, params))| {
            let json = query(shape, &params);
            let ast = parse_ast(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
            (format!("q{i} (shape {shape}): {json}"), ast)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Client groups

/// What every group's advance checks and counts.
#[derive(Default, Debug)]
struct Stats {
    advances: usize,
    pushes: usize,
    rehydrations: usize,
    restores: usize,
    changes_pushed: usize,
    /// Query checks where the maintained result was not empty.
    nonempty_checks: usize,
    /// Per query: pushes that changed some row of its result.
    result_changes: Vec<usize>,
    /// Per query, the versions the routes sent its routed group, and whether its root is
    /// pinned by a value.
    routed: Vec<(usize, bool)>,
}

struct Group {
    name: &'static str,
    pending: Pending,
    live: Vec<LiveQuery>,
    /// Versions noted since the last advance.
    noted: usize,
    /// The newest version noted.
    watermark: u64,
}

impl Group {
    fn new(name: &'static str, queries: &[(String, Ast)], reader: &ReplicaReader) -> Self {
        reader.begin_snapshot().expect("snapshot");
        let live = queries
            .iter()
            .map(|(q, ast)| {
                let live =
                    LiveQuery::hydrate(ast, reader).unwrap_or_else(|e| panic!("hydrate {q}: {e}"));
                if let Err(e) = compare(&live, reader, ast) {
                    panic!("{name}: hydrated {q}: {e}");
                }
                live
            })
            .collect();
        reader.end_snapshot().expect("end snapshot");
        Group {
            name,
            pending: Pending::default(),
            live,
            noted: 0,
            watermark: 0,
        }
    }

    fn note(&mut self, v: &VersionReady) {
        self.pending.note(v);
        self.noted += 1;
        self.watermark = self.watermark.max(v.watermark);
    }

    /// Advances as `shards::group` does: takes what is pending, reads the changed rows in a
    /// new snapshot, pushes them into (or re-hydrates) the queries reading a changed table;
    /// then checks every query against a fresh evaluation in that snapshot.
    fn advance(
        &mut self,
        reader: &ReplicaReader,
        queries: &[(String, Ast)],
        at: &str,
        stats: &mut Stats,
    ) {
        let pending = std::mem::take(&mut self.pending);
        self.noted = 0;
        stats.advances += 1;
        let snapshot = reader.begin_snapshot().expect("snapshot");
        // Versions are awaited before the next commit: the snapshot has nothing unannounced.
        assert!(
            snapshot >= self.watermark,
            "a snapshot older than its versions"
        );
        let changes = pending.changes(reader).expect("changed rows");
        if let Some(c) = &changes {
            stats.changes_pushed += c.len();
        }
        stats.result_changes.resize(queries.len(), 0);
        for (n, (live, (q, ast))) in self.live.iter_mut().zip(queries).enumerate() {
            let ctx = || format!("{}: {q}, advancing {at}", self.name);
            if !pending.tables.iter().any(|t| live.reads(t)) {
                if let Err(e) = compare(live, reader, ast) {
                    panic!("{}: {e}\n(an untouched query)", ctx());
                }
                continue;
            }
            match &changes {
                Some(changes) => {
                    stats.pushes += 1;
                    let before = live.rows().clone();
                    let touched = live
                        .push(changes, reader)
                        .unwrap_or_else(|e| panic!("{}: push failed: {e}", ctx()));
                    if let Err(e) = compare(live, reader, ast)
                        .and_then(|()| check_touched(&before, live.rows(), &touched))
                    {
                        panic!("{}: {e}\npushed changes: {changes:#?}", ctx());
                    }
                    if &before != live.rows() {
                        stats.result_changes[n] += 1;
                    }
                }
                None => {
                    stats.rehydrations += 1;
                    *live = LiveQuery::hydrate(ast, reader)
                        .unwrap_or_else(|e| panic!("{}: re-hydrate failed: {e}", ctx()));
                    if let Err(e) = compare(live, reader, ast) {
                        panic!("{}: {e}\n(re-hydrated)", ctx());
                    }
                }
            }
            if !live.rows().is_empty() {
                stats.nonempty_checks += 1;
            }
        }
        reader.end_snapshot().expect("end snapshot");
    }
}

/// Every row whose count or contents changed is reported as touched (the CVR learns of
/// changes through these keys only).
fn check_touched(
    before: &RowCounts,
    after: &RowCounts,
    touched: &HashSet<RowKey>,
) -> Result<(), String> {
    let keys: BTreeSet<&RowKey> = before.keys().chain(after.keys()).collect();
    for k in keys {
        if before.get(k) != after.get(k) && !touched.contains(k) {
            return Err(format!(
                "{k:?} changed ({:?} -> {:?}) but was not reported as touched",
                before.get(k),
                after.get(k)
            ));
        }
    }
    Ok(())
}

fn sorted(m: &RowCounts) -> Vec<(RowKey, Row, u32)> {
    let mut v: Vec<_> = m
        .iter()
        .map(|(k, (r, n))| (k.clone(), r.clone(), *n))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The maintained result equals a fresh evaluation in the reader's open snapshot: the same
/// roots in the same order, the same rows with the same path counts.
fn compare(live: &LiveQuery, reader: &ReplicaReader, ast: &Ast) -> Result<(), String> {
    let fresh = evaluate(ast, reader).map_err(|e| format!("evaluate failed: {e}"))?;
    let fresh_roots: Vec<&Row> = fresh.nodes.iter().map(|n| &n.row).collect();
    let live_roots: Vec<&Row> = live.roots().iter().collect();
    if live_roots != fresh_roots {
        return Err(format!(
            "roots differ:\n  live  {live_roots:?}\n  fresh {fresh_roots:?}"
        ));
    }
    let (got, want) = (sorted(live.rows()), sorted(&fresh.rows));
    if got == want {
        return Ok(());
    }
    let got_map: BTreeMap<_, _> = got.iter().map(|(k, r, n)| (k, (r, n))).collect();
    let want_map: BTreeMap<_, _> = want.iter().map(|(k, r, n)| (k, (r, n))).collect();
    let mut lines = Vec::new();
    for k in got_map
        .keys()
        .chain(want_map.keys())
        .collect::<BTreeSet<_>>()
    {
        let (g, w) = (got_map.get(k), want_map.get(k));
        if g != w {
            lines.push(format!("  {k:?}: live {g:?}, fresh {w:?}"));
        }
    }
    Err(format!("synced rows differ:\n{}", lines.join("\n")))
}

// ---------------------------------------------------------------------------------------------
// The changed-row lists, checked against the replica itself

/// Every row of the replica, by (table, primary-key values' Debug form).
type Mirror = BTreeMap<(String, String), Row>;

fn key_text(key: &[Value]) -> String {
    format!("{key:?}")
}

fn read_mirror(reader: &ReplicaReader) -> Mirror {
    let mut out = Mirror::new();
    for table in TABLES {
        let spec = reader.table_spec(table).expect("replica table");
        for row in reader.fetch_rows(table, &[]).expect("rows") {
            let key: Vec<Value> = spec.primary_key.iter().map(|&i| row[i].clone()).collect();
            out.insert((table.to_string(), key_text(&key)), row);
        }
    }
    out
}

/// A version's list names every row that changed, each first with its state before; and
/// it is missing exactly when the transaction truncated or changed too many rows.
fn check_version_rows(
    v: &VersionReady,
    before: &Mirror,
    after: &Mirror,
    unlisted: Unlisted,
    i: usize,
) {
    let changed: BTreeSet<&(String, String)> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    let tables: BTreeSet<&str> = v.tables.iter().map(String::as_str).collect();
    for (table, _) in &changed {
        assert!(
            tables.contains(table.as_str()),
            "txn {i}: {table} changed but the version names {tables:?}"
        );
    }
    let Some(rows) = &v.rows else {
        assert!(
            unlisted != Unlisted::No,
            "txn {i}: a version without its rows, yet no TRUNCATE nor too many rows"
        );
        return;
    };
    assert_eq!(unlisted, Unlisted::No, "txn {i}: came with its row list");
    let mut first_old: HashMap<(String, String), Option<Row>> = HashMap::new();
    let mut last_new: HashMap<(String, String), Option<Row>> = HashMap::new();
    for c in rows.iter() {
        let spec_key = (c.table.clone(), key_text(&c.key));
        first_old
            .entry(spec_key.clone())
            .or_insert_with(|| c.old.clone());
        last_new.insert(spec_key, c.new.clone());
    }
    for (key, new) in &last_new {
        assert_eq!(
            new.as_ref(),
            after.get(key),
            "txn {i}: the listed state after of {key:?} is not the replica's"
        );
    }
    for (key, old) in &first_old {
        assert_eq!(
            old.as_ref(),
            before.get(key),
            "txn {i}: the listed state before of {key:?} is not the replica's"
        );
    }
    for key in changed {
        assert!(
            first_old.contains_key(key),
            "txn {i}: {key:?} changed ({:?} -> {:?}) but is not listed",
            before.get(key),
            after.get(key)
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// The versions up to and including the one of the commit at `at` (idle-watermark versions,
/// with no tables, may come before it).
async fn versions_until(rx: &ConnectedReceiver<VersionReady>, at: CommitLsn) -> Vec<VersionReady> {
    let mut out = Vec::new();
    loop {
        let v = next_version(rx).await;
        assert!(
            v.watermark <= at.after,
            "a version at {} past the commit",
            v.watermark
        );
        let done = !v.tables.is_empty();
        if done {
            assert!(
                at.contains(v.watermark),
                "a data version before the commit's"
            );
        } else {
            assert!(v.rows.as_ref().is_some_and(|r| r.is_empty()));
        }
        out.push(v);
        if done {
            return out;
        }
    }
}

fn run_pipeline(pg: &PgCluster, seed: u64, txns: usize) -> Stats {
    let mut rng = Rng(seed);
    psql(pg, SCHEMA);
    psql(pg, &initial_data(&mut rng));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    let cfg = config(pg, &path, "ivm", &[]);
    let queries = queries();
    run(async {
        let prepared = prepare(&cfg).await;
        let reader = ReplicaReader::open(&path).expect("open the replica");
        reader.begin_snapshot().expect("snapshot");
        let mut mirror = read_mirror(&reader);
        reader.end_snapshot().expect("end snapshot");
        let mut eager = Group::new("eager group", &queries, &reader);
        let mut lagging = Group::new("lagging group", &queries, &reader);
        // One group per query, hearing only of the versions the shard's routes send it.
        let mut routed: Vec<(Group, Vec<(String, Ast)>)> = queries
            .iter()
            .map(|q| {
                let one = vec![q.clone()];
                (Group::new("routed group", &one, &reader), one)
            })
            .collect();
        let mut stats = Stats::default();
        let mut routes = Routes::default();
        for (n, (g, _)) in routed.iter().enumerate() {
            let mut interests = BTreeSet::new();
            interests_of(&g.live[0], &mut interests);
            let pinned = interests
                .iter()
                .any(|i| matches!(i, Interest::Keyed { .. }));
            stats.routed.push((0, pinned));
            routes.set(&n.to_string(), interests);
        }
        let st = start_streaming(&cfg, prepared).await;
        let mut unlisted_seen = BTreeSet::new();
        // What the lagging group took and will put back (`Pending::restore`).
        let mut taken: Option<Pending> = None;
        for i in 0..txns {
            let (sql, unlisted) = transaction(&mut rng, i);
            unlisted_seen.insert(format!("{unlisted:?}"));
            let at = commit(pg, &sql);
            let at_txn = format!("after txn {i}:\n{sql}");
            for v in versions_until(&st.rx, at).await {
                if !v.tables.is_empty() {
                    reader.begin_snapshot().expect("snapshot");
                    let now = read_mirror(&reader);
                    reader.end_snapshot().expect("end snapshot");
                    check_version_rows(&v, &mirror, &now, unlisted, i);
                    mirror = now;
                }
                eager.note(&v);
                lagging.note(&v);
                for n in routes.groups_for(&v, |t| reader.table_spec(t), true) {
                    let n = n.parse::<usize>().expect("group number");
                    stats.routed[n].0 += 1;
                    routed[n].0.note(&v);
                }
            }
            eager.advance(&reader, &queries, &at_txn, &mut stats);
            // Not routed: the query must still equal a fresh evaluation without advancing.
            let mut routed_stats = Stats::default();
            for (g, one) in &mut routed {
                g.advance(&reader, one, &at_txn, &mut routed_stats);
            }

            // An advance that found newer versions committed than announced puts back what
            // it took; the versions noted since come after it.
            if let Some(older) = taken.take() {
                stats.restores += 1;
                lagging.pending.restore(older);
            } else if lagging.noted > 0 && i + 1 < txns && rng.chance(1, 12) {
                taken = Some(std::mem::take(&mut lagging.pending));
                continue;
            }
            if lagging.noted >= LAG_VERSIONS_MAX || rng.chance(1, 2) || i + 1 == txns {
                lagging.advance(&reader, &queries, &at_txn, &mut stats);
            }
        }
        if txns > OVERFLOW_AT {
            assert_eq!(unlisted_seen.len(), 3, "{unlisted_seen:?}");
        }
        st.stop().await;
        stats
    })
}

#[test]
fn live_queries_follow_the_replicated_stream() {
    let seed = env_or("IVM_REPLICA_SEED", SEED_DEFAULT);
    let txns = env_or("IVM_REPLICA_TXNS", TXNS_DEFAULT);
    eprintln!("IVM_REPLICA_SEED={seed} IVM_REPLICA_TXNS={txns}");
    let pg = cluster(&[]);
    let stats = run_pipeline(&pg, seed, txns);
    eprintln!("{stats:?}");
    // The run exercised what it claims to.
    assert!(stats.pushes > txns, "{stats:?}");
    assert!(stats.rehydrations >= 2, "{stats:?}");
    assert!(stats.restores >= 1, "{stats:?}");
    assert!(stats.changes_pushed > txns, "{stats:?}");
    assert!(stats.nonempty_checks > stats.pushes / 2, "{stats:?}");
    // Every query's result moved under the pushed changes, not just under re-hydration.
    assert!(stats.result_changes.iter().all(|&n| n > 0), "{stats:?}");
    // Every routed group's query stayed equal to a fresh evaluation, and the routes spared
    // the pinned ones versions that the others followed.
    let pinned: Vec<usize> = stats.routed.iter().filter(|r| r.1).map(|r| r.0).collect();
    let whole = stats.routed.iter().filter(|r| !r.1).map(|r| r.0).max();
    assert!(pinned.len() >= 4, "{stats:?}");
    assert!(
        pinned.iter().all(|&n| n > 0 && Some(n) < whole),
        "{stats:?}"
    );
}

//! The seeded random workload the differential tests share: a schema of users, issues,
//! comments and labels, random transactions over it (upserts, deletes, key changes,
//! TRUNCATEs, oversized transactions), and the query shapes run against it.
#![allow(dead_code)] // each test uses a different part

use serde_json::{json, Value as Json};
use zcache::replicator::apply::CHANGED_ROWS_PER_VERSION_MAX;
use zcache::zql::{parse_ast, Ast};

/// Transactions that truncate whatever else they draw (besides rare random truncates).
pub const FORCED_TRUNCATE_AT: [usize; 2] = [60, 140];
/// The transaction that also changes more rows than a version lists.
pub const OVERFLOW_AT: usize = 100;

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// A seeded generator (splitmix64): the run is reproducible from its seed.

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn int(&mut self, n: i64) -> i64 {
        self.below(n as u64) as i64
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream: the schema of tests/zql_ivm.rs, with a text key on label (so a composite key mixes
// an integer and a text) and a tick table every transaction writes, so each has a version.

pub const SCHEMA: &str = r#"
CREATE TABLE "user" (id int4 PRIMARY KEY, name text, n int4);
CREATE TABLE issue (id int4 PRIMARY KEY, status text, owner int4, pri int8, title text);
CREATE TABLE comment (id int4 PRIMARY KEY, issue int4, author int4, body text);
CREATE TABLE label (id text PRIMARY KEY, name text);
CREATE TABLE issue_label (issue int4, label text, PRIMARY KEY (issue, label));
CREATE TABLE tick (id int4 PRIMARY KEY, n int4);
"#;

pub const USERS: i64 = 6;
pub const ISSUES: i64 = 14;
pub const COMMENTS: i64 = 24;
pub const STATUSES: &[&str] = &["open", "closed", "wip"];
pub const WORDS: &[&str] = &["a", "ab", "b", "ba", "é", "Z", "", "A'x"];
pub const LABELS: &[&str] = &["bug", "é", "q\"x", "it's"];

pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A nullable integer below `n` (null one time in seven).
pub fn opt_int(rng: &mut Rng, n: i64) -> String {
    if rng.chance(1, 7) {
        "NULL".into()
    } else {
        rng.int(n).to_string()
    }
}

pub fn opt_text(rng: &mut Rng, choices: &[&str]) -> String {
    if rng.chance(1, 7) {
        "NULL".into()
    } else {
        lit(rng.pick(choices))
    }
}

/// One table's generator: its key, its other columns and a random value for each.
#[derive(Clone, Copy)]
pub enum T {
    User,
    Issue,
    Comment,
    Label,
    IssueLabel,
}

pub const GENERATED: [T; 5] = [T::User, T::Issue, T::Comment, T::Label, T::IssueLabel];

impl T {
    pub fn sql_name(self) -> &'static str {
        match self {
            T::User => "\"user\"",
            T::Issue => "issue",
            T::Comment => "comment",
            T::Label => "label",
            T::IssueLabel => "issue_label",
        }
    }

    pub fn key_columns(self) -> &'static [&'static str] {
        match self {
            T::IssueLabel => &["issue", "label"],
            _ => &["id"],
        }
    }

    pub fn value_columns(self) -> &'static [&'static str] {
        match self {
            T::User => &["name", "n"],
            T::Issue => &["status", "owner", "pri", "title"],
            T::Comment => &["issue", "author", "body"],
            T::Label => &["name"],
            T::IssueLabel => &[],
        }
    }

    /// A key, drawn from a small range so that operations collide.
    pub fn key(self, rng: &mut Rng) -> Vec<String> {
        match self {
            T::User => vec![rng.int(USERS).to_string()],
            T::Issue => vec![rng.int(ISSUES).to_string()],
            T::Comment => vec![rng.int(COMMENTS).to_string()],
            T::Label => vec![lit(rng.pick(LABELS))],
            T::IssueLabel => vec![rng.int(ISSUES).to_string(), lit(rng.pick(LABELS))],
        }
    }

    pub fn value(self, column: &str, rng: &mut Rng) -> String {
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

    pub fn key_where(self, key: &[String]) -> String {
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
pub fn upsert(t: T, rng: &mut Rng) -> String {
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
pub fn statement(rng: &mut Rng) -> String {
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
pub fn truncate(rng: &mut Rng) -> String {
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
pub enum Unlisted {
    No,
    Truncate,
    /// More changed rows than `CHANGED_ROWS_PER_VERSION_MAX`.
    Overflow,
}

/// One upstream transaction: its SQL and whether its version lists its rows.
pub fn transaction(rng: &mut Rng, i: usize) -> (String, Unlisted) {
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

pub fn initial_data(rng: &mut Rng) -> String {
    let mut sql = String::new();
    for _ in 0..60 {
        sql.push_str(&upsert(rng.pick(&GENERATED), rng));
        sql.push('\n');
    }
    sql
}

// ---------------------------------------------------------------------------------------------
// The queries: the shapes of tests/zql_ivm.rs with fixed parameters.

pub fn simple(col: &str, op: &str, value: Json) -> Json {
    json!({"type":"simple","left":{"type":"column","name":col},"op":op,"right":{"type":"literal","value":value}})
}

pub fn corr(parent: &str, child: &str) -> Json {
    json!({"parentField":[parent],"childField":[child]})
}

pub fn exists(op: &str, related: Json) -> Json {
    json!({"type":"correlatedSubquery","op":op,"related":related})
}

pub struct Params {
    limit: Option<u64>,
    order: Json,
    status: &'static str,
    child_limit: Option<u64>,
    k: i64,
    flag: bool,
}

pub fn query(shape: usize, p: &Params) -> Json {
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

pub fn queries() -> Vec<(String, Ast)> {
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

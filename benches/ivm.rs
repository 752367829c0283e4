//! Benchmarks of incremental view maintenance (`zql::ivm::LiveQuery`) over a real SQLite
//! replica shaped and seeded like the reference kit (setup.sh): 10,000 issues, 50,000
//! comments, the kit's indexes `comment(issue_id)` and `issue(status, created)`.
//!
//! - `hydrate_kit_query`: the kit's `issuesByStatus('open', 100)` with comments, hydrated as a
//!   live query and evaluated fresh; throughput in rows synced.
//! - `push_1000_queries_few_affected`: one upstream change (a comment's body, an issue's title)
//!   pushed through 1,000 live queries of which a handful are affected; the time per change
//!   for all of them, and for the unaffected ones alone (throughput = unaffected queries, so
//!   its time per element is the cost of one unaffected query); and the unaffected ones
//!   again through `BatchMemo`, a per-batch memo of source reads (a proposal, measured).
//! - `push_window_refill`: an issue inside the kit query's window is closed, which forces a
//!   refill; and the reopening, which evicts the window's last row.
//! - `source`: what the engine's reads cost through `ReplicaReader` beside held statements,
//!   an ordered and limited root read, and one batched read of all the roots' comments.
//!
//! Replica writes happen outside the timed part (each change is committed in its own
//! transaction before the pushes are timed, and a read snapshot is opened around them as a
//! syncer does per batch). The replica lives on tmpfs when there is one, so that the
//! untimed commits' fsyncs do not dominate the run's wall time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tempfile::TempDir;

use rusqlite::types::ValueRef;
use zcache::sqlite::replica::open_connection;
use zcache::sqlite::{Replica, ReplicaReader};
use zcache::zql::ivm::{LiveQuery, RowChange};
use zcache::zql::schema::TableSpec;
use zcache::zql::value::{Row, Value};
use zcache::zql::{evaluate, parse_ast, Ast, Source, ZqlError};

mod kit;
use kit::*;

const LIVE_QUERIES: usize = 1_000;

/// Column positions used below.
const ISSUE_TITLE: usize = 1;
const ISSUE_STATUS: usize = 2;
const COMMENT_ISSUE_ID: usize = 1;
const COMMENT_BODY: usize = 2;

/// A seeded replica in a temporary directory, its writer and a syncer's reader.
struct Kit {
    _dir: TempDir,
    path: PathBuf,
    replica: Replica,
    reader: ReplicaReader,
    watermark: u64,
}

impl Kit {
    fn seeded() -> Kit {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("tempdir");
        let path = dir.path().join("replica.db");
        let mut replica = Replica::open(&path).expect("open replica");
        replica.create_table(&issue_spec()).expect("create issue");
        replica
            .create_table(&comment_spec())
            .expect("create comment");
        replica.begin().expect("begin");
        for i in 1..=ISSUES {
            replica.upsert("issue", &issue_row(i)).expect("issue");
        }
        for i in 1..=COMMENTS {
            replica.upsert("comment", &comment_row(i)).expect("comment");
        }
        replica.commit(1).expect("commit");
        // The kit's upstream indexes (setup.sh), as the initial sync copies them.
        replica
            .create_index("comment", &["issue_id".into()])
            .expect("comment index");
        replica
            .create_index("issue", &["status".into(), "created".into()])
            .expect("issue index");
        let reader = ReplicaReader::open(&path).expect("reader");
        Kit {
            _dir: dir,
            path,
            replica,
            reader,
            watermark: 1,
        }
    }

    /// Commits one row change upstream-style, in its own transaction.
    fn write(&mut self, table: &str, row: &Row) {
        self.watermark += 1;
        self.replica.begin().expect("begin");
        self.replica.upsert(table, row).expect("upsert");
        self.replica.commit(self.watermark).expect("commit");
    }

    /// Runs `f` inside a read snapshot, as a syncer reads per batch.
    fn read<R>(&self, f: impl FnOnce(&ReplicaReader) -> R) -> R {
        let seen = self.reader.begin_snapshot().expect("snapshot");
        debug_assert_eq!(seen, self.watermark);
        let out = f(&self.reader);
        self.reader.end_snapshot().expect("end snapshot");
        out
    }
}

fn ast(json: &serde_json::Value) -> Ast {
    parse_ast(json).expect("AST parses")
}

fn simple(column: &str, value: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "simple",
        "left": {"type": "column", "name": column},
        "right": {"type": "literal", "value": value},
        "op": "="
    })
}

fn comments_related() -> serde_json::Value {
    serde_json::json!([{
        "correlation": {"parentField": ["id"], "childField": ["issue_id"]},
        "subquery": {"table": "comment", "alias": "comments", "orderBy": [["created", "desc"]]},
        "system": "client"
    }])
}

/// `issue where status='open' orderBy created desc limit 100 related comments`: the kit's
/// `issuesByStatus` as it reaches zero-cache.
fn kit_query() -> Ast {
    ast(&serde_json::json!({
        "table": "issue",
        "where": simple("status", "open"),
        "related": comments_related(),
        "limit": 100,
        "orderBy": [["created", "desc"]]
    }))
}

/// Live query `k` of the 1,000: the issues of one owner in one status, newest first, with a
/// window of 10 to 13, and their comments. 300 (owner, status) pairs, so a change to one
/// issue (or its comments) concerns the three or four queries of its pair.
fn owner_query(k: usize) -> Ast {
    let owner = format!("u{}", 1 + k % USERS as usize);
    let status = STATUSES[(k / USERS as usize) % STATUSES.len()];
    let limit = 10 + k / (USERS as usize * STATUSES.len());
    ast(&serde_json::json!({
        "table": "issue",
        "where": {"type": "and", "conditions": [simple("owner_id", &owner), simple("status", status)]},
        "related": comments_related(),
        "limit": limit,
        "orderBy": [["created", "desc"]]
    }))
}

fn synced_rows(live: &LiveQuery) -> u64 {
    live.rows().values().map(|(_, n)| u64::from(*n)).sum()
}

/// The live query's view and synced rows equal a fresh evaluation's.
fn assert_fresh(live: &LiveQuery, ast: &Ast, src: &ReplicaReader) {
    let fresh = evaluate(ast, src).expect("evaluate");
    let roots: Vec<&Row> = fresh.nodes.iter().map(|n| &n.row).collect();
    assert_eq!(live.roots().iter().collect::<Vec<_>>(), roots);
    assert_eq!(live.rows(), &fresh.rows);
}

// ---------------------------------------------------------------------------------------------
// Hydration

fn bench_hydrate(c: &mut Criterion) {
    let kit = Kit::seeded();
    let query = kit_query();
    kit.reader.begin_snapshot().expect("snapshot");
    let live = LiveQuery::hydrate(&query, &kit.reader).expect("hydrate");
    // 100 open issues, each with its 5 comments.
    assert_eq!(live.roots().len(), 100);
    assert_eq!(live.rows().len(), 600);
    let synced = synced_rows(&live);
    assert_eq!(synced, 600, "every row reached once");
    assert_fresh(&live, &query, &kit.reader);
    let open = kit
        .reader
        .fetch_rows("issue", &[(ISSUE_STATUS, Value::Text("open".into()))])
        .expect("fetch")
        .len();

    let mut g = c.benchmark_group("hydrate_kit_query");
    g.throughput(Throughput::Elements(synced));
    g.bench_function("live_query", |b| {
        b.iter(|| LiveQuery::hydrate(black_box(&query), &kit.reader).expect("hydrate"))
    });
    g.bench_function("fresh_evaluate", |b| {
        b.iter(|| evaluate(black_box(&query), &kit.reader).expect("evaluate"))
    });
    // What the source alone costs: every open issue is read to find the newest 100 (the
    // source's fetch takes equalities only, no order or limit).
    g.throughput(Throughput::Elements(open as u64));
    g.bench_function(format!("source_fetch_{open}_open_issues"), |b| {
        b.iter(|| {
            kit.reader
                .fetch_rows("issue", &[(ISSUE_STATUS, Value::Text("open".into()))])
                .expect("fetch")
        })
    });
    g.finish();
    kit.reader.end_snapshot().expect("end snapshot");
}

// ---------------------------------------------------------------------------------------------
// One change through 1,000 live queries

/// A row that alternates between two states, one upstream change per step.
struct Toggle {
    table: &'static str,
    states: [Row; 2],
    current: usize,
}

impl Toggle {
    fn new(table: &'static str, row: Row, column: usize) -> Toggle {
        let mut edited = row.clone();
        let Value::Text(text) = &row[column] else {
            panic!("a text column");
        };
        edited[column] = Value::Text(format!("{text} (edited)"));
        Toggle {
            table,
            states: [row, edited],
            current: 0,
        }
    }

    /// Writes the next state to the replica and returns the change to push.
    fn step(&mut self, kit: &mut Kit) -> RowChange {
        let old = self.states[self.current].clone();
        self.current = 1 - self.current;
        let new = self.states[self.current].clone();
        kit.write(self.table, &new);
        RowChange {
            table: self.table.into(),
            old: Some(old),
            new: Some(new),
        }
    }
}

/// A source that remembers each fetch for the rest of one batch (one read snapshot), so
/// that queries asking the same question share one SQLite read: what a syncer could wrap
/// around its reader per batch. Not (yet) what production does; measured beside the plain
/// reader to size the gain.
struct BatchMemo<'a> {
    inner: &'a ReplicaReader,
    memo: RefCell<HashMap<String, Vec<Row>>>,
}

impl<'a> BatchMemo<'a> {
    fn new(inner: &'a ReplicaReader) -> Self {
        BatchMemo {
            inner,
            memo: RefCell::new(HashMap::new()),
        }
    }
}

impl Source for BatchMemo<'_> {
    fn table(&self, name: &str) -> Option<Rc<TableSpec>> {
        self.inner.table(name)
    }

    fn fetch(&self, table: &str, eq: &[(usize, Value)]) -> Result<Vec<Row>, ZqlError> {
        let mut key = String::from(table);
        for (c, v) in eq {
            key.push_str(&format!("\u{0}{c}="));
            v.write_json(&mut key);
        }
        if let Some(rows) = self.memo.borrow().get(&key) {
            return Ok(rows.clone());
        }
        let rows = self.inner.fetch(table, eq)?;
        self.memo.borrow_mut().insert(key, rows.clone());
        Ok(rows)
    }
}

/// Pushes `change` to every query (through a `BatchMemo` when `memo`), timing only those
/// `timed` selects; returns the time and whether each query reported touched rows.
fn push_all(
    kit: &Kit,
    queries: &mut [LiveQuery],
    change: &RowChange,
    memo: bool,
    timed: impl Fn(usize) -> bool,
) -> (Duration, Vec<bool>) {
    let changes = std::slice::from_ref(change);
    kit.read(|reader| {
        let batch = BatchMemo::new(reader);
        let src: &dyn Source = if memo { &batch } else { reader };
        let mut spent = Duration::ZERO;
        let mut affected = Vec::with_capacity(queries.len());
        for (k, q) in queries.iter_mut().enumerate() {
            let start = Instant::now();
            let touched = q.push(black_box(changes), src).expect("push");
            if timed(k) {
                spent += start.elapsed();
            }
            affected.push(!touched.is_empty());
        }
        (spent, affected)
    })
}

fn bench_push_many(c: &mut Criterion) {
    let mut kit = Kit::seeded();
    let asts: Vec<Ast> = (0..LIVE_QUERIES).map(owner_query).collect();
    let setup = Instant::now();
    let mut queries: Vec<LiveQuery> = kit.read(|src| {
        asts.iter()
            .map(|a| LiveQuery::hydrate(a, src).expect("hydrate"))
            .collect()
    });
    eprintln!(
        "hydrated {LIVE_QUERIES} live queries in {:?} ({} rows synced)",
        setup.elapsed(),
        queries.iter().map(synced_rows).sum::<u64>()
    );
    // The newest issue of query 0 (owner u1, open) and one of its comments.
    let issue = queries[0].roots()[0].clone();
    let comment = kit.read(|src| {
        src.fetch_rows("comment", &[(COMMENT_ISSUE_ID, issue[0].clone())])
            .expect("fetch")
            .into_iter()
            .next()
            .expect("the issue has comments")
    });
    let mut toggles = [
        (
            "comment_body",
            Toggle::new("comment", comment, COMMENT_BODY),
        ),
        ("issue_title", Toggle::new("issue", issue, ISSUE_TITLE)),
    ];

    let mut g = c.benchmark_group("push_1000_queries_few_affected");
    for (name, toggle) in &mut toggles {
        // A trial change (and its revert) finds the affected queries.
        let change = toggle.step(&mut kit);
        let (_, affected) = push_all(&kit, &mut queries, &change, false, |_| false);
        let change = toggle.step(&mut kit);
        let (_, again) = push_all(&kit, &mut queries, &change, false, |_| false);
        assert_eq!(affected, again);
        let affected_n = affected.iter().filter(|a| **a).count();
        let unaffected_n = LIVE_QUERIES - affected_n;
        eprintln!("{name}: {affected_n} of {LIVE_QUERIES} queries affected");
        assert!((1..=10).contains(&affected_n), "a handful affected");

        g.throughput(Throughput::Elements(LIVE_QUERIES as u64));
        g.bench_function(format!("{name}/all_{LIVE_QUERIES}"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let change = toggle.step(&mut kit);
                        push_all(&kit, &mut queries, &change, false, |_| true).0
                    })
                    .sum()
            })
        });
        g.throughput(Throughput::Elements(unaffected_n as u64));
        g.bench_function(format!("{name}/unaffected_{unaffected_n}"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let change = toggle.step(&mut kit);
                        push_all(&kit, &mut queries, &change, false, |k| !affected[k]).0
                    })
                    .sum()
            })
        });
        g.bench_function(
            format!("{name}/unaffected_{unaffected_n}_batch_memo"),
            |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            let change = toggle.step(&mut kit);
                            push_all(&kit, &mut queries, &change, true, |k| !affected[k]).0
                        })
                        .sum()
                })
            },
        );
    }
    g.finish();
    // The affected queries were maintained correctly through every change.
    kit.read(|src| {
        for (k, q) in queries
            .iter()
            .enumerate()
            .step_by(97)
            .chain([(0, &queries[0])])
        {
            assert_fresh(q, &asts[k], src);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// A change that forces a window refill

fn bench_refill(c: &mut Criterion) {
    let mut kit = Kit::seeded();
    let query = kit_query();
    let mut live = kit.read(|src| LiveQuery::hydrate(&query, src).expect("hydrate"));
    let open = live.roots()[50].clone();
    let mut closed = open.clone();
    closed[ISSUE_STATUS] = Value::Text("closed".into());
    let close = RowChange {
        table: "issue".into(),
        old: Some(open.clone()),
        new: Some(closed.clone()),
    };
    let reopen = RowChange {
        table: "issue".into(),
        old: Some(closed.clone()),
        new: Some(open.clone()),
    };
    // Writes `row`, pushes `change`, and returns the push's time.
    let apply = |kit: &mut Kit, live: &mut LiveQuery, row: &Row, change: &RowChange| {
        kit.write("issue", row);
        kit.read(|src| {
            let start = Instant::now();
            let touched = live
                .push(black_box(std::slice::from_ref(change)), src)
                .expect("push");
            let spent = start.elapsed();
            // The closed issue and its comments leave, the 101st and its comments enter.
            debug_assert!(touched.len() >= 12);
            spent
        })
    };

    let mut g = c.benchmark_group("push_window_refill");
    g.throughput(Throughput::Elements(1));
    g.bench_function("close_issue_in_window_limit_100", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let spent = apply(&mut kit, &mut live, &closed, &close);
                    apply(&mut kit, &mut live, &open, &reopen);
                    spent
                })
                .sum()
        })
    });
    g.bench_function("reopen_issue_evicting_last", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    apply(&mut kit, &mut live, &closed, &close);
                    apply(&mut kit, &mut live, &open, &reopen)
                })
                .sum()
        })
    });
    g.finish();
    kit.read(|src| assert_fresh(&live, &query, src));
    // And once more after a close, with the refilled window.
    apply(&mut kit, &mut live, &closed, &close);
    kit.read(|src| assert_fresh(&live, &query, src));
}

// ---------------------------------------------------------------------------------------------
// What the source costs, and what it could cost

/// An issue row read by a statement of `ISSUE_COLUMNS`.
fn issue_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let text = |i| -> rusqlite::Result<Value> {
        Ok(match r.get_ref(i)? {
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            _ => Value::Null,
        })
    };
    let int = |i| -> rusqlite::Result<Value> {
        Ok(match r.get_ref(i)? {
            ValueRef::Integer(n) => Value::Int(n),
            _ => Value::Null,
        })
    };
    Ok(vec![
        text(0)?,
        text(1)?,
        text(2)?,
        int(3)?,
        int(4)?,
        text(5)?,
    ])
}

const ISSUE_COLUMNS: &str = r#""id", "title", "status", "priority", "created", "owner_id""#;

/// The source's reads as the engine makes them (`ReplicaReader::fetch_rows`: equalities only,
/// the SQL text rebuilt per call) beside the same reads through a held prepared statement, and
/// the kit query's root level read in order with its limit by SQLite (the `issue(status,
/// created)` index gives the order). Evidence for where hydration and push time goes.
fn bench_source(c: &mut Criterion) {
    let kit = Kit::seeded();
    let raw = open_connection(&kit.path, true).expect("raw reader");
    let by_id_sql = format!(r#"SELECT {ISSUE_COLUMNS} FROM "issue" WHERE "id" = ?1"#);
    let newest_sql = format!(
        r#"SELECT {ISSUE_COLUMNS} FROM "issue" WHERE "status" = ?1 ORDER BY "created" DESC, "id" DESC LIMIT ?2"#
    );
    let plan: Vec<String> = raw
        .prepare(&format!("EXPLAIN QUERY PLAN {newest_sql}"))
        .and_then(|mut st| {
            st.query_map(["open", "101"], |r| r.get::<_, String>(3))
                .and_then(|rows| rows.collect())
        })
        .expect("query plan");
    eprintln!("ordered, limited root read: {}", plan.join("; "));
    let mut by_id = raw.prepare(&by_id_sql).expect("prepare");
    let mut newest = raw.prepare(&newest_sql).expect("prepare");
    let id = Value::Text("i4242".into());
    let first_101: Vec<Row> = newest
        .query_map(rusqlite::params!["open", 101], issue_from)
        .and_then(|rows| rows.collect())
        .expect("newest");
    let live = kit.read(|src| LiveQuery::hydrate(&kit_query(), src).expect("hydrate"));
    assert_eq!(
        &first_101[..100],
        live.roots(),
        "SQLite's order is the query's"
    );

    let mut g = c.benchmark_group("source");
    g.throughput(Throughput::Elements(1));
    g.bench_function("issue_by_id/replica_reader", |b| {
        b.iter(|| {
            kit.reader
                .fetch_rows("issue", &[(0, black_box(id.clone()))])
        })
    });
    g.bench_function("issue_by_id/held_statement", |b| {
        b.iter(|| {
            by_id
                .query_map([black_box("i4242")], issue_from)
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<Row>>>())
                .expect("by id")
        })
    });
    g.bench_function("comments_of_issue/replica_reader", |b| {
        b.iter(|| {
            kit.reader
                .fetch_rows("comment", &[(COMMENT_ISSUE_ID, black_box(id.clone()))])
        })
    });
    g.throughput(Throughput::Elements(101));
    g.bench_function("newest_101_open_issues/ordered_limited_sql", |b| {
        b.iter(|| {
            newest
                .query_map(rusqlite::params![black_box("open"), 101], issue_from)
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<Row>>>())
                .expect("newest")
        })
    });
    // The subtree level: the 100 roots' comments, one statement per parent (as now) or one
    // for all of them.
    let parents: Vec<String> = first_101[..100]
        .iter()
        .map(|r| match &r[0] {
            Value::Text(t) => t.clone(),
            _ => unreachable!("text ids"),
        })
        .collect();
    let marks = vec!["?"; parents.len()].join(", ");
    let mut batched = raw
        .prepare(&format!(
            r#"SELECT "id", "issue_id", "body", "created" FROM "comment" WHERE "issue_id" IN ({marks})"#
        ))
        .expect("prepare");
    let comments_of = |st: &mut rusqlite::Statement<'_>| -> usize {
        st.query_map(rusqlite::params_from_iter(&parents), |r| {
            Ok(vec![
                Value::Text(r.get(0)?),
                Value::Text(r.get(1)?),
                Value::Text(r.get(2)?),
                Value::Int(r.get(3)?),
            ])
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<Row>>>())
        .expect("comments")
        .len()
    };
    assert_eq!(comments_of(&mut batched), 500);
    g.throughput(Throughput::Elements(500));
    g.bench_function("comments_of_100_issues/replica_reader_per_parent", |b| {
        b.iter(|| {
            parents
                .iter()
                .map(|p| {
                    kit.reader
                        .fetch_rows("comment", &[(COMMENT_ISSUE_ID, Value::Text(p.clone()))])
                        .expect("comments")
                        .len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("comments_of_100_issues/one_in_statement", |b| {
        b.iter(|| comments_of(&mut batched))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = ivm;
    config = config();
    targets = bench_hydrate, bench_push_many, bench_refill, bench_source
}
criterion_main!(ivm);

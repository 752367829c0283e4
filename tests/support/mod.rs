//! Helpers of the replication tests: an executor, the replicator started the way the reactor
//! starts it, upstream changes committed through psql with their WAL positions, and a canonical
//! row form that both sides map to, so "the replica equals upstream" is one comparison.
//!
//! The upstream side is read with psql and SQL of its own (`extract(epoch ...)` for times,
//! `to_json` for JSON and arrays, `::text` for the rest), independent of zcache's decoders; the
//! mapping to the replica's values follows zero-protocol.md §4 and src/sqlite/pgtypes.rs.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_lite::future;
use glommio::channels::shared_channel::{self, ConnectedReceiver};
use glommio::LocalExecutorBuilder;
use zcache::config::Config;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};
use zcache::pgrepl::{ConnConfig, Lsn};
use zcache::replicator::{self, Prepared};
use zcache::shards::VersionReady;
use zcache::sqlite::ReplicaReader;
use zcache::zql::value::Value;

/// How long any single wait may take before the test fails instead of hanging.
pub const WAIT_MS: u64 = 30_000;
/// The database every test works in.
pub const DB: &str = "postgres";
/// Versions the test's syncer channel holds before the replicator waits for the test.
const VERSION_QUEUE_MAX: usize = 1024;

pub fn run<T>(f: impl Future<Output = T>) -> T {
    LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("executor")
        .run(f)
}

pub fn cluster(extra_conf: &[&str]) -> PgCluster {
    PgCluster::start(PgClusterOptions {
        extra_conf: extra_conf.iter().map(|s| s.to_string()).collect(),
        ..PgClusterOptions::default()
    })
    .expect("start PostgreSQL")
}

pub async fn with_timeout<T>(what: &str, f: impl Future<Output = T>) -> T {
    let timer = async {
        glommio::timer::sleep(Duration::from_millis(WAIT_MS)).await;
        None
    };
    future::or(async { Some(f.await) }, timer)
        .await
        .unwrap_or_else(|| panic!("timed out: {what}"))
}

/// zcache's settings for `app_id`, replicating `publications` (empty: all of `public`).
pub fn config(pg: &PgCluster, replica: &Path, app_id: &str, publications: &[&str]) -> Config {
    let mut args = vec![
        "zcache".to_string(),
        "--upstream-db".into(),
        pg.url(DB),
        "--replica-file".into(),
        replica.display().to_string(),
        "--app-id".into(),
        app_id.into(),
    ];
    if !publications.is_empty() {
        args.push("--app-publications".into());
        args.push(publications.join(","));
    }
    Config::try_parse_from(args).expect("config")
}

pub fn upstream(cfg: &Config) -> ConnConfig {
    ConnConfig::parse(cfg.upstream_db.as_deref().expect("upstream url")).expect("url")
}

pub async fn prepare(cfg: &Config) -> Prepared {
    with_timeout("prepare", replicator::prepare(cfg, &upstream(cfg)))
        .await
        .unwrap_or_else(|e| panic!("prepare failed: {e}"))
}

/// The replicator streaming in a task of the test's executor, and the syncer end of its
/// channel.
pub struct Streaming {
    pub rx: ConnectedReceiver<VersionReady>,
    task: glommio::Task<()>,
}

impl Streaming {
    /// Stops the replicator as a process exit would: its connection and replica handle close.
    /// (Dropping the executor is not enough: glommio leaks the tasks it still holds.)
    pub async fn stop(self) {
        self.task.cancel().await;
        // Lets the reactor carry out the socket's close.
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

/// Streams `prepared` in a task of this executor.
pub async fn start_streaming(cfg: &Config, prepared: Prepared) -> Streaming {
    start_streaming_with(cfg, prepared, Default::default()).await
}

/// `start_streaming`, building the indexes asked of `index_requests`.
pub async fn start_streaming_with(
    cfg: &Config,
    prepared: Prepared,
    index_requests: std::sync::Arc<zcache::sqlite::IndexRequests>,
) -> Streaming {
    let upstream = upstream(cfg);
    let (tx, rx) = shared_channel::new_bounded(VERSION_QUEUE_MAX);
    let task = glommio::spawn_local(async move {
        let tx = tx.connect().await;
        replicator::stream_forever(upstream, prepared, vec![tx], index_requests).await;
    });
    let rx = with_timeout("connecting the version channel", rx.connect()).await;
    Streaming { rx, task }
}

pub async fn next_version(rx: &ConnectedReceiver<VersionReady>) -> VersionReady {
    with_timeout("VersionReady", rx.recv())
        .await
        .expect("the replicator closed its channel")
}

pub fn psql(pg: &PgCluster, sql: &str) -> String {
    pg.psql(DB, sql)
        .unwrap_or_else(|e| panic!("psql failed: {e}\n--- script:\n{sql}"))
}

pub fn lsn(text: &str) -> u64 {
    text.trim()
        .parse::<Lsn>()
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

/// Where one upstream commit's record lies: strictly after `before` (the insert position
/// just before COMMIT), at or before `after` (the write position once COMMIT returned).
#[derive(Debug, Clone, Copy)]
pub struct CommitLsn {
    pub before: u64,
    pub after: u64,
}

impl CommitLsn {
    pub fn contains(&self, end_lsn: u64) -> bool {
        self.before < end_lsn && end_lsn <= self.after
    }
}

/// Runs `body` in one upstream transaction.
pub fn commit(pg: &PgCluster, body: &str) -> CommitLsn {
    let out = psql(
        pg,
        &format!(
            "BEGIN;\n{body}\nSELECT pg_current_wal_insert_lsn();\nCOMMIT;\nSELECT pg_current_wal_lsn();\n"
        ),
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "unexpected psql output {out:?}");
    let at = CommitLsn {
        before: lsn(lines[lines.len() - 2]),
        after: lsn(lines[lines.len() - 1]),
    };
    assert!(at.before < at.after, "the commit wrote no WAL: {at:?}");
    at
}

/// Waits for the VersionReady of the commit at `at` and checks it is the next one.
pub async fn version_of(rx: &ConnectedReceiver<VersionReady>, at: CommitLsn) -> VersionReady {
    let v = next_version(rx).await;
    assert!(
        at.contains(v.watermark),
        "VersionReady at {} is not the commit in ({}, {}]",
        Lsn(v.watermark),
        Lsn(at.before),
        Lsn(at.after)
    );
    v
}

pub fn slot_confirmed_lsn(pg: &PgCluster, slot: &str) -> Option<u64> {
    let out = psql(
        pg,
        &format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    );
    let text = out.trim();
    (!text.is_empty()).then(|| lsn(text))
}

pub fn slot_names(pg: &PgCluster) -> Vec<String> {
    psql(pg, "SELECT slot_name FROM pg_replication_slots ORDER BY 1")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Drops a slot once its walsender has let go of it.
pub fn drop_slot(pg: &PgCluster, slot: &str) {
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    while slot_names(pg).iter().any(|s| s == slot) {
        assert!(Instant::now() < deadline, "slot {slot} stayed active");
        psql(
            pg,
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}' AND NOT active"
            ),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a column's upstream value maps to the replica's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canon {
    /// int2/int4/int8: an exact integer.
    Int,
    /// float4/float8/numeric: the double nearest Postgres' text form; NaN is kept as NULL.
    Float,
    /// timestamptz/timestamp/date: milliseconds since the epoch, UTC, as a double.
    Time,
    Bool,
    /// text, varchar, uuid, enums: the text form.
    Text,
    /// json, jsonb and arrays: the same JSON value.
    Json,
}

impl Canon {
    /// Upstream SQL giving a JSON value this canon reads.
    fn sql(self, col: &str) -> String {
        match self {
            Canon::Int | Canon::Float | Canon::Text => format!("{col}::text"),
            Canon::Time => format!("(extract(epoch FROM {col}) * 1000)::text"),
            Canon::Bool => col.to_string(),
            // As text, so a JSON null stays apart from SQL NULL.
            Canon::Json => format!("to_json({col})::text"),
        }
    }
}

/// One value in the form both sides compare in.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Json(serde_json::Value),
    /// A replica JSON value that does not parse.
    BadJson(String),
}

fn pg_float(s: &str) -> f64 {
    match s {
        "Infinity" => f64::INFINITY,
        "-Infinity" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s.parse().unwrap_or_else(|_| panic!("not a float: {s:?}")),
    }
}

fn expected_cell(canon: Canon, v: &serde_json::Value) -> Cell {
    use serde_json::Value as J;
    match (canon, v) {
        (_, J::Null) => Cell::Null,
        (Canon::Int, J::String(s)) => Cell::Int(s.parse().expect("integer")),
        (Canon::Float | Canon::Time, J::String(s)) => match pg_float(s) {
            f if f.is_nan() => Cell::Null,
            f => Cell::Float(f),
        },
        (Canon::Bool, J::Bool(b)) => Cell::Bool(*b),
        (Canon::Text, J::String(s)) => Cell::Text(s.clone()),
        (Canon::Json, J::String(s)) => Cell::Json(serde_json::from_str(s).expect("json")),
        _ => panic!("unexpected upstream value {v} for {canon:?}"),
    }
}

pub fn replica_cell(v: &Value) -> Cell {
    match v {
        Value::Null => Cell::Null,
        Value::Bool(b) => Cell::Bool(*b),
        Value::Int(i) => Cell::Int(*i),
        Value::Float(f) => Cell::Float(*f),
        Value::Text(s) => Cell::Text(s.clone()),
        Value::Json(s) => serde_json::from_str(s)
            .map(Cell::Json)
            .unwrap_or_else(|_| Cell::BadJson(s.clone())),
    }
}

/// A published table as the test expects the replica to hold it.
#[derive(Debug, Clone)]
pub struct Table {
    /// Qualified, quoted upstream name.
    pub upstream: String,
    /// The replica's name: `table` for `public`, else `schema.table`.
    pub replica: String,
    /// The synced columns, in upstream order.
    pub columns: Vec<(String, Canon)>,
    /// Positions of the primary-key columns, in key order.
    pub pk: Vec<usize>,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Table {
    pub fn new(schema: &str, name: &str, columns: &[(&str, Canon)], pk: &[&str]) -> Self {
        let replica = if schema == "public" {
            name.to_string()
        } else {
            format!("{schema}.{name}")
        };
        let pk = pk
            .iter()
            .map(|k| {
                columns
                    .iter()
                    .position(|(c, _)| c == k)
                    .expect("key column")
            })
            .collect();
        Table {
            upstream: format!("{}.{}", quote_ident(schema), quote_ident(name)),
            replica,
            columns: columns.iter().map(|(c, k)| (c.to_string(), *k)).collect(),
            pk,
        }
    }
}

/// Rows by primary key (its Debug form: keys are never JSON, so it is canonical).
pub type Rows = BTreeMap<String, Vec<Cell>>;

fn keyed(t: &Table, rows: impl IntoIterator<Item = Vec<Cell>>) -> Rows {
    let mut out = Rows::new();
    for row in rows {
        let key: Vec<&Cell> = t.pk.iter().map(|&i| &row[i]).collect();
        let key = format!("{key:?}");
        assert!(
            out.insert(key.clone(), row).is_none(),
            "duplicate key {key}"
        );
    }
    out
}

pub fn upstream_rows(pg: &PgCluster, t: &Table) -> Rows {
    let exprs: Vec<String> = t
        .columns
        .iter()
        .map(|(c, k)| k.sql(&quote_ident(c)))
        .collect();
    let out = psql(
        pg,
        &format!(
            "SELECT coalesce(json_agg(json_build_array({})), '[]') FROM {}",
            exprs.join(", "),
            t.upstream
        ),
    );
    let rows: Vec<Vec<serde_json::Value>> = serde_json::from_str(out.trim()).expect("rows");
    keyed(
        t,
        rows.into_iter().map(|r| {
            assert_eq!(r.len(), t.columns.len());
            t.columns
                .iter()
                .zip(&r)
                .map(|((_, k), v)| expected_cell(*k, v))
                .collect()
        }),
    )
}

/// The replica's rows of `t`, after checking its spec: columns, kinds' order and key.
pub fn replica_rows(reader: &ReplicaReader, t: &Table) -> Rows {
    let spec = reader
        .table_spec(&t.replica)
        .unwrap_or_else(|| panic!("the replica has no table {:?}", t.replica));
    let names: Vec<&str> = spec.columns.iter().map(|c| c.name.as_str()).collect();
    let want: Vec<&str> = t.columns.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(names, want, "columns of {}", t.replica);
    assert_eq!(spec.primary_key, t.pk, "primary key of {}", t.replica);
    let rows = reader.fetch_rows(&t.replica, &[]).expect("fetch rows");
    keyed(t, rows.iter().map(|r| r.iter().map(replica_cell).collect()))
}

/// The replica's watermark and rows of `tables`, read in one snapshot.
pub fn replica_snapshot(path: &Path, tables: &[Table]) -> (u64, Vec<Rows>) {
    let reader = ReplicaReader::open(path).expect("open the replica");
    let watermark = reader.begin_snapshot().expect("snapshot");
    let rows = tables.iter().map(|t| replica_rows(&reader, t)).collect();
    reader.end_snapshot().expect("end snapshot");
    (watermark, rows)
}

/// Asserts the replica holds exactly upstream's rows of every table; returns its watermark.
pub fn assert_replica_equals_upstream(pg: &PgCluster, path: &Path, tables: &[Table]) -> u64 {
    let (watermark, replica) = replica_snapshot(path, tables);
    for (t, got) in tables.iter().zip(replica) {
        let want = upstream_rows(pg, t);
        if let Some(diff) = diff_rows(t, &got, &want) {
            panic!("the replica's {} differs from upstream:\n{diff}", t.replica);
        }
    }
    watermark
}

/// A cell for a failure message: long texts abbreviated.
fn show(c: &Cell) -> String {
    const SHOWN_CHARS_MAX: usize = 60;
    match c {
        Cell::Text(t) if t.chars().count() > SHOWN_CHARS_MAX => {
            let head: String = t.chars().take(SHOWN_CHARS_MAX).collect();
            format!("Text({head:?}.. {} chars)", t.chars().count())
        }
        other => format!("{other:?}"),
    }
}

fn show_row(row: &[Cell]) -> String {
    let cells: Vec<String> = row.iter().map(show).collect();
    format!("[{}]", cells.join(", "))
}

/// The differences between the replica's rows and upstream's, one line each; None if equal.
pub fn diff_rows(t: &Table, replica: &Rows, upstream: &Rows) -> Option<String> {
    let mut lines = Vec::new();
    for (key, want) in upstream {
        match replica.get(key) {
            None => lines.push(format!("  {key}: missing (upstream {})", show_row(want))),
            Some(got) => {
                for ((name, _), (g, w)) in t.columns.iter().zip(got.iter().zip(want)) {
                    if g != w {
                        lines.push(format!(
                            "  {key}.{name}: replica {}, upstream {}",
                            show(g),
                            show(w)
                        ));
                    }
                }
            }
        }
    }
    for (key, got) in replica {
        if !upstream.contains_key(key) {
            lines.push(format!("  {key}: extra row {}", show_row(got)));
        }
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// A TCP port nothing listens on right now (for a zcache under test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

// ---------------------------------------------------------------------------------------------
// The same helpers for a database other than `DB` (tests/nonsuper.rs: a database its role owns)

pub fn psql_in(pg: &PgCluster, db: &str, sql: &str) -> String {
    pg.psql(db, sql)
        .unwrap_or_else(|e| panic!("psql failed: {e}\n--- script:\n{sql}"))
}

/// `commit` in database `db`.
pub fn commit_in(pg: &PgCluster, db: &str, body: &str) -> CommitLsn {
    let out = psql_in(
        pg,
        db,
        &format!(
            "BEGIN;\n{body}\nSELECT pg_current_wal_insert_lsn();\nCOMMIT;\nSELECT pg_current_wal_lsn();\n"
        ),
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "unexpected psql output {out:?}");
    let at = CommitLsn {
        before: lsn(lines[lines.len() - 2]),
        after: lsn(lines[lines.len() - 1]),
    };
    assert!(at.before < at.after, "the commit wrote no WAL: {at:?}");
    at
}

/// `upstream_rows` in database `db`.
pub fn upstream_rows_in(pg: &PgCluster, db: &str, t: &Table) -> Rows {
    let exprs: Vec<String> = t
        .columns
        .iter()
        .map(|(c, k)| k.sql(&quote_ident(c)))
        .collect();
    let out = psql_in(
        pg,
        db,
        &format!(
            "SELECT coalesce(json_agg(json_build_array({})), '[]') FROM {}",
            exprs.join(", "),
            t.upstream
        ),
    );
    let rows: Vec<Vec<serde_json::Value>> = serde_json::from_str(out.trim()).expect("rows");
    keyed(
        t,
        rows.into_iter().map(|r| {
            assert_eq!(r.len(), t.columns.len());
            t.columns
                .iter()
                .zip(&r)
                .map(|((_, k), v)| expected_cell(*k, v))
                .collect()
        }),
    )
}

/// `assert_replica_equals_upstream` for upstream database `db`.
pub fn assert_replica_equals_upstream_in(
    pg: &PgCluster,
    db: &str,
    path: &Path,
    tables: &[Table],
) -> u64 {
    let (watermark, replica) = replica_snapshot(path, tables);
    for (t, got) in tables.iter().zip(replica) {
        let want = upstream_rows_in(pg, db, t);
        if let Some(diff) = diff_rows(t, &got, &want) {
            panic!("the replica's {} differs from upstream:\n{diff}", t.replica);
        }
    }
    watermark
}

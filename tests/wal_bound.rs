//! Replica hygiene: stock SQLite has no WAL2, so under continuous replication and continuous
//! readers the replica's `-wal` file could grow without bound. SQLite's own auto-checkpoint
//! is PASSIVE: it copies to the database file only the frames every open snapshot already
//! sees, and the WAL starts over from its beginning only when a writer finds it wholly copied
//! and no reader on it. When syncer shards' snapshots overlap so that some reader holds one
//! at every instant, neither ever happens and each commit lengthens the file. zcache's writer
//! forces a TRUNCATE checkpoint after a commit that leaves the WAL above
//! `REPLICA_WAL_BYTES_MAX` (`Replica::bound_wal`), which waits for the readers' short
//! snapshots to move on.
//!
//! Shown here:
//! - in process, the same load twice: a writer of small transactions while readers hold
//!   overlapping snapshots (a reader ends its snapshot only while another holds one), first
//!   through a plain connection with zcache's settings and no forced checkpoint (the WAL must
//!   outgrow the bound, or the test shows nothing), then through `Replica` (the WAL must stay
//!   under it). Every snapshot sees the transactions' invariant (rows moved between, never
//!   created: count and sum constant), sees the same rows at its end as at its start, and no
//!   reader ever gets an error (SQLITE_BUSY included).
//! - end to end, the zcache binary replicating upstream transactions under the same readers.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use support::{assert_replica_equals_upstream, free_port, lsn, psql, Canon, Table, DB};
use zcache::pgrepl::Lsn;
use zcache::sqlite::replica::{
    open_connection, to_sql, REPLICA_CHECKPOINT_RETRY_BYTES, REPLICA_CHECKPOINT_WAIT_MS_MAX,
    REPLICA_WAL_AUTOCHECKPOINT_PAGES, REPLICA_WAL_BYTES_MAX,
};
use zcache::sqlite::{Replica, ReplicaReader};
use zcache::zql::schema::{ColumnKind, ColumnSpec, TableSpec};
use zcache::zql::value::{Row, Value};

/// Rows of the table both loads update (`w (id, v, n)`, `n` starting at 0).
const ROWS: i64 = 500;
/// Bytes of each row's text, so that the rows span a hundred-odd pages and a transaction
/// dirties several of them, while a reader's scan of all rows stays quick.
const TEXT_BYTES: usize = 800;
/// Reader threads; their snapshots overlap.
const READERS: usize = 2;
/// How long each reader holds a snapshot: a syncer's short snapshot, well under the forced
/// checkpoint's wait of `REPLICA_CHECKPOINT_WAIT_MS_MAX`.
const HOLD_MS: u64 = 3;
/// Transactions of the in-process load.
const LOCAL_TXNS: u64 = 1_200;
/// Transfers per transaction (each updates two rows, keeping `sum(n)` at 0).
const TRANSFERS_PER_TXN: usize = 4;
/// Upstream transactions of the end-to-end load.
const UPSTREAM_TXNS: u32 = 4_000;
/// The bound asserted: the forced-checkpoint threshold plus room for the transactions
/// committed while a forced checkpoint waits on readers (one of these is about 40 KiB) and
/// for a few checkpoints blocked by a slow snapshot on this shared machine (each blocked one
/// puts the next off by `REPLICA_CHECKPOINT_RETRY_BYTES`).
const WAL_BOUND_BYTES: u64 = REPLICA_WAL_BYTES_MAX + 4 * REPLICA_CHECKPOINT_RETRY_BYTES + (1 << 20);
/// Longest the end-to-end test waits for zcache to start or to catch up.
const WAIT_MS: u64 = 120_000;

fn wal_path(replica: &Path) -> PathBuf {
    let mut p = replica.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

fn wal_bytes(replica: &Path) -> u64 {
    std::fs::metadata(wal_path(replica))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// The readers' common state.
#[derive(Default)]
struct Readers {
    stop: AtomicBool,
    /// Readers inside a snapshot: raised after its first read, lowered before its end, so it
    /// never counts more holders than there are.
    holding: AtomicUsize,
    /// Largest `-wal` file seen by anyone.
    wal_max: AtomicU64,
}

impl Readers {
    /// Leaves the set of holders, waiting while this reader is the only one (until `stop`):
    /// so from the first snapshot on, some reader holds one at every instant.
    fn release(&self) {
        loop {
            let n = self.holding.load(Ordering::SeqCst);
            debug_assert!(n >= 1);
            let may_leave = n >= 2 || self.stop.load(Ordering::SeqCst);
            if may_leave
                && self
                    .holding
                    .compare_exchange(n, n - 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn wait_for_a_holder(&self) {
        while self.holding.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn sample(&self, replica: &Path) -> u64 {
        let bytes = wal_bytes(replica);
        self.wal_max.fetch_max(bytes, Ordering::SeqCst);
        bytes
    }
}

/// Samples the `-wal` file every `period` until `stop`; returns how often it was smaller than
/// at the sample before (a TRUNCATE checkpoint: a WAL that SQLite restarts keeps its size up
/// to the journal size limit, which is `REPLICA_WAL_BYTES_MAX`).
fn sample_loop(replica: &Path, readers: &Readers, period: Duration) -> u64 {
    let (mut shrinks, mut before) = (0, 0);
    while !readers.stop.load(Ordering::SeqCst) {
        let now = readers.sample(replica);
        if now < before {
            shrinks += 1;
        }
        before = now;
        std::thread::sleep(period);
    }
    shrinks
}

/// What one reader did.
#[derive(Default)]
struct ReaderReport {
    snapshots: u64,
    errors: Vec<String>,
}

/// Reads `w` the way a syncer shard does (begin_snapshot / fetches / end_snapshot), holding
/// each snapshot `HOLD_MS`, until `stop`.
fn read_loop(replica: &Path, readers: &Readers) -> ReaderReport {
    let mut report = ReaderReport::default();
    let reader = match ReplicaReader::open(replica) {
        Ok(r) => r,
        Err(e) => {
            report.errors.push(format!("open: {e}"));
            return report;
        }
    };
    let mut last_watermark = 0;
    while !readers.stop.load(Ordering::SeqCst) {
        match one_snapshot(&reader, readers, &mut last_watermark) {
            Ok(()) => report.snapshots += 1,
            Err(e) => {
                let _ = reader.end_snapshot();
                if report.errors.len() < 10 {
                    report.errors.push(e);
                }
            }
        }
        readers.sample(replica);
    }
    report
}

fn one_snapshot(
    reader: &ReplicaReader,
    readers: &Readers,
    last_watermark: &mut u64,
) -> Result<(), String> {
    let began = Instant::now();
    let watermark = reader
        .begin_snapshot()
        .map_err(|e| format!("begin_snapshot: {e}"))?;
    readers.holding.fetch_add(1, Ordering::SeqCst);
    let checked = check_snapshot(reader, watermark, last_watermark, began);
    readers.release();
    let ended = reader
        .end_snapshot()
        .map_err(|e| format!("end_snapshot: {e}"));
    checked.and(ended)
}

/// The invariant of every transaction holds in the snapshot, and the snapshot does not move
/// while it is held (whatever the writer commits or checkpoints meanwhile).
fn check_snapshot(
    reader: &ReplicaReader,
    watermark: u64,
    last_watermark: &mut u64,
    began: Instant,
) -> Result<(), String> {
    if watermark < *last_watermark {
        return Err(format!(
            "watermark went back: {last_watermark} -> {watermark}"
        ));
    }
    *last_watermark = watermark;
    let rows = reader
        .fetch_rows("w", &[])
        .map_err(|e| format!("fetch: {e}"))?;
    let sum: i64 = rows
        .iter()
        .map(|r| match r[2] {
            Value::Int(n) => Ok(n),
            ref other => Err(format!("n is {other:?} at {watermark}")),
        })
        .sum::<Result<i64, String>>()?;
    if rows.len() as i64 != ROWS || sum != 0 {
        return Err(format!(
            "inconsistent snapshot at {watermark}: {} rows, sum {sum}",
            rows.len()
        ));
    }
    let hold = Duration::from_millis(HOLD_MS);
    if let Some(left) = hold.checked_sub(began.elapsed()) {
        std::thread::sleep(left);
    }
    let again = reader
        .fetch_rows("w", &[])
        .map_err(|e| format!("fetch again: {e}"))?;
    if again != rows {
        return Err(format!("the snapshot at {watermark} changed while held"));
    }
    Ok(())
}

fn spec() -> TableSpec {
    let col = |name: &str, kind, oid| ColumnSpec {
        name: name.into(),
        kind,
        pg_type_oid: oid,
    };
    TableSpec {
        name: "w".into(),
        columns: vec![
            col("id", ColumnKind::Number, 23),
            col("v", ColumnKind::String, 25),
            col("n", ColumnKind::Number, 23),
        ],
        primary_key: vec![0],
    }
}

fn row(id: i64, version: u64, n: i64) -> Row {
    let mut v = format!("{id}:{version}:");
    v.extend(std::iter::repeat_n('x', TEXT_BYTES - v.len()));
    vec![Value::Int(id), Value::Text(v), Value::Int(n)]
}

/// The in-process load: `LOCAL_TXNS` transactions of `TRANSFERS_PER_TXN` transfers between
/// pseudo-random rows, each transaction the rows it writes. The same every time.
fn local_load() -> Vec<Vec<Row>> {
    let mut n = vec![0i64; ROWS as usize];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (1..=LOCAL_TXNS)
        .map(|t| {
            let mut rows = Vec::with_capacity(2 * TRANSFERS_PER_TXN);
            for _ in 0..TRANSFERS_PER_TXN {
                let from = (next() % ROWS as u64) as usize;
                let to = (from + 1 + (next() % (ROWS as u64 - 1)) as usize) % ROWS as usize;
                let amount = 1 + (next() % 9) as i64;
                n[from] -= amount;
                n[to] += amount;
                rows.push(row(from as i64, t, n[from]));
                rows.push(row(to as i64, t, n[to]));
            }
            rows
        })
        .collect()
}

/// The replica file with `w` filled and watermark 0, as after an initial sync.
fn fresh_replica(path: &Path) {
    let mut replica = Replica::open(path).expect("open replica");
    replica.create_table(&spec()).expect("create w");
    replica.begin().expect("begin");
    for id in 0..ROWS {
        replica.upsert("w", &row(id, 0, 0)).expect("upsert");
    }
    replica.commit(0).expect("commit");
    replica.checkpoint().expect("checkpoint");
}

/// How a transaction reaches the file.
enum Writer {
    /// zcache's writer: `commit` calls `bound_wal`, as in the replicator.
    Zcache(Replica),
    /// The control: a connection with the replica's settings (WAL, synchronous=FULL,
    /// auto-checkpoint, journal size limit) and the writer's statements, without the forced
    /// checkpoint.
    Plain(Connection),
}

impl Writer {
    fn commit(&mut self, rows: &[Row], watermark: u64) {
        match self {
            Writer::Zcache(replica) => {
                replica.begin().expect("begin");
                for r in rows {
                    replica.upsert("w", r).expect("upsert");
                }
                replica.commit(watermark).expect("commit");
            }
            Writer::Plain(conn) => {
                conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
                let mut upsert = conn
                    .prepare_cached(r#"INSERT OR REPLACE INTO "w" VALUES (?1, ?2, ?3)"#)
                    .expect("prepare");
                for r in rows {
                    upsert
                        .execute(rusqlite::params_from_iter(r.iter().map(to_sql)))
                        .expect("upsert");
                }
                drop(upsert);
                conn.execute(
                    "INSERT INTO _zcache_meta (key, value) VALUES ('watermark', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [watermark.to_string()],
                )
                .expect("watermark");
                conn.execute_batch("COMMIT").expect("commit");
            }
        }
    }
}

/// What one run of the in-process load measured.
struct LocalRun {
    /// Largest `-wal` file seen (after commits, by the readers, by a sampler).
    wal_max: u64,
    /// `-wal` file after the last commit.
    wal_end: u64,
    /// Commits after which the file was smaller than after the one before: forced checkpoints
    /// that went through.
    shrinks: u64,
    snapshots: u64,
    errors: Vec<String>,
    secs: f64,
    /// Longest transaction, forced checkpoint included.
    commit_max: Duration,
}

fn run_local(forced_checkpoint: bool) -> LocalRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("replica.db");
    fresh_replica(&path);
    let load = local_load();
    let mut writer = if forced_checkpoint {
        Writer::Zcache(Replica::open(&path).expect("open replica"))
    } else {
        Writer::Plain(open_connection(&path, false).expect("open connection"))
    };
    let readers = Readers::default();
    let started = Instant::now();
    let (reports, shrinks, wal_end, commit_max) = std::thread::scope(|s| {
        let threads: Vec<_> = (0..READERS)
            .map(|_| s.spawn(|| read_loop(&path, &readers)))
            .collect();
        let sampler = s.spawn(|| sample_loop(&path, &readers, Duration::from_micros(500)));
        readers.wait_for_a_holder();
        let (mut shrinks, mut before) = (0, readers.sample(&path));
        let mut commit_max = Duration::ZERO;
        for (t, rows) in load.iter().enumerate() {
            let commit_started = Instant::now();
            writer.commit(rows, t as u64 + 1);
            commit_max = commit_max.max(commit_started.elapsed());
            let after = readers.sample(&path);
            if after < before {
                shrinks += 1;
            }
            before = after;
        }
        readers.stop.store(true, Ordering::SeqCst);
        let reports: Vec<ReaderReport> = threads
            .into_iter()
            .map(|t| t.join().expect("reader"))
            .collect();
        sampler.join().expect("sampler");
        (reports, shrinks, before, commit_max)
    });
    let secs = started.elapsed().as_secs_f64();
    // The writes all landed: the last watermark and the invariant.
    let reader = ReplicaReader::open(&path).expect("reader");
    assert_eq!(reader.begin_snapshot().expect("snapshot"), LOCAL_TXNS);
    let sum: i64 = reader
        .fetch_rows("w", &[])
        .expect("fetch")
        .iter()
        .map(|r| match r[2] {
            Value::Int(n) => n,
            _ => panic!("n is not an integer: {r:?}"),
        })
        .sum();
    assert_eq!(sum, 0);
    reader.end_snapshot().expect("end");
    LocalRun {
        wal_max: readers.wal_max.load(Ordering::SeqCst),
        wal_end,
        shrinks,
        snapshots: reports.iter().map(|r| r.snapshots).sum(),
        errors: reports.into_iter().flat_map(|r| r.errors).collect(),
        secs,
        commit_max,
    }
}

fn describe(what: &str, run: &LocalRun) {
    eprintln!(
        "WAL BOUND ({what}): {LOCAL_TXNS} transactions of {} rows in {:.1} s while {READERS} \
         readers held {} overlapping {HOLD_MS} ms snapshots; -wal file max {} bytes ({:.2} MiB), \
         {} bytes after the last commit, shrunk after {} commits; longest transaction {:.1} ms; \
         bound {WAL_BOUND_BYTES} bytes \
         (forced checkpoint above {REPLICA_WAL_BYTES_MAX}, waiting up to \
         {REPLICA_CHECKPOINT_WAIT_MS_MAX} ms; auto-checkpoint every \
         {REPLICA_WAL_AUTOCHECKPOINT_PAGES} pages)",
        2 * TRANSFERS_PER_TXN,
        run.secs,
        run.snapshots,
        run.wal_max,
        mib(run.wal_max),
        run.wal_end,
        run.shrinks,
        run.commit_max.as_secs_f64() * 1e3,
    );
}

fn assert_readers_fine(what: &str, run: &LocalRun) {
    assert!(
        run.errors.is_empty(),
        "{what}: readers failed: {:?}",
        run.errors
    );
    assert!(
        run.snapshots >= 100,
        "{what}: the readers barely read ({} snapshots)",
        run.snapshots
    );
}

#[test]
fn the_forced_checkpoint_bounds_a_wal_that_overlapping_readers_would_grow() {
    // The control: without the forced checkpoint the load must outgrow the bound, else the
    // readers do not pin the WAL and the second run would prove nothing.
    let control = run_local(false);
    describe("auto-checkpoint only", &control);
    assert_readers_fine("auto-checkpoint only", &control);
    assert!(
        control.wal_max > WAL_BOUND_BYTES,
        "without the forced checkpoint the WAL stayed at {} bytes, within the bound of \
         {WAL_BOUND_BYTES}: the readers do not pin it and the test shows nothing",
        control.wal_max
    );

    let bounded = run_local(true);
    describe("zcache's Replica", &bounded);
    assert_readers_fine("zcache's Replica", &bounded);
    assert!(
        bounded.wal_max <= WAL_BOUND_BYTES,
        "the replica's WAL reached {} bytes, over the bound of {WAL_BOUND_BYTES}",
        bounded.wal_max
    );
    assert!(
        bounded.shrinks >= 1,
        "the WAL never shrank: the load did not reach the forced checkpoint"
    );
}

/// The end-to-end load: `UPSTREAM_TXNS` transactions, each a transfer between two rows.
fn upstream_load() -> String {
    let mut sql = String::with_capacity(UPSTREAM_TXNS as usize * 120);
    for i in 0..UPSTREAM_TXNS {
        let from = (i as i64 * 7919) % ROWS;
        let to = (from + 1 + (i as i64 * 104_729) % (ROWS - 1)) % ROWS;
        let amount = 1 + i % 9;
        sql.push_str(&format!(
            "BEGIN; UPDATE w SET n = n - {amount}, v = md5(v) WHERE id = {from}; \
             UPDATE w SET n = n + {amount} WHERE id = {to}; COMMIT;\n"
        ));
    }
    sql
}

#[test]
fn the_replica_wal_stays_bounded_while_zcache_replicates() {
    let pg = support::cluster(&[]);
    psql(
        &pg,
        &format!(
            "CREATE TABLE w (id int PRIMARY KEY, v text, n int);
             INSERT INTO w SELECT i, repeat(md5(i::text), 25), 0 FROM generate_series(0, {}) i;",
            ROWS - 1
        ),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = dir.path().join("replica.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zcache"))
        .args([
            "--upstream-db",
            &pg.url(DB),
            "--port",
            &free_port().to_string(),
            "--app-id",
            "walbound",
            "--pin-cores",
            "false",
        ])
        .arg("--replica-file")
        .arg(&replica)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zcache");
    let stderr = child.stderr.take().expect("stderr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[zcache] {line}");
            if line.contains("zcache ready") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_millis(WAIT_MS))
        .expect("zcache became ready");

    let readers = Readers::default();
    let started = Instant::now();
    let (reports, target, shrinks) = std::thread::scope(|s| {
        let threads: Vec<_> = (0..READERS)
            .map(|_| s.spawn(|| read_loop(&replica, &readers)))
            .collect();
        let sampler = s.spawn(|| sample_loop(&replica, &readers, Duration::from_millis(1)));
        readers.wait_for_a_holder();
        psql(&pg, &upstream_load());
        let target = lsn(&psql(&pg, "SELECT pg_current_wal_lsn()"));
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        loop {
            let reader = ReplicaReader::open(&replica).expect("reader");
            let w = reader.begin_snapshot().expect("snapshot");
            reader.end_snapshot().expect("end");
            if w >= target {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica at {} did not reach {}",
                Lsn(w),
                Lsn(target)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        readers.stop.store(true, Ordering::SeqCst);
        let reports: Vec<ReaderReport> = threads
            .into_iter()
            .map(|t| t.join().expect("reader"))
            .collect();
        let shrinks = sampler.join().expect("sampler");
        (reports, target, shrinks)
    });
    let secs = started.elapsed().as_secs_f64();
    let table = Table::new(
        "public",
        "w",
        &[("id", Canon::Int), ("v", Canon::Text), ("n", Canon::Int)],
        &["id"],
    );
    assert_replica_equals_upstream(&pg, &replica, &[table]);
    let _ = child.kill();
    let _ = child.wait();
    let max = readers.wal_max.load(Ordering::SeqCst);
    let snapshots: u64 = reports.iter().map(|r| r.snapshots).sum();
    let errors: Vec<&String> = reports.iter().flat_map(|r| &r.errors).collect();
    eprintln!(
        "WAL BOUND (zcache binary): {UPSTREAM_TXNS} upstream transactions replicated to {} in \
         {secs:.1} s while {READERS} readers held {snapshots} overlapping {HOLD_MS} ms \
         snapshots; -wal file max {max} bytes ({:.2} MiB), seen shrinking {shrinks} times; \
         bound {WAL_BOUND_BYTES} bytes",
        Lsn(target),
        mib(max),
    );
    assert!(errors.is_empty(), "readers failed: {errors:?}");
    assert!(snapshots >= 100, "the readers barely read: {snapshots}");
    assert!(
        max <= WAL_BOUND_BYTES,
        "the replica's WAL reached {max} bytes, over the bound of {WAL_BOUND_BYTES}"
    );
    assert!(
        shrinks >= 1,
        "the WAL (max {max} bytes) was never truncated: the load did not reach the forced \
         checkpoint, so the bound shows nothing"
    );
}

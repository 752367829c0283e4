//! Replica hygiene: stock SQLite has no WAL2, so under continuous replication and continuous
//! readers the replica's `-wal` file could grow without bound (a checkpoint cannot complete
//! while a reader needs old frames, and the WAL restarts only when none does). The writer
//! keeps it bounded (auto-checkpoint every `REPLICA_WAL_AUTOCHECKPOINT_PAGES` pages, a forced
//! TRUNCATE checkpoint above `REPLICA_WAL_BYTES_MAX`); readers keep their snapshots short.
//!
//! Here: the zcache binary replicates 20k small upstream transactions while two reader
//! threads read the replica the way syncer shards do (begin_snapshot / fetch / end_snapshot
//! in a loop, their snapshots overlapping), and the `-wal` file's size is sampled throughout.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{assert_replica_equals_upstream, free_port, lsn, psql, Canon, Table, DB};
use zcache::pgrepl::Lsn;
use zcache::sqlite::replica::{REPLICA_WAL_AUTOCHECKPOINT_PAGES, REPLICA_WAL_BYTES_MAX};
use zcache::sqlite::ReplicaReader;
use zcache::zql::value::Value;

/// Upstream transactions of the load.
const TXNS: u32 = 20_000;
/// Rows of the table the load updates.
const ROWS: u32 = 2_000;
/// Reader threads, reading all the time.
const READERS: usize = 2;
/// Every this many reads, a reader scans the whole table (a longer snapshot).
const SCAN_EVERY: u64 = 25;
/// The bound asserted: the forced-checkpoint threshold plus one small transaction's frames
/// (the check runs after each commit) with room to spare.
const WAL_BOUND_BYTES: u64 = REPLICA_WAL_BYTES_MAX + (1 << 20);
/// Longest the test waits for zcache to start or to catch up.
const WAIT_MS: u64 = 180_000;

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

/// The load: `TXNS` single-statement transactions, mostly updates, some inserts and deletes.
fn load_script() -> String {
    let mut sql = String::with_capacity(TXNS as usize * 80);
    for i in 0..TXNS {
        let id = (i * 7919) % ROWS;
        match i % 10 {
            0 => sql.push_str(&format!(
                "INSERT INTO w VALUES ({}, md5('{i}'), {i}) ON CONFLICT (id) DO NOTHING;\n",
                ROWS + i
            )),
            1 => sql.push_str(&format!("DELETE FROM w WHERE id = {};\n", ROWS + i - 1)),
            _ => sql.push_str(&format!(
                "UPDATE w SET n = n + 1, v = md5(v) WHERE id = {id};\n"
            )),
        }
    }
    sql
}

/// Reads the replica as a syncer shard does until `stop`; returns the reads made.
fn read_loop(replica: &Path, stop: &AtomicBool, wal_max: &AtomicU64, seed: u64) -> u64 {
    let reader = ReplicaReader::open(replica).expect("reader");
    let mut reads = 0u64;
    let mut x = seed | 1;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        reader.begin_snapshot().expect("snapshot");
        let rows = if reads.is_multiple_of(SCAN_EVERY) {
            reader.fetch_rows("w", &[]).expect("scan")
        } else {
            let id = Value::Int((x % ROWS as u64) as i64);
            reader.fetch_rows("w", &[(0, id)]).expect("fetch")
        };
        std::hint::black_box(rows);
        reader.end_snapshot().expect("end snapshot");
        wal_max.fetch_max(wal_bytes(replica), Ordering::Relaxed);
        reads += 1;
    }
    reads
}

#[test]
fn the_replica_wal_stays_bounded_under_writes_and_reads() {
    let pg = support::cluster(&[]);
    psql(
        &pg,
        &format!(
            "CREATE TABLE w (id int PRIMARY KEY, v text, n int);
             INSERT INTO w SELECT i, md5(i::text), 0 FROM generate_series(0, {}) i;",
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

    let stop = AtomicBool::new(false);
    let wal_max = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (reads, target, caught_up) = std::thread::scope(|s| {
        let readers: Vec<_> = (0..READERS)
            .map(|n| {
                let (replica, stop, wal_max) = (&replica, &stop, &wal_max);
                s.spawn(move || read_loop(replica, stop, wal_max, 0x9e37_79b9 + n as u64))
            })
            .collect();
        // A sampler independent of the readers' pace.
        let sampler = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                wal_max.fetch_max(wal_bytes(&replica), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        psql(&pg, &load_script());
        let target = lsn(&psql(&pg, "SELECT pg_current_wal_lsn()"));
        let loaded = started.elapsed();
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
        let caught_up = (loaded, started.elapsed());
        stop.store(true, Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        sampler.join().expect("sampler");
        (reads, target, caught_up)
    });
    let table = Table::new(
        "public",
        "w",
        &[("id", Canon::Int), ("v", Canon::Text), ("n", Canon::Int)],
        &["id"],
    );
    assert_replica_equals_upstream(&pg, &replica, &[table]);
    let _ = child.kill();
    let _ = child.wait();
    let max = wal_max.load(Ordering::Relaxed);
    eprintln!(
        "WAL BOUND: {TXNS} upstream transactions replicated to {} (load {:.1} s, replica caught \
         up at {:.1} s) while {READERS} readers made {reads} reads; -wal file max {max} bytes \
         ({:.2} MiB); bound {WAL_BOUND_BYTES} bytes (auto-checkpoint {} pages, forced \
         checkpoint above {REPLICA_WAL_BYTES_MAX} bytes)",
        Lsn(target),
        caught_up.0.as_secs_f64(),
        caught_up.1.as_secs_f64(),
        max as f64 / (1 << 20) as f64,
        REPLICA_WAL_AUTOCHECKPOINT_PAGES,
    );
    assert!(reads > 1000, "the readers barely read: {reads}");
    assert!(
        max <= WAL_BOUND_BYTES,
        "the replica's WAL reached {max} bytes, over the bound of {WAL_BOUND_BYTES}"
    );
}

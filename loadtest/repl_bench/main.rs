//! Replication benchmark: initial sync rows/s and MB/s, then streaming throughput and
//! upstream-commit -> replica-commit latency, against a throwaway PostgreSQL.
//!
//!   cargo run --release --example repl_bench -- --rows 1000000
//!   cargo run --release --example repl_bench -- --shape kit      # zero-cache kit's 60,101 rows
//!
//! Streaming has two phases, each of `--changes` row changes in transactions of `--tx-rows`
//! (alternately 500 inserts and 500 updates by primary key, zero-cache's benchmark shape):
//! - catch-up: the changes are committed upstream while the replicator is not streaming, then
//!   it is started and timed until the replica holds the last one (pure replication rate);
//! - live: the changes are committed while it streams; each upstream commit (as its client saw
//!   it return) is matched to the VersionReady of that commit (sent after the SQLite commit).

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use glommio::channels::shared_channel;
use glommio::LocalExecutorBuilder;
use hdrhistogram::Histogram;
use zcache::config::Config;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};
use zcache::pgrepl::{connect, ConnConfig, Lsn};
use zcache::replicator;

const DB: &str = "postgres";

#[derive(Parser, Debug, Clone)]
struct Args {
    /// `big`: one table `issue` of --rows rows; `kit`: the reference kit's user/issue/comment.
    #[arg(long, default_value = "big")]
    shape: String,
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Row changes per streaming phase (0: skip streaming).
    #[arg(long, default_value_t = 100_000)]
    changes: u64,
    #[arg(long, default_value_t = 500)]
    tx_rows: u64,
    /// Initial syncs to run (each from an empty replica); the best and median are reported.
    #[arg(long, default_value_t = 3)]
    syncs: usize,
    /// Pause between the live phase's transactions, in ms (0: back to back, which measures
    /// latency under saturation; a pause measures it below capacity).
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
}

fn psql(pg: &PgCluster, sql: &str) -> String {
    pg.psql(DB, sql)
        .unwrap_or_else(|e| panic!("psql failed: {e}"))
}

fn seed(pg: &PgCluster, args: &Args) -> (u64, Vec<&'static str>) {
    let issue_ddl = "CREATE TABLE issue(id text primary key, title text, status text, \
                     priority int, created bigint, owner_id text)";
    let issues = |n: u64| {
        format!(
            "INSERT INTO issue SELECT 'i'||i, 'Issue title '||i, \
             (ARRAY['open','closed','in_progress'])[1+(i%3)], i%5, 1700000000000+i*1000, \
             'u'||(1+i%100) FROM generate_series(1,{n}) i;"
        )
    };
    match args.shape.as_str() {
        "kit" => {
            psql(
                pg,
                &format!(
                    "CREATE TABLE \"user\"(id text primary key, name text);
                     {issue_ddl};
                     CREATE TABLE comment(id text primary key, issue_id text, body text, created bigint);
                     INSERT INTO \"user\" SELECT 'u'||i, 'User '||i FROM generate_series(1,100) i;
                     {}
                     INSERT INTO comment SELECT 'c'||i, 'i'||(1+(i%10000)), 'Comment body '||i,
                       1700000000000+i*100 FROM generate_series(1,50000) i;
                     CREATE INDEX ON comment(issue_id);
                     CREATE INDEX ON issue(status, created);
                     ANALYZE;",
                    issues(10_000)
                ),
            );
            (60_100, vec!["user", "issue", "comment"])
        }
        _ => {
            psql(
                pg,
                &format!(
                    "{issue_ddl}; {} CREATE INDEX ON issue(status, created); ANALYZE;",
                    issues(args.rows)
                ),
            );
            (args.rows, vec!["issue"])
        }
    }
}

fn config(pg: &PgCluster, replica: &Path) -> Config {
    Config::try_parse_from([
        "zcache",
        "--upstream-db",
        &pg.url(DB),
        "--replica-file",
        &replica.display().to_string(),
        "--app-id",
        "bench",
    ])
    .expect("config")
}

/// One upstream transaction of the streaming load: the client-side time its COMMIT returned
/// and the WAL insert position just after it (>= its commit's end LSN).
#[derive(Clone, Copy)]
struct Committed {
    at: Instant,
    lsn_after: u64,
}

/// Commits `changes` row changes in transactions of `tx_rows` on its own thread and executor.
fn produce(url: String, first_tx: u64, args: Args) -> std::thread::JoinHandle<Vec<Committed>> {
    std::thread::spawn(move || {
        LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(async move {
                let cfg = ConnConfig::parse(&url).expect("url");
                let mut conn = connect(&cfg, false).await.expect("producer connect");
                let txs = args.changes.div_ceil(args.tx_rows);
                let mut out = Vec::with_capacity(txs as usize);
                for t in first_tx..first_tx + txs {
                    let (a, b) = (t * args.tx_rows + 1, (t + 1) * args.tx_rows);
                    let change = if t % 2 == 0 {
                        format!(
                            "INSERT INTO issue SELECT 'n'||g, 'New issue '||g, 'open', g%5, \
                             1800000000000+g, 'u'||(1+g%100) FROM generate_series({a},{b}) g"
                        )
                    } else {
                        format!(
                            "UPDATE issue SET priority = priority + 1, status = 'closed' \
                             WHERE id = ANY(ARRAY(SELECT 'i'||g FROM generate_series({a},{b}) g))"
                        )
                    };
                    let sql = format!("BEGIN; {change}; COMMIT");
                    conn.execute(&sql).await.expect("producer commit");
                    let at = Instant::now();
                    let r = conn
                        .simple_query("SELECT pg_current_wal_insert_lsn()")
                        .await
                        .expect("lsn");
                    let text = r[0].rows[0][0].clone().expect("lsn text");
                    let lsn: Lsn = text.parse().expect("lsn parse");
                    out.push(Committed {
                        at,
                        lsn_after: lsn.0,
                    });
                    if args.pace_ms > 0 && first_tx > 0 {
                        glommio::timer::sleep(Duration::from_millis(args.pace_ms)).await;
                    }
                }
                out
            })
    })
}

/// Which transaction a watermark belongs to: the first whose `lsn_after` is at or past it.
fn tx_of(commits: &[Committed], watermark: u64) -> Option<usize> {
    let i = commits.partition_point(|c| c.lsn_after < watermark);
    (i < commits.len()).then_some(i)
}

struct SyncFigures {
    secs: Vec<f64>,
    /// This process's CPU time (user + system) per sync.
    cpu_secs: Vec<f64>,
}

/// This process's CPU time so far, user plus system.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

struct StreamFigures {
    catchup_secs: f64,
    catchup_cpu_secs: f64,
    live_secs: f64,
    latency: Histogram<u64>,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let pg = PgCluster::start(PgClusterOptions {
        extra_conf: vec![
            "fsync = off".into(),
            "synchronous_commit = on".into(),
            "max_wal_size = '4GB'".into(),
            "shared_buffers = '256MB'".into(),
        ],
        ..PgClusterOptions::default()
    })
    .expect("start PostgreSQL");
    let t = Instant::now();
    let (rows, tables) = seed(&pg, &args);
    eprintln!("seeded {rows} rows in {:.1} s", t.elapsed().as_secs_f64());
    let quoted: Vec<String> = tables.iter().map(|t| format!("'\"{t}\"'")).collect();
    let bytes: u64 = psql(
        &pg,
        &format!(
            "SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(ARRAY[{}]) t",
            quoted.join(",")
        ),
    )
    .trim()
    .parse()
    .expect("size");
    let heap_bytes: u64 = psql(
        &pg,
        &format!(
            "SELECT sum(pg_relation_size(t::regclass)) FROM unnest(ARRAY[{}]) t",
            quoted.join(",")
        ),
    )
    .trim()
    .parse()
    .expect("size");
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = dir.path().join("replica.db");
    let cfg = config(&pg, &replica);
    let upstream = ConnConfig::parse(&pg.url(DB)).expect("url");

    let (sync, stream) = LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("executor")
        .run(async {
            let mut secs = Vec::new();
            let mut cpu = Vec::new();
            let mut prepared = None;
            for _ in 0..args.syncs.max(1) {
                drop(prepared.take());
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", replica.display()));
                }
                let t = Instant::now();
                let c = cpu_secs();
                let p = replicator::prepare(&cfg, &upstream)
                    .await
                    .unwrap_or_else(|e| panic!("prepare: {e}"));
                secs.push(t.elapsed().as_secs_f64());
                cpu.push(cpu_secs() - c);
                prepared = Some(p);
            }
            let prepared = prepared.expect("prepared");
            let synced: i64 = tables
                .iter()
                .map(|t| {
                    rusqlite::Connection::open(&replica)
                        .expect("open replica")
                        .query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| {
                            r.get::<_, i64>(0)
                        })
                        .expect("count")
                })
                .sum::<i64>();
            assert_eq!(synced as u64, rows, "the replica lacks rows");
            if args.changes == 0 {
                return (
                    SyncFigures {
                        secs,
                        cpu_secs: cpu,
                    },
                    None,
                );
            }
            (
                SyncFigures {
                    secs,
                    cpu_secs: cpu,
                },
                Some(stream_phases(&args, &pg, prepared).await),
            )
        });
    print_table(&args, rows, bytes, heap_bytes, &sync, stream.as_ref());
}

async fn stream_phases(
    args: &Args,
    pg: &PgCluster,
    prepared: replicator::Prepared,
) -> StreamFigures {
    let txs = args.changes.div_ceil(args.tx_rows);
    // Catch-up: everything committed first, then the replicator starts.
    let backlog = produce(pg.url(DB), 0, args.clone())
        .join()
        .expect("producer");
    let (tx, rx) = shared_channel::new_bounded(4096);
    let upstream = ConnConfig::parse(&pg.url(DB)).expect("url");
    let t = Instant::now();
    let cpu = cpu_secs();
    let task = glommio::spawn_local(async move {
        let tx = tx.connect().await;
        replicator::stream_forever(upstream, prepared, vec![tx], Default::default()).await;
    });
    let rx = rx.connect().await;
    let last = backlog.last().expect("commits").lsn_after;
    let prior = backlog
        .len()
        .checked_sub(2)
        .map_or(0, |i| backlog[i].lsn_after);
    loop {
        let v = rx.recv().await.expect("version channel");
        if v.watermark > prior && v.watermark <= last {
            break;
        }
    }
    let catchup_secs = t.elapsed().as_secs_f64();
    let catchup_cpu_secs = cpu_secs() - cpu;
    // Live: the producer commits while the replicator streams.
    let t = Instant::now();
    let live = produce(pg.url(DB), txs, args.clone());
    let mut received: Vec<(Instant, u64)> = Vec::with_capacity(txs as usize);
    while (received.len() as u64) < txs {
        let timeout = async {
            glommio::timer::sleep(Duration::from_secs(120)).await;
            None
        };
        let v = futures_lite::future::or(async { rx.recv().await }, timeout)
            .await
            .expect("a VersionReady within 120 s");
        received.push((Instant::now(), v.watermark));
    }
    let live_secs = t.elapsed().as_secs_f64();
    let commits = live.join().expect("producer");
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    for (at, w) in received {
        if let Some(i) = tx_of(&commits, w) {
            let us = at.saturating_duration_since(commits[i].at).as_micros() as u64;
            latency.record(us.max(1)).expect("record");
        }
    }
    task.cancel().await;
    StreamFigures {
        catchup_secs,
        catchup_cpu_secs,
        live_secs,
        latency,
    }
}

fn print_table(
    args: &Args,
    rows: u64,
    bytes: u64,
    heap_bytes: u64,
    sync: &SyncFigures,
    stream: Option<&StreamFigures>,
) {
    let mut s = sync.secs.clone();
    s.sort_by(f64::total_cmp);
    let best = s[0];
    let median = s[s.len() / 2];
    let mb = bytes as f64 / 1e6;
    println!();
    println!(
        "repl_bench shape={} rows={rows} upstream size={:.1} MB (heap {:.1} MB)",
        args.shape,
        mb,
        heap_bytes as f64 / 1e6
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| initial sync (prepare), best of {} | {:.3} s = {:.0} rows/s, {:.1} MB/s |",
        s.len(),
        best,
        rows as f64 / best,
        mb / best
    );
    println!(
        "| initial sync, median | {:.3} s = {:.0} rows/s, {:.1} MB/s |",
        median,
        rows as f64 / median,
        mb / median
    );
    let mut c = sync.cpu_secs.clone();
    c.sort_by(f64::total_cmp);
    println!(
        "| zcache CPU per sync, min / median | {:.3} s / {:.3} s ({:.0} rows per CPU-second) |",
        c[0],
        c[c.len() / 2],
        rows as f64 / c[0]
    );
    if let Some(st) = stream {
        println!(
            "| streaming catch-up, {} changes in txs of {} | {:.3} s = {:.0} changes/s |",
            args.changes,
            args.tx_rows,
            st.catchup_secs,
            args.changes as f64 / st.catchup_secs
        );
        println!(
            "| zcache CPU during catch-up | {:.3} s ({:.0} changes per CPU-second) |",
            st.catchup_cpu_secs,
            args.changes as f64 / st.catchup_cpu_secs
        );
        println!(
            "| streaming live, {} changes | {:.3} s = {:.0} changes/s |",
            args.changes,
            st.live_secs,
            args.changes as f64 / st.live_secs
        );
        let l = &st.latency;
        println!(
            "| commit -> replica commit latency (live, pace {} ms, n={}) | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
            args.pace_ms,
            l.len(),
            l.value_at_quantile(0.5) as f64 / 1e3,
            l.value_at_quantile(0.99) as f64 / 1e3,
            l.max() as f64 / 1e3
        );
    }
}

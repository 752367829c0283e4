//! `loadtest`: zcache's load harness. It speaks the Zero sync protocol v51 itself (no Node), so
//! the same run can be pointed at zcache and at the real zero-cache. See loadtest/README.md.

mod cli;
mod client;
mod poke;
mod protocol;
mod report;
mod rss;
mod schema;
mod stats;
mod writer;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cli::Args;
use crate::client::{run_client, ClientCtx, ClientSpec};
use crate::protocol::RowFilter;
use crate::report::{Config, Latency, ReceiversPerRow, Report, RssMib};
use crate::rss::RssTrack;
use crate::stats::Stats;
use crate::writer::{KeyPool, TokenBook, WriterConfig, WriterShared, KEY_POOL_MAX, TOKEN_BOOK_MAX};

/// After the measured period the writer stops and clients get `--drain` for the last pokes; a
/// drain longer than this ends once no commit->poke sample has come for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(2);
/// How long closing clients may take before their tasks are aborted.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("loadtest: {e:#}");
        return ExitCode::from(2);
    }
    let mut builder = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// Counter values at one instant, to turn totals into rates over the measured period.
#[derive(Clone, Copy, Debug)]
struct Snap {
    at: Instant,
    pokes: u64,
    frames: u64,
    bytes: u64,
    rows_put: u64,
    rows_written: u64,
    txs: u64,
    cpu_ns: u64,
}

impl Snap {
    fn take(s: &Stats) -> Snap {
        Snap {
            at: Instant::now(),
            pokes: s.pokes.get(),
            frames: s.frames_in.get(),
            bytes: s.bytes_in.get(),
            rows_put: s.rows_put.get(),
            rows_written: s.rows_written.get(),
            txs: s.txs_written.get(),
            cpu_ns: rss::own_cpu_ns().unwrap_or(0),
        }
    }
}

struct Setup {
    client_schema: Option<serde_json::Value>,
    writer: Option<(WriterConfig, String)>,
}

async fn setup_upstream(args: &Args, first_seq: u64) -> anyhow::Result<Setup> {
    let Some(url) = &args.upstream_db else {
        eprintln!("note: no --upstream-db: no client schema is sent (zero-cache requires one) and nothing is written");
        return Ok(Setup {
            client_schema: None,
            writer: None,
        });
    };
    let pg = writer::connect(url).await?;
    let schema = schema::load_client_schema(&pg)
        .await
        .context("deriving the client schema")?;
    if schema.tables.is_empty() {
        eprintln!("note: no tables in schema public of the upstream database");
    }
    let writer = if args.write_rate > 0.0 {
        let cfg = WriterConfig {
            url: url.clone(),
            table: args.write_table.clone(),
            key: args.write_key.clone(),
            column: args.write_column.clone(),
            rows_per_s: args.write_rate,
            tx_size: args.tx_size,
            first_seq,
        };
        let sql = writer::update_sql(&cfg, &schema)?;
        Some((cfg, sql))
    } else {
        None
    };
    Ok(Setup {
        client_schema: Some(schema.to_json()),
        writer,
    })
}

/// Starts the clients at `--connect-rate`, then waits for `stop` and closes them.
async fn launch_clients(
    args: Arc<Args>,
    ctx: Arc<ClientCtx>,
    run_id: String,
    mut stop: watch::Receiver<bool>,
) {
    let groups = args.effective_groups();
    let started = Instant::now();
    let mut set = JoinSet::new();
    let mut next = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while next < args.clients && !*stop.borrow() {
        let due = if args.connect_rate <= 0.0 {
            args.clients
        } else {
            ((started.elapsed().as_secs_f64() * args.connect_rate) as usize + 1).min(args.clients)
        };
        while next < due {
            let group = next % groups;
            let spec = ClientSpec {
                client_id: format!("lt{run_id}c{next}"),
                group_id: format!("lt{run_id}g{group}"),
                queries: args.group_queries(group),
            };
            set.spawn(run_client(spec, ctx.clone(), stop.clone()));
            next += 1;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
    }
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    let closing = async { while set.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_GRACE, closing).await.is_err() {
        set.abort_all();
    }
}

/// Whether the drain is over: `max` has passed, or (past [`DRAIN_QUIET`]) no commit->poke
/// sample has come for [`DRAIN_QUIET`]. A drain of at most `DRAIN_QUIET` is a plain wait.
fn drain_done(elapsed: Duration, since_last_sample: Duration, max: Duration) -> bool {
    elapsed >= max || (elapsed >= DRAIN_QUIET && since_last_sample >= DRAIN_QUIET)
}

/// Waits for the pokes of rows committed in the measured period (see [`drain_done`]); returns
/// how long it waited.
async fn drain(stats: &Stats, max: Duration) -> Duration {
    let start = Instant::now();
    let mut seen = stats.token_matches.get();
    let mut last_sample = start;
    loop {
        let now = Instant::now();
        let m = stats.token_matches.get();
        if m != seen {
            seen = m;
            last_sample = now;
        }
        let elapsed = now.duration_since(start);
        if drain_done(elapsed, now.duration_since(last_sample), max) {
            return elapsed;
        }
        tokio::time::sleep(Duration::from_millis(100).min(max - elapsed)).await;
    }
}

fn p50_ms(h: &stats::LatencyHist) -> String {
    let h = h.lock();
    if h.is_empty() {
        "-".into()
    } else {
        format!("{:.1}", h.value_at_quantile(0.5) as f64 / 1000.0)
    }
}

fn progress(stats: &Stats, args: &Args, phase: &str, prev: &Snap, rss: Option<u64>) -> Snap {
    let now = Snap::take(stats);
    let dt = now.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let rss = rss.map_or_else(String::new, |k| {
        format!(" | rss {:.0} MiB", k as f64 / 1024.0)
    });
    eprintln!(
        "[{:>5.1}s {:<7}] open {}/{} hydrated {} | {:.0} pokes/s {:.0} KiB/s | writes {:.0} rows/s | p50 ms: connect {} hydration {} commit->poke {} | errors {}{}",
        stats.started.elapsed().as_secs_f64(),
        phase,
        stats.open.get(),
        args.clients,
        stats.hydrated.get(),
        (now.pokes - prev.pokes) as f64 / dt,
        (now.bytes - prev.bytes) as f64 / dt / 1024.0,
        (now.rows_written - prev.rows_written) as f64 / dt,
        p50_ms(&stats.connect),
        p50_ms(&stats.hydration),
        p50_ms(&stats.commit_to_poke),
        stats.error_total(),
        rss
    );
    now
}

async fn run(args: Args) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let ws_base = protocol::connect_base(&args.server)?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let run_id = base36(now_ms);
    // Token numbers start at a run-unique value: rows left by earlier runs never match.
    let first_seq = now_ms.saturating_mul(1000);
    let setup = setup_upstream(&args, first_seq).await?;

    let stats = Arc::new(Stats::new());
    let keys = Arc::new(KeyPool::new(KEY_POOL_MAX));
    let book = Arc::new(TokenBook::new(TOKEN_BOOK_MAX));
    let ctx = Arc::new(ClientCtx {
        ws_base,
        auth: args.auth.clone(),
        user_id: args.user_id.clone(),
        ttl_ms: args.ttl_ms,
        client_schema: setup.client_schema,
        filter: RowFilter {
            table: args.write_table.clone(),
            key: args.write_key.clone(),
            column: args.write_column.clone(),
        },
        collect_keys: setup.writer.is_some(),
        reconnect: !args.no_reconnect,
        stats: stats.clone(),
        keys: keys.clone(),
        book: book.clone(),
    });

    let sample_rss = || args.server_pid.and_then(rss::tree_rss_kib);
    let mut rss = RssTrack::default();
    rss.sample(sample_rss());
    if args.server_pid.is_some() && rss.start_kib.is_none() {
        eprintln!("note: no process with --server-pid; RSS is n/a");
    }

    let (stop_clients, stop_clients_rx) = watch::channel(false);
    let (stop_writer, stop_writer_rx) = watch::channel(false);
    let launcher = tokio::spawn(launch_clients(args.clone(), ctx, run_id, stop_clients_rx));
    let writer_task = setup.writer.map(|(cfg, sql)| {
        let shared = Arc::new(WriterShared {
            stats: stats.clone(),
            keys,
            book: book.clone(),
        });
        tokio::spawn(writer::run_writer(cfg, sql, shared, stop_writer_rx))
    });

    let measure_at = stats.started + args.warmup;
    let end_at = measure_at + args.duration;
    let mut next_progress = stats.started + PROGRESS_EVERY;
    let mut last = Snap::take(&stats);
    let mut start_snap: Option<Snap> = None;
    let end_snap = loop {
        let target = if start_snap.is_none() {
            measure_at
        } else {
            end_at
        };
        tokio::time::sleep_until(next_progress.min(target).into()).await;
        let now = Instant::now();
        if start_snap.is_none() && now >= measure_at {
            stats.begin_measure(now);
            start_snap = Some(Snap::take(&stats));
        }
        if start_snap.is_some() && now >= end_at {
            stats.end_measure(now);
            break Snap::take(&stats);
        }
        if now >= next_progress {
            let kib = sample_rss();
            rss.sample(kib);
            if !args.quiet {
                let phase = if start_snap.is_some() {
                    "measure"
                } else {
                    "warmup"
                };
                last = progress(&stats, &args, phase, &last, kib);
            }
            next_progress += PROGRESS_EVERY;
        }
    };
    rss.sample(sample_rss());
    let rss_end = rss.end_kib;

    let _ = stop_writer.send(true);
    if let Some(w) = writer_task {
        let _ = w.await;
    }
    let drained = drain(&stats, args.drain).await;
    let connected_end = stats.open.get();
    let _ = stop_clients.send(true);
    let _ = launcher.await;

    let start_snap = start_snap.unwrap_or(end_snap);
    let measured_s = end_snap
        .at
        .duration_since(start_snap.at)
        .as_secs_f64()
        .max(1e-3);
    let rate = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / measured_s;
    let delivery = book.delivery_between(start_snap.at, end_snap.at);
    let mut latency = BTreeMap::new();
    latency.insert("connect", Latency::from_hist(&stats.connect.snapshot()));
    latency.insert("hydration", Latency::from_hist(&stats.hydration.snapshot()));
    latency.insert(
        "commit->poke",
        Latency::from_hist(&stats.commit_to_poke.snapshot()),
    );
    latency.insert("commit", Latency::from_hist(&stats.commit.snapshot()));
    let mib = |k: Option<u64>| k.map(|k| (k as f64 / 1024.0 * 10.0).round() / 10.0);
    let report = Report {
        config: Config {
            server: args.server.clone(),
            clients: args.clients,
            groups: args.effective_groups(),
            queries: args.effective_queries().iter().map(|q| q.label()).collect(),
            query_mix: args.query_mix,
            connect_rate: args.connect_rate,
            write_rate: args.write_rate,
            tx_size: args.tx_size,
            write_target: format!(
                "{}.{} (key {})",
                args.write_table, args.write_column, args.write_key
            ),
            warmup_s: args.warmup.as_secs_f64(),
            duration_s: args.duration.as_secs_f64(),
            server_pid: args.server_pid,
        },
        measured_s,
        drained_s: (drained.as_secs_f64() * 10.0).round() / 10.0,
        clients_connected_end: connected_end,
        clients_hydrated: stats.hydrated.get(),
        connects: stats.connects.get(),
        latency,
        pokes_per_s: rate(start_snap.pokes, end_snap.pokes),
        frames_per_s: rate(start_snap.frames, end_snap.frames),
        bytes_per_s: rate(start_snap.bytes, end_snap.bytes),
        rows_received_per_s: rate(start_snap.rows_put, end_snap.rows_put),
        rows_written_per_s: rate(start_snap.rows_written, end_snap.rows_written),
        txs_written: end_snap.txs.saturating_sub(start_snap.txs),
        rows_committed_measured: delivery.committed,
        rows_unseen: delivery.unseen,
        rows_superseded: delivery.superseded,
        receivers_per_row: ReceiversPerRow::from(&delivery),
        harness_cpu_percent: (end_snap.cpu_ns.saturating_sub(start_snap.cpu_ns) as f64
            / 1e7
            / measured_s)
            .round(),
        server_rss_mib: RssMib {
            start: mib(rss.start_kib),
            peak: mib(rss.peak_kib),
            end: mib(rss_end),
        },
        errors: stats.errors(),
    };
    let json = serde_json::to_string(&report)?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{base36, drain_done};
    use std::time::Duration;

    #[test]
    fn drain_ends_at_max_or_after_a_quiet_spell() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // The default 1 s: a plain wait, samples or not.
        assert!(!drain_done(ms(900), s(5), s(1)));
        assert!(drain_done(s(1), ms(0), s(1)));
        // A long drain: on while samples come, over after 2 s without one, or at the cap.
        assert!(!drain_done(ms(1500), ms(1500), s(60)));
        assert!(!drain_done(s(20), ms(300), s(60)));
        assert!(drain_done(s(20), s(2), s(60)));
        assert!(drain_done(s(60), ms(1), s(60)));
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }
}

//! The Prometheus text exposition format (version 0.0.4) of the collected figures.

use super::registry::{Collected, ShardGauges, TimingHistogram};
use super::Timing;
use std::fmt::Write;

/// Upper bounds of the exported histogram buckets, in microseconds: 0.1 ms to 30 s in ~2x
/// steps (zero-cache's latency buckets, 1 ms to 30 s, with three finer ones below them,
/// since zcache's hydrations and pokes often take well under a millisecond).
pub const BUCKET_BOUNDS_US: [u64; 17] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000, 30_000_000,
];

/// The Content-Type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// Every metric, as the body of a `/metrics` answer.
pub fn render(c: &Collected) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for t in Timing::ALL {
        write_histogram(&mut out, t.name(), t.help(), c.timings.get(t));
    }
    for g in Gauge::ALL {
        let values: Vec<(&str, u64)> = c
            .gauges
            .iter()
            .map(|(label, gauges)| (label.as_str(), g.of(gauges)))
            .collect();
        write_shard_gauge(&mut out, g.name(), g.help(), &values);
    }
    write_header(&mut out, UPTIME_NAME, UPTIME_HELP, "gauge");
    let _ = writeln!(out, "{UPTIME_NAME} {}", c.uptime.as_secs_f64());
    out
}

const UPTIME_NAME: &str = "zero_server_uptime_seconds";
const UPTIME_HELP: &str = "Seconds since zcache started its executors.";

/// The per-shard gauges (label `shard`).
#[derive(Clone, Copy, Debug)]
enum Gauge {
    Connections,
    ClientGroups,
    Queries,
    Rows,
    QueuedBytes,
}

impl Gauge {
    const ALL: [Gauge; 5] = [
        Gauge::Connections,
        Gauge::ClientGroups,
        Gauge::Queries,
        Gauge::Rows,
        Gauge::QueuedBytes,
    ];

    fn name(self) -> &'static str {
        match self {
            Gauge::Connections => "zero_sync_websocket_open_connections",
            Gauge::ClientGroups => "zero_sync_active_client_groups",
            Gauge::Queries => "zero_sync_queries",
            Gauge::Rows => "zero_sync_rows",
            Gauge::QueuedBytes => "zcache_sync_queued_bytes",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Gauge::Connections => "Open client WebSocket connections (joined to a client group), per syncer shard.",
            Gauge::ClientGroups => "Client groups held in memory, per syncer shard.",
            Gauge::Queries => "Queries in the client view records of those groups (desired or got), per syncer shard.",
            Gauge::Rows => "Rows tracked by the client view records of those groups (tombstones of deleted rows included), per syncer shard.",
            Gauge::QueuedBytes => "Bytes of frames queued to client sockets and not yet written, per syncer shard.",
        }
    }

    fn of(self, g: &ShardGauges) -> u64 {
        match self {
            Gauge::Connections => g.connections,
            Gauge::ClientGroups => g.client_groups,
            Gauge::Queries => g.queries,
            Gauge::Rows => g.rows,
            Gauge::QueuedBytes => g.queued_bytes,
        }
    }
}

fn write_header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Cumulative `_bucket` lines ending in `+Inf` (= `_count`), then `_sum` in seconds.
fn write_histogram(out: &mut String, name: &str, help: &str, h: &TimingHistogram) {
    write_header(out, name, help, "histogram");
    let count = h.count();
    let mut previous = 0;
    for bound in BUCKET_BOUNDS_US {
        // hdrhistogram's cumulative counts never fall, but clamp anyway: Prometheus
        // rejects a bucket below the one before it.
        let at_most = h.count_at_most(bound).clamp(previous, count);
        previous = at_most;
        let le = bound as f64 / MICROS_PER_SECOND;
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {at_most}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let sum = h.sum_us() as f64 / MICROS_PER_SECOND;
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {count}");
}

fn write_shard_gauge(out: &mut String, name: &str, help: &str, values: &[(&str, u64)]) {
    write_header(out, name, help, "gauge");
    for (shard, v) in values {
        let _ = writeln!(out, "{name}{{shard=\"{}\"}} {v}", escape_label(shard));
    }
}

/// HELP text escapes: backslash and line feed.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label value escapes: backslash, double quote and line feed.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

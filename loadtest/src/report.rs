//! The final figures: a percentile table for the terminal, or one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

impl Latency {
    pub fn from_hist(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency {
                count: 0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                max_ms: 0.0,
                mean_ms: 0.0,
            };
        }
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: (h.mean() / 10.0).round() / 100.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct RssMib {
    pub start: Option<f64>,
    pub peak: Option<f64>,
    pub end: Option<f64>,
}

/// How many clients received each row committed in the measured period (each reception is one
/// commit->poke sample). With every client watching every written row, min = max = the number
/// of watching clients; a lower min means some client missed a version.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct ReceiversPerRow {
    pub min: u64,
    pub mean: f64,
    pub max: u64,
}

impl From<&crate::writer::Delivery> for ReceiversPerRow {
    fn from(d: &crate::writer::Delivery) -> ReceiversPerRow {
        ReceiversPerRow {
            min: d.receivers_min,
            mean: if d.committed == 0 {
                0.0
            } else {
                (d.receivers_sum as f64 / d.committed as f64 * 100.0).round() / 100.0
            },
            max: d.receivers_max,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub server: String,
    pub clients: usize,
    pub groups: usize,
    pub queries: Vec<String>,
    pub query_mix: crate::cli::QueryMix,
    pub connect_rate: f64,
    pub write_rate: f64,
    pub tx_size: usize,
    pub write_target: String,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub server_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: Config,
    /// Measured seconds (pokes/s etc. divide by this).
    pub measured_s: f64,
    /// Seconds waited after the measured period for the last pokes (see --drain).
    pub drained_s: f64,
    pub clients_connected_end: u64,
    pub clients_hydrated: u64,
    pub connects: u64,
    pub latency: BTreeMap<&'static str, Latency>,
    pub pokes_per_s: f64,
    pub frames_per_s: f64,
    pub bytes_per_s: f64,
    pub rows_received_per_s: f64,
    pub rows_written_per_s: f64,
    pub txs_written: u64,
    /// Rows committed in the measured period, and how many of them no client received.
    pub rows_committed_measured: u64,
    pub rows_unseen: u64,
    /// Of the unseen rows, those whose later update some client received (the server folded
    /// both versions into one poke); rows_unseen - rows_superseded were lost.
    pub rows_superseded: u64,
    pub receivers_per_row: ReceiversPerRow,
    /// CPU the harness itself used over the measured period (100 = one core).
    pub harness_cpu_percent: f64,
    pub server_rss_mib: RssMib,
    pub errors: BTreeMap<String, u64>,
}

fn opt_mib(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |m| format!("{m:.1}"))
}

impl Report {
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "loadtest: {} clients in {} groups against {} for {:.1} s (after {:.1} s warm-up, then {:.1} s drain); queries: {}",
            c.clients,
            c.groups,
            c.server,
            self.measured_s,
            c.warmup_s,
            self.drained_s,
            c.queries.join(" ")
        );
        let _ = writeln!(
            out,
            "writes: {} rows/s in transactions of {} into {}",
            c.write_rate, c.tx_size, c.write_target
        );
        let _ = writeln!(
            out,
            "\n{:<14} {:>8} {:>10} {:>10} {:>10} {:>10}",
            "latency (ms)", "count", "p50", "p90", "p99", "max"
        );
        for (name, l) in &self.latency {
            let _ = writeln!(
                out,
                "{:<14} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                name, l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "clients: {} connected at the end, {} hydrated, {} connects",
            self.clients_connected_end, self.clients_hydrated, self.connects
        );
        let _ = writeln!(
            out,
            "throughput: {:.1} pokes/s, {:.1} frames/s, {:.1} KiB/s received, {:.1} rows/s received, {:.1} rows/s written ({} transactions)",
            self.pokes_per_s,
            self.frames_per_s,
            self.bytes_per_s / 1024.0,
            self.rows_received_per_s,
            self.rows_written_per_s,
            self.txs_written
        );
        let _ = writeln!(
            out,
            "rows committed in the measured period: {}, received by no client: {} ({} superseded by a later update of the row)",
            self.rows_committed_measured, self.rows_unseen, self.rows_superseded
        );
        let r = &self.receivers_per_row;
        let _ = writeln!(
            out,
            "receiving clients per row: min {}, mean {:.2}, max {}",
            r.min, r.mean, r.max
        );
        let _ = writeln!(
            out,
            "harness CPU: {:.0}% of one core",
            self.harness_cpu_percent
        );
        let r = &self.server_rss_mib;
        let _ = writeln!(
            out,
            "server RSS (MiB): start {}, peak {}, end {}",
            opt_mib(r.start),
            opt_mib(r.peak),
            opt_mib(r.end)
        );
        if self.errors.is_empty() {
            let _ = writeln!(out, "errors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "errors: {}", list.join(", "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_in_ms() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap(); // 1..1000 ms
        }
        let l = Latency::from_hist(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max_ms - 1000.0).abs() < 1.0, "{l:?}");
        let empty = Latency::from_hist(&Histogram::<u64>::new(3).unwrap());
        assert_eq!(empty.count, 0);
    }

    #[test]
    fn receivers_per_row_from_delivery() {
        let d = crate::writer::Delivery {
            committed: 3,
            unseen: 0,
            superseded: 0,
            receivers_min: 99,
            receivers_max: 100,
            receivers_sum: 299,
        };
        assert_eq!(
            ReceiversPerRow::from(&d),
            ReceiversPerRow {
                min: 99,
                mean: 99.67,
                max: 100
            }
        );
        let none = crate::writer::Delivery::default();
        assert_eq!(ReceiversPerRow::from(&none), ReceiversPerRow::default());
    }
}

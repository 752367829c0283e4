//! Server metrics for `/metrics` (Prometheus text format): latency histograms backed by
//! hdrhistogram, and per-shard gauges. Names follow zero-cache's OpenTelemetry instruments as
//! its Prometheus exporter spells them (`zero.sync.hydration-time`, unit s, becomes
//! `zero_sync_hydration_time_seconds`) where zcache measures the same figure; zcache's own
//! figures start with `zcache_`.
//!
//! Thread-per-core: the hot paths call `observe*`, which touch only a thread-local
//! histogram. Each executor publishes a copy to the shared registry once a second
//! (`publish_forever`), and whichever shard answers `/metrics` merges the copies.

pub mod export;
pub mod http;
pub mod registry;

#[cfg(test)]
mod tests;

pub use registry::{Registry, ShardGauges};
use std::time::{Duration, Instant, SystemTime};

/// How often an executor copies its figures into the registry.
pub const PUBLISH_INTERVAL_MS: u64 = 1_000;

/// The durations zcache records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timing {
    Hydration = 0,
    Advance,
    PokeLatency,
    ReplicationLag,
    CvrFlush,
}

impl Timing {
    pub const COUNT: usize = 5;
    pub const ALL: [Timing; Timing::COUNT] = [
        Timing::Hydration,
        Timing::Advance,
        Timing::PokeLatency,
        Timing::ReplicationLag,
        Timing::CvrFlush,
    ];

    /// The Prometheus metric name.
    pub fn name(self) -> &'static str {
        match self {
            Timing::Hydration => "zero_sync_hydration_time_seconds",
            Timing::Advance => "zero_sync_advance_time_seconds",
            Timing::PokeLatency => "zero_sync_view_syncer_lag_seconds",
            Timing::ReplicationLag => "zcache_replication_lag_seconds",
            Timing::CvrFlush => "zero_sync_cvr_flush_time_seconds",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Timing::Hydration => {
                "Time to hydrate a query: the query engine's side (replica reads, operators, \
                 the CVR's rows), once per query evaluated from scratch."
            }
            Timing::Advance => {
                "Time to advance all queries of one client group to a new replica snapshot \
                 (one or more committed transactions), pokes built and queued included, \
                 waiting for the group's lock excluded."
            }
            Timing::PokeLatency => {
                "Poke latency: from the SQLite replica's commit of a transaction to the poke \
                 carrying its changes being queued on the sockets of a client group whose \
                 queries it changed (the socket writes follow as fast as the kernel takes \
                 them). One observation per group and advance that poked, measured from the \
                 oldest transaction the poke carries; groups with no socket when the \
                 transaction arrived are not counted."
            }
            Timing::ReplicationLag => {
                "Replication lag: from a transaction's upstream commit (the pgoutput Commit \
                 timestamp, on upstream's clock) to its commit in the SQLite replica (on this \
                 host's clock). Clock skew between the two shifts it; a negative lag counts \
                 as 0."
            }
            Timing::CvrFlush => {
                "Time to write one batch of client view records to the CVR database in one \
                 transaction (zcache writes them in the background, after the pokes); failed \
                 writes included."
            }
        }
    }
}

/// Records `d` for this executor (lock-free: a thread-local histogram).
pub fn observe(t: Timing, d: Duration) {
    registry::record_local(t, d);
}

/// Records the time since `start`.
pub fn observe_since(t: Timing, start: Instant) {
    observe(t, start.elapsed());
}

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

/// The replication lag of a transaction just committed to the replica, given its upstream
/// commit time (microseconds since 2000-01-01 UTC, as pgoutput sends it).
pub fn observe_upstream_commit(commit_time_pg_us: i64) {
    observe(
        Timing::ReplicationLag,
        lag_since_pg_time(commit_time_pg_us, SystemTime::now()),
    );
}

/// `now` less a PostgreSQL timestamp, 0 when the timestamp is later (clock skew).
fn lag_since_pg_time(commit_time_pg_us: i64, now: SystemTime) -> Duration {
    let Ok(commit_pg_us) = u64::try_from(commit_time_pg_us) else {
        return Duration::ZERO; // before 2000: not a real commit time
    };
    let commit = SystemTime::UNIX_EPOCH
        + Duration::from_secs(PG_EPOCH_UNIX_SECONDS)
        + Duration::from_micros(commit_pg_us);
    now.duration_since(commit).unwrap_or(Duration::ZERO)
}

/// Publishes this executor's figures under `label` every `PUBLISH_INTERVAL_MS`, with the
/// gauges `gauges` samples (None for an executor without any), for as long as it runs.
pub async fn publish_forever<F>(label: String, gauges: F)
where
    F: Fn() -> Option<ShardGauges>,
{
    registry::attach(Registry::global(), &label);
    loop {
        registry::publish_local(gauges());
        glommio::timer::sleep(Duration::from_millis(PUBLISH_INTERVAL_MS)).await;
    }
}

/// The `/metrics` body: this executor's newest recordings first (its gauges stay as last
/// sampled), then every executor's latest publication, merged.
pub fn scrape() -> String {
    registry::publish_local(None);
    export::render(&Registry::global().collect())
}

/// Samples a syncer shard's gauges by walking its groups: O(groups + sockets), once a
/// second, on the shard's own executor. A group busy elsewhere is skipped for that sample.
pub fn shard_gauges(shard: &crate::shards::Shard) -> ShardGauges {
    let mut g = ShardGauges::default();
    shard.for_each_group(|group| {
        g.client_groups += 1;
        if let Ok(conns) = group.conns.try_borrow() {
            g.connections += conns.len() as u64;
            g.queued_bytes += conns.values().map(|c| c.queued_bytes() as u64).sum::<u64>();
        }
        if let Ok(cvr) = group.cvr.try_borrow() {
            g.queries += cvr.queries.len() as u64;
            g.rows += cvr.rows.len() as u64;
        }
    });
    g
}

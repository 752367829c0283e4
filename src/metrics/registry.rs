//! Where the figures live. Each executor records into histograms of its own (a thread-local:
//! no lock, no atomic on the hot path) and, once a second, copies them with its gauges into
//! a slot of its own in the shared `Registry`; `/metrics` merges the slots. A scrape thus
//! sees each executor as of its last publication (at most `PUBLISH_INTERVAL_MS` old).

use super::Timing;
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Smallest duration a histogram tells apart, in microseconds.
const TIMING_US_MIN: u64 = 1;
/// Largest duration a histogram tracks; longer ones count as this (an hour).
pub const TIMING_US_MAX: u64 = 3_600_000_000;
/// hdrhistogram precision: 2 significant digits (1%) keeps one histogram near 30 KB, cheap
/// to copy every second; the exported buckets are far coarser than that.
const TIMING_SIGNIFICANT_DIGITS: u8 = 2;

/// One duration histogram (microseconds), with the exact sum Prometheus wants for `_sum`.
#[derive(Clone, Debug)]
pub struct TimingHistogram {
    hist: Histogram<u64>,
    sum_us: u64,
}

impl Default for TimingHistogram {
    fn default() -> Self {
        // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low,
        // sigfig <= 5), so this cannot fail.
        let hist =
            Histogram::new_with_bounds(TIMING_US_MIN, TIMING_US_MAX, TIMING_SIGNIFICANT_DIGITS)
                .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"));
        TimingHistogram { hist, sum_us: 0 }
    }
}

impl TimingHistogram {
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(u64::MAX)
            .min(TIMING_US_MAX);
        self.hist.saturating_record(us);
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// How many recorded durations are at most `bound_us` (to hdrhistogram's 1%: a value
    /// in the same sub-bucket as the bound counts as below it).
    pub fn count_at_most(&self, bound_us: u64) -> u64 {
        if self.hist.is_empty() {
            return 0;
        }
        self.hist.count_between(0, bound_us.min(TIMING_US_MAX))
    }

    /// Adds `other`'s recordings to these.
    pub fn merge(&mut self, other: &TimingHistogram) {
        // Same bounds on both sides, so adding cannot fail for lack of range.
        let added = self.hist.add(&other.hist);
        debug_assert!(added.is_ok(), "histograms of one shape always add");
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// Becomes a copy of `other` without allocating (both have the same shape).
    fn copy_from(&mut self, other: &TimingHistogram) {
        self.hist.reset();
        self.sum_us = 0;
        self.merge(other);
    }
}

/// One histogram per `Timing`.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    hists: [TimingHistogram; Timing::COUNT],
}

impl Timings {
    pub fn record(&mut self, t: Timing, d: Duration) {
        self.hists[t as usize].record(d);
    }

    pub fn get(&self, t: Timing) -> &TimingHistogram {
        &self.hists[t as usize]
    }

    pub fn merge(&mut self, other: &Timings) {
        for (mine, theirs) in self.hists.iter_mut().zip(&other.hists) {
            mine.merge(theirs);
        }
    }

    fn copy_from(&mut self, other: &Timings) {
        for (mine, theirs) in self.hists.iter_mut().zip(&other.hists) {
            mine.copy_from(theirs);
        }
    }
}

/// What one syncer shard holds right now (sampled when it publishes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardGauges {
    /// Sockets joined to a client group.
    pub connections: u64,
    /// Client groups in memory.
    pub client_groups: u64,
    /// Queries in those groups' CVRs (desired or got).
    pub queries: u64,
    /// Rows in those CVRs (tombstones of deleted rows included until they are dropped).
    pub rows: u64,
    /// Bytes queued to the sockets and not yet written.
    pub queued_bytes: u64,
}

/// One executor's latest publication.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub timings: Timings,
    /// Syncer shards only.
    pub gauges: Option<ShardGauges>,
}

/// One executor's place in the registry: only it writes, `/metrics` reads.
pub struct Slot {
    /// The `shard` label: "0", "1", ... for syncers, "repl" for replication.
    pub label: String,
    snapshot: Mutex<Snapshot>,
}

impl Slot {
    /// Replaces the published figures (the lock is held for a copy, once a second).
    pub fn publish(&self, timings: &Timings, gauges: Option<ShardGauges>) {
        let mut s = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        s.timings.copy_from(timings);
        if gauges.is_some() {
            s.gauges = gauges;
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Every executor's slot, merged on demand.
pub struct Registry {
    slots: Mutex<Vec<Arc<Slot>>>,
    started: Instant,
}

/// The registry's figures at one moment: histograms summed over the executors, gauges per
/// shard (ordered by label).
#[derive(Debug, Default)]
pub struct Collected {
    pub timings: Timings,
    pub gauges: Vec<(String, ShardGauges)>,
    pub uptime: Duration,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            slots: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }
}

impl Registry {
    /// The process's registry (every executor of a zcache publishes here).
    pub fn global() -> &'static Registry {
        static GLOBAL: OnceLock<Registry> = OnceLock::new();
        GLOBAL.get_or_init(Registry::default)
    }

    /// A new slot for the executor labelled `label`.
    pub fn register(&self, label: &str) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            label: label.to_string(),
            snapshot: Mutex::new(Snapshot::default()),
        });
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot.clone());
        slot
    }

    /// Merges every slot's latest publication.
    pub fn collect(&self) -> Collected {
        let slots: Vec<Arc<Slot>> = self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = Collected {
            uptime: self.started.elapsed(),
            ..Collected::default()
        };
        for slot in slots {
            let s = slot.snapshot();
            out.timings.merge(&s.timings);
            if let Some(g) = s.gauges {
                out.gauges.push((slot.label.clone(), g));
            }
        }
        out.gauges.sort_by(|a, b| label_order(&a.0, &b.0));
        out
    }
}

/// Numeric labels in numeric order ("2" before "10"), others after them.
fn label_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

thread_local! {
    /// This executor's recordings since it started.
    static LOCAL: RefCell<Timings> = RefCell::new(Timings::default());
    /// This executor's slot, once it called `attach`.
    static SLOT: RefCell<Option<Arc<Slot>>> = const { RefCell::new(None) };
}

/// Records on this thread; never blocks.
pub fn record_local(t: Timing, d: Duration) {
    LOCAL.with(|l| l.borrow_mut().record(t, d));
}

/// Gives this executor a slot in `registry` under `label`; later calls keep the first.
pub fn attach(registry: &Registry, label: &str) {
    SLOT.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            *s = Some(registry.register(label));
        }
    });
}

/// Copies this executor's recordings (and its gauges, if given) into its slot. Nothing
/// happens on a thread that never attached.
pub fn publish_local(gauges: Option<ShardGauges>) {
    let Some(slot) = SLOT.with(|s| s.borrow().clone()) else {
        return;
    };
    LOCAL.with(|l| slot.publish(&l.borrow(), gauges));
}

//! Counters and latency histograms shared by all clients and the writer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Histograms hold microseconds, 3 significant figures, auto-resizing.
const HIST_SIGFIG: u8 = 3;

pub struct LatencyHist {
    inner: Mutex<Histogram<u64>>,
}

impl LatencyHist {
    fn new() -> LatencyHist {
        // A constant, valid precision: no input reaches this.
        let h = Histogram::new(HIST_SIGFIG).expect("3 significant figures is a valid histogram");
        LatencyHist {
            inner: Mutex::new(h),
        }
    }

    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        // An auto-resizing histogram only refuses values beyond its highest trackable bound.
        let _ = self.lock().record(us);
    }

    pub fn lock(&self) -> MutexGuard<'_, Histogram<u64>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Histogram<u64> {
        self.lock().clone()
    }
}

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct Stats {
    pub started: Instant,
    measure_start: OnceLock<Instant>,
    measure_end: OnceLock<Instant>,
    /// Sockets open right now (after `connected`).
    pub open: Counter,
    /// Clients that have reached their first complete poke.
    pub hydrated: Counter,
    pub connects: Counter,
    pub pokes: Counter,
    pub frames_in: Counter,
    pub bytes_in: Counter,
    pub rows_put: Counter,
    pub token_matches: Counter,
    pub rows_written: Counter,
    pub txs_written: Counter,
    pub connect: LatencyHist,
    pub hydration: LatencyHist,
    pub commit_to_poke: LatencyHist,
    /// The writer's COMMIT round trip.
    pub commit: LatencyHist,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            started: Instant::now(),
            measure_start: OnceLock::new(),
            measure_end: OnceLock::new(),
            open: Counter::default(),
            hydrated: Counter::default(),
            connects: Counter::default(),
            pokes: Counter::default(),
            frames_in: Counter::default(),
            bytes_in: Counter::default(),
            rows_put: Counter::default(),
            token_matches: Counter::default(),
            rows_written: Counter::default(),
            txs_written: Counter::default(),
            connect: LatencyHist::new(),
            hydration: LatencyHist::new(),
            commit_to_poke: LatencyHist::new(),
            commit: LatencyHist::new(),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts one error of `kind`; true the first time the kind is seen.
    pub fn error(&self, kind: &str) -> bool {
        self.add_error(kind, 1)
    }

    pub fn add_error(&self, kind: &str, n: u64) -> bool {
        let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let slot = e.entry(kind.to_string()).or_insert(0);
        let first = *slot == 0;
        *slot += n;
        first
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn error_total(&self) -> u64 {
        self.errors().values().sum()
    }

    pub fn begin_measure(&self, at: Instant) {
        let _ = self.measure_start.set(at);
    }

    pub fn end_measure(&self, at: Instant) {
        let _ = self.measure_end.set(at);
    }

    /// True when `t` (a commit time) lies inside the measured period.
    pub fn in_measured_period(&self, t: Instant) -> bool {
        match self.measure_start.get() {
            None => false,
            Some(&start) => t >= start && self.measure_end.get().is_none_or(|&end| t < end),
        }
    }

    #[cfg(test)]
    pub fn measuring(&self) -> bool {
        self.measure_start.get().is_some() && self.measure_end.get().is_none()
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_period_bounds() {
        let s = Stats::new();
        let t0 = Instant::now();
        assert!(!s.in_measured_period(t0));
        s.begin_measure(t0);
        assert!(s.measuring());
        assert!(s.in_measured_period(t0 + Duration::from_millis(5)));
        s.end_measure(t0 + Duration::from_millis(10));
        assert!(!s.measuring());
        assert!(s.in_measured_period(t0 + Duration::from_millis(9)));
        assert!(!s.in_measured_period(t0 + Duration::from_millis(10)));
        assert!(!s.in_measured_period(t0 - Duration::from_millis(1)));
    }

    #[test]
    fn histogram_records_microseconds_and_errors_count_by_kind() {
        let s = Stats::new();
        s.connect.record(Duration::from_millis(3));
        s.connect.record(Duration::ZERO);
        let h = s.connect.snapshot();
        assert_eq!(h.len(), 2);
        assert!(h.max() >= 2_990 && h.max() <= 3_010);
        assert_eq!(h.min(), 1);
        assert!(s.error("close:1006"));
        assert!(!s.error("close:1006"));
        s.error("error:Unauthorized");
        assert_eq!(s.errors()["close:1006"], 2);
        assert_eq!(s.error_total(), 3);
    }
}

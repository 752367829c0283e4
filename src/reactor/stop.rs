//! Graceful shutdown (SIGTERM / SIGINT). The signal handler only raises a flag; every
//! executor notices it within `STOP_POLL_MS` and winds down on its own thread:
//! - each syncer stops accepting, closes its sockets with WebSocket close 1001 ("going
//!   away", no Zero error frame, as zero-cache's drain does: the client reconnects with
//!   backoff, to this server once restarted or to another one), and writes its CVRs;
//! - the replicator, between transactions, records and confirms the last LSN it applied.
//!
//! `reactor::run` returns once every executor is done; the process then exits 0.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often executors look at the flag.
pub const STOP_POLL_MS: u64 = 50;

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks every executor to wind down (safe from a signal handler's thread).
pub fn request() {
    STOP.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Completes once a stop is requested.
pub async fn requested_async() {
    while !requested() {
        glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)).await;
    }
}

//! The per-user mutation rate limit (`ZERO_PER_USER_MUTATION_LIMIT_MAX` / `_WINDOW_MS`).
//!
//! The algorithm is zero-cache's `SlidingWindowLimiter` (legacy-features.md §4) step for step.
//! Its scope is zcache's: zero-cache keeps one limiter per (sync worker, client group), reset
//! whenever the group's last connection closes, which is not a per-user limit at all; zcache
//! keeps one window per user, shared by every shard (hence the mutex), so reconnecting or
//! spreading mutations over groups and cores does not multiply a user's allowance.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Users whose windows are kept at once. Each entry is a few dozen bytes plus the user ID, so
/// the table stays within a few MB.
pub const USERS_TRACKED_MAX: usize = 100_000;

/// One fixed-window bucket: the calls counted in `[start, start + W)`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    start: i128,
    count: u64,
}

/// zero-cache's sliding window: `prior` and `next` are consecutive buckets, weighted as in
/// sliding-window-limiter.ts. Times are i128 so that `now - W` never wraps.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    prior: Bucket,
    next: Bucket,
}

impl Window {
    fn new(now: i128, w: i128) -> Self {
        let start = now - now.rem_euclid(w);
        Window {
            prior: Bucket { start, count: 0 },
            next: Bucket {
                start: start + w,
                count: 0,
            },
        }
    }

    /// `maybeResetWindows`: start over after a long pause, or slide one bucket.
    fn roll(&mut self, now: i128, w: i128) {
        if now - w > self.next.start + w {
            *self = Window::new(now, w);
        }
        if now - w >= self.next.start {
            self.prior = self.next;
            self.next = Bucket {
                start: self.prior.start + w,
                count: 0,
            };
        }
    }

    /// The calls the window holds at `now` (after `roll`): the prior bucket weighted by the
    /// part of it the sliding window still covers, plus the next bucket.
    fn total(&self, now: i128, w: i128) -> f64 {
        let frac = if now < self.prior.start + w {
            1.0
        } else {
            let left = self.prior.start + (w - 1) - (now - w);
            (left as f64 / w as f64).max(0.0)
        };
        self.prior.count as f64 * frac + self.next.count as f64
    }

    /// `canDo`: counts the call if it is allowed.
    fn try_acquire(&mut self, now: i128, w: i128, max: u64) -> bool {
        self.roll(now, w);
        let allowed = self.total(now, w) < max as f64;
        if allowed {
            let bucket = if now < self.next.start {
                &mut self.prior
            } else {
                &mut self.next
            };
            bucket.count = bucket.count.saturating_add(1);
        }
        allowed
    }

    /// From when on the window counts nothing (and so decides as a new one would): the end
    /// of the weight of its last non-empty bucket, once that bucket has become `prior`.
    fn idle_from(&self, w: i128) -> i128 {
        let last = if self.next.count > 0 {
            self.next.start
        } else if self.prior.count > 0 {
            self.prior.start
        } else {
            return i128::MIN;
        };
        // frac = (last + W - 1 - (now - W)) / W is 0 from now = last + 2W - 1 on.
        last + 2 * w - 1
    }
}

struct Table {
    windows: HashMap<String, Window>,
    /// No window can be dropped before this time (the least `idle_from` at the last sweep).
    sweep_not_before: i128,
}

/// zcache's rate limit: one sliding window per user, across all shards.
///
/// The table holds at most `USERS_TRACKED_MAX` users. When a user not in it arrives and it is
/// full, the windows that count nothing any more are dropped (dropping them changes no
/// decision). If every window still counts recent mutations, the new user is **refused**
/// (rate limited) until one does not: failing closed keeps the limit's promise under a flood
/// of user IDs, and it is transient (the client retries and, as after any limiting, resumes
/// by reconnecting). Evicting a live window instead would let anyone reset another user's
/// limit by sending mutations as many made-up users, and admitting untracked users would
/// disable the limit for exactly those users.
pub struct UserLimits {
    max: u64,
    window_ms: i128,
    table: Mutex<Table>,
    users_max: usize,
}

impl UserLimits {
    /// `window_ms` 0 is taken as 1 (the config refuses 0).
    pub fn new(max: u64, window_ms: u64) -> Self {
        Self::with_capacity(max, window_ms, USERS_TRACKED_MAX)
    }

    fn with_capacity(max: u64, window_ms: u64, users_max: usize) -> Self {
        UserLimits {
            max,
            window_ms: i128::from(window_ms.max(1)),
            table: Mutex::new(Table {
                windows: HashMap::new(),
                sweep_not_before: i128::MIN,
            }),
            users_max,
        }
    }

    /// Counts one mutation of `user` at `now_ms` if allowed; rejected calls are not counted.
    pub fn try_acquire(&self, user: &str, now_ms: u64) -> bool {
        let now = i128::from(now_ms);
        let w = self.window_ms;
        // A panic while holding the lock cannot leave a window half-updated in a way that
        // matters (each is a few integers), so a poisoned lock is used as is.
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(window) = table.windows.get_mut(user) {
            return window.try_acquire(now, w, self.max);
        }
        if table.windows.len() >= self.users_max && !sweep(&mut table, now, w, self.users_max) {
            tracing::warn!(
                users = table.windows.len(),
                "mutation rate limit: {} users are being tracked, the most allowed; \
                 a mutation of a new user is refused until a window expires",
                self.users_max
            );
            return false;
        }
        let mut window = Window::new(now, w);
        let allowed = window.try_acquire(now, w, self.max);
        table.windows.insert(user.to_string(), window);
        allowed
    }

    /// Users with a window (tests, metrics).
    pub fn users_tracked(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .windows
            .len()
    }
}

/// Drops the windows that count nothing at `now`; whether the table has room afterwards.
fn sweep(table: &mut Table, now: i128, w: i128, users_max: usize) -> bool {
    if now < table.sweep_not_before {
        return false;
    }
    table.windows.retain(|_, win| win.idle_from(w) > now);
    table.sweep_not_before = table
        .windows
        .values()
        .map(|win| win.idle_from(w))
        .min()
        .unwrap_or(i128::MIN);
    table.windows.len() < users_max
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 1_000;

    #[test]
    fn third_within_the_window_is_refused() {
        let l = UserLimits::new(2, W);
        assert!(l.try_acquire("u", 10_000));
        assert!(l.try_acquire("u", 10_100));
        assert!(!l.try_acquire("u", 10_200));
        assert!(!l.try_acquire("u", 10_999));
    }

    #[test]
    fn rejected_calls_are_not_counted() {
        let l = UserLimits::new(2, W);
        assert!(l.try_acquire("u", 10_000));
        assert!(l.try_acquire("u", 10_000));
        for _ in 0..100 {
            assert!(!l.try_acquire("u", 10_500));
        }
        // Next bucket [11000, 12000): prior (2 calls) weighs (10000+999-(11900-1000))/1000
        // = 0.099 at 11900, so 0.198 < 2 and one call is allowed, then 1.198 < 2 a second.
        // Had the 100 refusals counted, the prior bucket would weigh 10.2 and all be refused.
        assert!(l.try_acquire("u", 11_900));
        assert!(l.try_acquire("u", 11_900));
        assert!(!l.try_acquire("u", 11_900));
    }

    #[test]
    fn prior_bucket_weighs_its_remaining_fraction() {
        let l = UserLimits::new(3, W);
        // Three calls in the bucket [10000, 11000).
        for t in [10_000, 10_500, 10_900] {
            assert!(l.try_acquire("u", t));
        }
        // At 11000 the prior bucket weighs (10000+999-10000)/1000 = 0.999: 2.997 >= 3? no,
        // 2.997 < 3, so one call is allowed; then 2.997 + 1 is refused.
        assert!(l.try_acquire("u", 11_000));
        assert!(!l.try_acquire("u", 11_000));
        // At 11500 the weight is 0.499: 1.497 + 1 = 2.497 < 3: allowed; then 3.497: refused.
        assert!(l.try_acquire("u", 11_500));
        assert!(!l.try_acquire("u", 11_500));
        // At 12000 the buckets slide: prior = [11000, 12000) with 2 calls, weight 0.999:
        // 1.998 and then 2.998 are under 3, 3.998 is not.
        assert!(l.try_acquire("u", 12_000));
        assert!(l.try_acquire("u", 12_000));
        assert!(!l.try_acquire("u", 12_000));
    }

    #[test]
    fn slide_and_reset_follow_zero_cache() {
        let w = 1_000i128;
        let mut win = Window::new(10_250, w);
        assert_eq!(
            (win.prior.start, win.next.start),
            (10_000, 11_000),
            "aligned on the window"
        );
        assert!(win.try_acquire(10_250, w, 2));
        assert_eq!(
            win.prior.count, 1,
            "before next.start the prior bucket counts"
        );
        assert!(win.try_acquire(11_250, w, 2));
        assert_eq!(win.next.count, 1, "from next.start the next bucket counts");
        // At 12000 (now - W >= next.start) the buckets slide by one.
        win.roll(12_000, w);
        assert_eq!(
            (win.prior, win.next.start),
            (
                Bucket {
                    start: 11_000,
                    count: 1
                },
                12_000
            )
        );
        // Exactly 2W after next.start: still a slide, not a reset (the test is `>`).
        let mut win2 = win;
        win2.roll(14_000, w);
        assert_eq!((win2.prior.start, win2.prior.count), (12_000, 0));
        // Past that: a fresh window aligned on now.
        let mut win3 = win;
        win3.roll(14_001, w);
        assert_eq!(win3, Window::new(14_001, w));
        // The weight reaches 0 at prior.start + 2W - 1.
        let mut win4 = Window::new(10_000, w);
        win4.prior.count = 5;
        assert_eq!(win4.total(11_998, w), 5.0 * 0.001);
        assert_eq!(win4.total(11_999, w), 0.0);
        assert_eq!(win4.idle_from(w), 11_999);
    }

    #[test]
    fn users_are_independent() {
        let l = UserLimits::new(1, W);
        assert!(l.try_acquire("a", 5_000));
        assert!(!l.try_acquire("a", 5_001));
        assert!(l.try_acquire("b", 5_001));
        assert!(!l.try_acquire("b", 5_002));
        assert_eq!(l.users_tracked(), 2);
    }

    #[test]
    fn window_recovers_after_a_pause() {
        let l = UserLimits::new(1, W);
        assert!(l.try_acquire("u", 0));
        assert!(!l.try_acquire("u", 999));
        // Long after: reset.
        assert!(l.try_acquire("u", 100_000));
        assert!(!l.try_acquire("u", 100_001));
    }

    #[test]
    fn the_table_is_bounded_and_fails_closed() {
        let l = UserLimits::with_capacity(5, W, 3);
        for u in ["a", "b", "c"] {
            assert!(l.try_acquire(u, 10_000));
        }
        // Full, and every window counts a mutation: a new user is refused, and not tracked.
        assert!(!l.try_acquire("d", 10_500));
        assert_eq!(l.users_tracked(), 3);
        // Known users go on as before.
        assert!(l.try_acquire("a", 10_600));
        // "b" and "c" count nothing from 10000 + 2W - 1 = 11999 on; "a" also counted at
        // 10600 in the same bucket, so it is idle from 11999 too.
        assert!(!l.try_acquire("d", 11_998));
        assert!(l.try_acquire("d", 11_999));
        assert_eq!(l.users_tracked(), 1);
        assert!(l.try_acquire("e", 11_999));
        assert!(l.try_acquire("f", 11_999));
        assert_eq!(l.users_tracked(), 3);
        // Full again with live windows.
        assert!(!l.try_acquire("g", 12_000));
    }

    #[test]
    fn sweep_keeps_live_windows() {
        let l = UserLimits::with_capacity(5, W, 2);
        assert!(l.try_acquire("old", 0));
        assert!(l.try_acquire("new", 2_500));
        // At 3000, "old" (bucket [0,1000)) is idle since 1999; "new" is live.
        assert!(l.try_acquire("x", 3_000));
        assert_eq!(l.users_tracked(), 2);
        assert!(!l.try_acquire("y", 3_000));
    }

    #[test]
    fn zero_max_refuses_everything() {
        let l = UserLimits::new(0, W);
        assert!(!l.try_acquire("u", 1));
    }
}

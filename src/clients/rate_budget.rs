//! The process-wide Hetzner request budget: a token bucket kept in step with the API's
//! `RateLimit-*` headers.
//!
//! Hetzner limits requests per *project* (3600/h by default), refilling `limit/3600` per second,
//! and the budget is shared with every other tool using the project. The bucket therefore trusts
//! the server's `RateLimit-Remaining` over its own count, paces requests at the refill rate once
//! it is empty (a burst is spread out instead of producing 429s), and after a 429 lets no request
//! out before `RateLimit-Reset`, which is an absolute UNIX time. It must not sleep while holding
//! its lock, and it knows nothing about which request is being made.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Hetzner's default limit, assumed until the first response tells us the real one.
const DEFAULT_LIMIT_PER_HOUR: f64 = 3600.0;
/// How long to stay blocked after a 429 that carried no usable `RateLimit-Reset`.
const BLOCK_WITHOUT_RESET: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct RateBudget {
    state: Mutex<State>,
    /// Woken whenever headers arrive, so waiters re-check at once instead of sleeping a full
    /// refill period on a stale estimate.
    changed: Notify,
}

#[derive(Debug)]
struct State {
    limit_per_hour: f64,
    /// The most requests the API has let us hold at once: the highest `remaining + 1` seen.
    /// Hetzner's bucket is as large as the hourly limit, but a smaller one (or a share of the
    /// project used by others) must not let an idle period save up a burst the API refuses.
    capacity: f64,
    tokens: f64,
    refilled_at: Instant,
    /// Set after a 429: nothing may be sent before this time.
    blocked_until: Option<SystemTime>,
    /// Until the first response we do not know the project's budget; allow one request at a
    /// time to find out.
    known: bool,
}

impl State {
    fn rate_per_sec(&self) -> f64 {
        (self.limit_per_hour / 3600.0).max(f64::MIN_POSITIVE)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_sec()).min(self.capacity);
        self.refilled_at = now;
    }
}

impl Default for RateBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl RateBudget {
    pub fn new() -> Self {
        RateBudget {
            state: Mutex::new(State {
                limit_per_hour: DEFAULT_LIMIT_PER_HOUR,
                capacity: 1.0,
                tokens: 1.0,
                refilled_at: Instant::now(),
                blocked_until: None,
                known: false,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the numbers inconsistent in a way that
        // matters (they are re-synced by the next response), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests the budget still allows, as last reported by the API and refilled since.
    pub fn remaining(&self) -> u64 {
        let mut s = self.lock();
        s.refill(Instant::now());
        s.tokens.max(0.0).floor() as u64
    }

    /// The project's hourly limit as last reported by the API.
    pub fn limit(&self) -> u64 {
        self.lock().limit_per_hour as u64
    }

    /// The time before which nothing may be sent, if a 429 set one that has not passed yet.
    pub fn blocked_until(&self) -> Option<SystemTime> {
        let s = self.lock();
        s.blocked_until.filter(|t| *t > SystemTime::now())
    }

    /// Waits until one request may be sent, and takes its token.
    pub async fn acquire(&self) {
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut s = self.lock();
                let now = Instant::now();
                s.refill(now);
                let blocked = s
                    .blocked_until
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .filter(|d| !d.is_zero());
                match blocked {
                    Some(d) => d,
                    None if s.tokens >= 1.0 => {
                        s.blocked_until = None;
                        s.tokens -= 1.0;
                        return;
                    }
                    None => Duration::from_secs_f64((1.0 - s.tokens) / s.rate_per_sec()),
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = notified => {}
            }
        }
    }

    /// Brings the bucket in step with a response's `RateLimit-*` headers.
    ///
    /// `remaining` only ever lowers our count (other tools share the project, and responses to
    /// concurrent requests arrive out of order), except for the first response, which replaces
    /// the initial guess.
    pub fn observe(&self, limit: Option<u64>, remaining: Option<u64>) {
        let mut s = self.lock();
        s.refill(Instant::now());
        if let Some(limit) = limit.filter(|l| *l > 0) {
            s.limit_per_hour = limit as f64;
        }
        if let Some(remaining) = remaining {
            let remaining = remaining as f64;
            s.capacity = s
                .capacity
                .max(remaining + 1.0)
                .min(s.limit_per_hour.max(1.0));
            s.tokens = if s.known {
                s.tokens.min(remaining)
            } else {
                remaining
            };
            s.known = true;
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Records a 429: no request goes out before `reset` (a UNIX time in seconds).
    pub fn rate_limited(&self, reset: Option<u64>) {
        let mut s = self.lock();
        s.tokens = 0.0;
        s.known = true;
        let until = reset
            .map(|r| UNIX_EPOCH + Duration::from_secs(r))
            .filter(|t| *t > SystemTime::now())
            .unwrap_or_else(|| SystemTime::now() + BLOCK_WITHOUT_RESET);
        s.blocked_until = Some(s.blocked_until.map_or(until, |b| b.max(until)));
        drop(s);
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_only_ever_lower_the_count_after_the_first() {
        let b = RateBudget::new();
        b.observe(Some(3600), Some(10));
        assert_eq!((b.limit(), b.remaining()), (3600, 10));
        // A late response from before others spent budget must not raise our estimate.
        b.observe(Some(3600), Some(20));
        assert_eq!(b.remaining(), 10);
        b.observe(Some(3600), Some(4));
        assert_eq!(b.remaining(), 4);
    }

    #[test]
    fn a_429_blocks_until_its_reset_and_empties_the_bucket() {
        let b = RateBudget::new();
        b.observe(Some(3600), Some(100));
        let reset = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() + 5)
            .unwrap_or_default();
        b.rate_limited(Some(reset));
        assert_eq!(b.remaining(), 0);
        let until = b.blocked_until().expect("blocked");
        assert_eq!(until, UNIX_EPOCH + Duration::from_secs(reset));
        // A reset in the past (clock skew) still blocks briefly rather than not at all.
        let skewed = RateBudget::new();
        skewed.rate_limited(Some(1));
        assert!(skewed.blocked_until().is_some());
    }

    #[tokio::test]
    async fn acquire_waits_for_refill_when_empty() {
        let b = RateBudget::new();
        // 36000/h = 10 per second; nothing left.
        b.observe(Some(36_000), Some(0));
        let started = Instant::now();
        b.acquire().await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(80), "waited {waited:?}");
    }
}

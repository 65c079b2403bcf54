//! The process-wide Hetzner request budget: a token bucket kept in step with the API's
//! `RateLimit-*` headers.
//!
//! Hetzner limits requests per *project* (3600/h by default) and refills the bucket
//! continuously, `limit/3600` per second; the budget is shared with every other tool using the
//! project. The bucket therefore trusts the server's `RateLimit-Remaining` over its own count
//! and paces requests at the refill rate once it is empty, so a burst is spread out instead of
//! producing 429s. After a 429 it waits only until one request has refilled (a second at
//! 3600/h), not until `RateLimit-Reset`: Hetzner defines that as the time the bucket is
//! *completely* full again, up to an hour away. Waiters are served first come, first served,
//! so the refill is spread evenly over the work in flight instead of going to whoever polls
//! luckiest. Time is tokio's clock, so paused-time tests can measure the stall exactly.
//! It must not sleep while holding its state lock, and it knows nothing about which request is
//! being made.
//!
//! Several daemons on one Hetzner project share one budget: the project's limit is the ceiling,
//! not each process's. With a [`SharedBudgetStore`] (kept in PostgreSQL by
//! `db::rate_budget`), every request reserves its slot in the shared bucket and waits the time
//! the store answers; the local numbers then only mirror the store for metrics. Without one (a
//! single process, the simulator's tests) the bucket is this process's alone. If the store
//! cannot be reached, the local bucket takes over for that request (logged), because a request
//! the database cannot pace is still better paced locally than not at all.

use futures::future::BoxFuture;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Hetzner's default limit, assumed until the first response tells us the real one.
const DEFAULT_LIMIT_PER_HOUR: f64 = 3600.0;

/// The bucket as a shared store reports it after a reservation or an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedBucket {
    /// How long the request that reserved this slot must wait before it is sent.
    pub wait: Duration,
    /// Tokens left after this change; negative when reservations run ahead of the refill.
    pub tokens: f64,
    pub limit_per_hour: f64,
    pub capacity: f64,
}

/// A request budget shared by every process that uses the same Hetzner project.
///
/// Implementations keep one bucket per project with the same rules as [`RateBudget`]: refill at
/// `limit/3600` per second, trust `RateLimit-Remaining` when it is lower, empty after a 429.
/// Errors are plain text: the caller only logs them and falls back to its local bucket.
pub trait SharedBudgetStore: Send + Sync + std::fmt::Debug {
    /// Takes the next request slot (first come, first served across processes).
    fn reserve(&self) -> BoxFuture<'_, Result<SharedBucket, String>>;
    /// Brings the shared bucket in step with a response's `RateLimit-*` headers.
    fn observe(
        &self,
        limit: Option<u64>,
        remaining: Option<u64>,
    ) -> BoxFuture<'_, Result<SharedBucket, String>>;
    /// Records a 429: the bucket is empty for everyone.
    fn rate_limited(&self) -> BoxFuture<'_, Result<SharedBucket, String>>;
}

#[derive(Debug)]
pub struct RateBudget {
    state: Mutex<State>,
    /// The bucket shared with other processes of the same project, once attached (the startup
    /// checks run before the database is migrated, paced by the local bucket).
    shared: OnceLock<Arc<dyn SharedBudgetStore>>,
    /// Woken whenever headers arrive, so the waiter re-checks at once instead of sleeping a
    /// full refill period on a stale estimate.
    changed: Notify,
    /// Held by the one caller that waits for the next token. tokio's mutex is fair (FIFO),
    /// which is what spreads the refill evenly across the callers in flight.
    turn: tokio::sync::Mutex<()>,
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
    /// Until the first response we do not know the project's budget; allow one request at a
    /// time to find out.
    known: bool,
    /// 429s seen, for metrics and tests.
    rate_limited: u64,
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

    /// How long until one whole token is there (zero if it is).
    fn wait_for_one(&self) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate_per_sec())
        }
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
                known: false,
                rate_limited: 0,
            }),
            changed: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
            shared: OnceLock::new(),
        }
    }

    /// A budget whose bucket is `store`'s, shared with every process using the same store.
    pub fn shared(store: Arc<dyn SharedBudgetStore>) -> Self {
        let b = Self::new();
        b.attach(store);
        b
    }

    /// From now on, paces with `store`'s bucket instead of the local one. `false` if a store
    /// was attached already (the first one stays).
    pub fn attach(&self, store: Arc<dyn SharedBudgetStore>) -> bool {
        self.shared.set(store).is_ok()
    }

    /// Whether this budget is shared with other processes.
    pub fn is_shared(&self) -> bool {
        self.shared.get().is_some()
    }

    /// Copies the shared bucket's numbers into the local mirror (metrics, `wait_estimate`).
    fn mirror(&self, b: &SharedBucket) {
        let mut s = self.lock();
        s.limit_per_hour = b.limit_per_hour;
        s.capacity = b.capacity;
        s.tokens = b.tokens;
        s.refilled_at = Instant::now();
        s.known = true;
    }

    fn store_failed(&self, what: &str, e: &str) {
        tracing::warn!(
            error = %e,
            "shared rate budget unavailable for {what}; pacing this request with the local one"
        );
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

    /// How long the next caller would wait for a token now (zero when one is there).
    pub fn wait_estimate(&self) -> Duration {
        let mut s = self.lock();
        s.refill(Instant::now());
        s.wait_for_one()
    }

    /// 429s this budget has seen.
    pub fn rate_limited_count(&self) -> u64 {
        self.lock().rate_limited
    }

    /// Waits until one request may be sent, and takes its token. Callers are served in the
    /// order they arrived.
    pub async fn acquire(&self) {
        if let Some(store) = self.shared.get() {
            match store.reserve().await {
                Ok(b) => {
                    self.mirror(&b);
                    // The slot is ours: no other process or task can take it, so a plain
                    // sleep (tokio's clock) is the whole wait.
                    tokio::time::sleep(b.wait).await;
                    return;
                }
                Err(e) => self.store_failed("a request", &e),
            }
        }
        let _turn = self.turn.lock().await;
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut s = self.lock();
                s.refill(Instant::now());
                let wait = s.wait_for_one();
                if wait.is_zero() {
                    s.tokens -= 1.0;
                    return;
                }
                wait
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
    pub async fn observe(&self, limit: Option<u64>, remaining: Option<u64>) {
        if let Some(store) = self.shared.get() {
            if limit.is_none() && remaining.is_none() {
                return;
            }
            match store.observe(limit, remaining).await {
                Ok(b) => return self.mirror(&b),
                Err(e) => self.store_failed("the rate-limit headers", &e),
            }
        }
        self.observe_locally(limit, remaining);
    }

    fn observe_locally(&self, limit: Option<u64>, remaining: Option<u64>) {
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

    /// Records a 429: the bucket is empty, so the next request waits for one token's refill
    /// (`1 / (limit/3600)` s). `RateLimit-Reset` is deliberately not waited for: it is when the
    /// bucket is full again, not when the next request is allowed.
    pub async fn rate_limited(&self) {
        if let Some(store) = self.shared.get() {
            match store.rate_limited().await {
                Ok(b) => {
                    self.mirror(&b);
                    self.lock().rate_limited += 1;
                    return;
                }
                Err(e) => self.store_failed("a 429", &e),
            }
        }
        let mut s = self.lock();
        s.refill(Instant::now());
        s.tokens = s.tokens.min(0.0);
        s.known = true;
        s.rate_limited += 1;
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
        b.observe_locally(Some(3600), Some(10));
        assert_eq!((b.limit(), b.remaining()), (3600, 10));
        // A late response from before others spent budget must not raise our estimate.
        b.observe_locally(Some(3600), Some(20));
        assert_eq!(b.remaining(), 10);
        b.observe_locally(Some(3600), Some(4));
        assert_eq!(b.remaining(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_refill_when_empty() {
        let b = RateBudget::new();
        // 36000/h = 10 per second; nothing left.
        b.observe(Some(36_000), Some(0)).await;
        let started = Instant::now();
        b.acquire().await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(99) && waited <= Duration::from_millis(101),
            "{waited:?}"
        );
    }
}

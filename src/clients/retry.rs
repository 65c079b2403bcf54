//! The one retry loop for cloud calls: truncated exponential backoff with full jitter, a bound
//! on the number of retries and an optional deadline.
//!
//! Every place that repeats a call — the clients' idempotent requests, the step machine's
//! resolve-and-retry of creates and mints, rollback, the startup checks — goes through
//! [`retry`], so that the policy (what a backoff looks like, when to give up, what is logged)
//! lives in one place. It must not decide *what* is worth retrying: the caller's `classify`
//! says so, because only the caller knows whether a call is idempotent and what an error means.

use rand::RngExt;
use std::time::Duration;
use tokio::time::Instant;

/// How patient one retry loop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff step; doubles per retry.
    pub base: Duration,
    /// Longest single wait.
    pub cap: Duration,
    /// Retries after the first try (`u32::MAX`: bounded only by the deadline).
    pub max_retries: u32,
}

impl RetryPolicy {
    /// hcloud-go's defaults: base 1 s, cap 60 s, 5 retries.
    pub const fn cloud_default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            max_retries: 5,
        }
    }

    /// The ceiling of the `attempt`-th wait (0-based): `min(cap, base·2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        exp_delay(self.base, self.cap, attempt)
    }

    /// A random wait in `[0, ceiling(attempt)]`. Full jitter, as hcloud-go does, so that many
    /// workers that failed together do not come back together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ms = self.ceiling(attempt).as_millis().min(u128::from(u64::MAX)) as u64;
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }
}

/// `min(cap, base·2^n)` without jitter: also the schedule of pollers that back off while
/// nothing changes (`provision/watch.rs`).
pub fn exp_delay(base: Duration, cap: Duration, n: u32) -> Duration {
    base.saturating_mul(2u32.saturating_pow(n.min(16))).min(cap)
}

/// What to do about one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Definitive (or not safe to repeat): return the error.
    Stop,
    /// Transient: back off and try again.
    Backoff,
    /// Transient, and the answer said how long to wait (`Retry-After`; zero when something else,
    /// such as the Hetzner rate budget, already does the waiting).
    After(Duration),
}

/// Calls `f` until it succeeds, `classify` says stop, the retries are spent, or the next wait
/// would end past `deadline`; returns the last result. Each retry is logged with `what`.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    deadline: Option<Instant>,
    what: &str,
    mut f: F,
    classify: impl Fn(&E) -> Verdict,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        let err = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let wait = match classify(&err) {
            Verdict::Stop => return Err(err),
            Verdict::Backoff => policy.delay(attempt),
            Verdict::After(d) => d.min(policy.cap),
        };
        if attempt >= policy.max_retries || deadline.is_some_and(|d| Instant::now() + wait >= d) {
            return Err(err);
        }
        attempt += 1;
        tracing::info!(attempt, error = %err, "{what} failed; retrying in {wait:?}");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn waits_double_up_to_the_cap_and_never_exceed_the_ceiling() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            max_retries: 10,
        };
        assert_eq!(p.ceiling(0), Duration::from_millis(100));
        assert_eq!(p.ceiling(3), Duration::from_millis(800));
        assert_eq!(p.ceiling(4), Duration::from_secs(1));
        assert_eq!(p.ceiling(40), Duration::from_secs(1));
        for n in 0..20 {
            assert!(p.delay(n) <= p.ceiling(n));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_the_retries_are_spent() {
        let p = RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            max_retries: 3,
        };
        let calls = AtomicU32::new(0);
        let r: Result<(), String> = retry(
            &p,
            None,
            "test call",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("503".to_owned())
            },
            |_| Verdict::Backoff,
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4, "one try and three retries");

        calls.store(0, Ordering::SeqCst);
        let r: Result<u32, String> = retry(
            &p,
            None,
            "test call",
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err("503".to_owned()),
                    n => Ok(n),
                }
            },
            |_| Verdict::Backoff,
        )
        .await;
        assert_eq!(r, Ok(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_definitive_error_is_returned_at_once_and_a_deadline_ends_the_loop() {
        let p = RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(1),
            max_retries: u32::MAX,
        };
        let calls = AtomicU32::new(0);
        let r: Result<(), String> = retry(
            &p,
            None,
            "test call",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("401".to_owned())
            },
            |_| Verdict::Stop,
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        calls.store(0, Ordering::SeqCst);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(3500);
        let r: Result<(), String> = retry(
            &p,
            Some(deadline),
            "test call",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("503".to_owned())
            },
            |_| Verdict::After(Duration::from_secs(1)),
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4, "at 0, 1, 2 and 3 s");
        assert!(Instant::now() <= deadline);
    }
}

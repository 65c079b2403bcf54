//! HTTP clients for the Hetzner Cloud and Tailscale APIs (issue #3).
//!
//! Owns the wire protocol of both services: requests, lenient response models, error
//! classification, retries of idempotent calls, and Hetzner's per-project rate budget.
//! Must not know about jobs, the database or the step machine, and must never retry a
//! non-idempotent call (server create, auth-key create) on its own.

pub mod hetzner;
pub mod rate_budget;
pub mod tailscale;

use rand::Rng;
use std::time::Duration;

/// Truncated exponential backoff with full jitter: a random wait in `[0, min(cap, base·2^n)]`.
/// Full jitter, as hcloud-go does, so that many workers that failed together do not come back
/// together.
pub(crate) fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(cap);
    let ms = ceiling.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

//! The step machine's patience on top of the clients' own retries: how often a step repeats a
//! create or a mint once its outcome is resolved, and how long a rollback keeps trying.
//! Both back off on the clients' schedule (`clients::retry`).

use super::lease_guard::LeaseGuard;
use crate::clients::retry::RetryPolicy;
use crate::worker::RollbackOutcome;
use std::time::Duration;

/// Retries `f` with backoff until it succeeds (`Some`) or `until` passes (`None`). With a
/// guard, every try is preceded by a lease check, and a failed check ends the rollback. The
/// clients already retry each idempotent call; this adds patience on top, bounded by the
/// rollback timeout.
pub(super) async fn retry_until<T, E: std::fmt::Display, F, Fut>(
    until: tokio::time::Instant,
    guard: Option<&LeaseGuard<'_>>,
    what: &str,
    mut f: F,
) -> Result<Option<T>, RollbackOutcome>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        if let Some(g) = guard {
            g.check(what).await?;
        }
        match tokio::time::timeout_at(until, f()).await {
            Ok(Ok(v)) => return Ok(Some(v)),
            Ok(Err(e)) => tracing::warn!(error = %e, "rollback: {what} failed; retrying"),
            Err(_) => {}
        }
        let pause = crate::clients::retry::exp_delay(
            Duration::from_millis(500),
            Duration::from_secs(30),
            attempt,
        );
        attempt += 1;
        if tokio::time::Instant::now() + pause >= until {
            tracing::error!("rollback: gave up on {what}; the reaper will clean up");
            return Ok(None);
        }
        tokio::time::sleep(pause).await;
    }
}

/// How many times one step may retry a create or a mint (after resolving its outcome), on top
/// of the clients' own retries of each idempotent call.
const STEP_RETRIES: u32 = 8;

pub(super) fn step_policy(client: RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        max_retries: STEP_RETRIES,
        cap: client.cap.min(Duration::from_secs(30)),
        ..client
    }
}

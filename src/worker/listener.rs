//! `LISTEN provisiond_jobs` as a wake-up hint, reconnecting forever.
//!
//! A notification only shortens the wait before the next claim; correctness never depends on
//! one arriving (the claim loop also polls). After every (re)connect the worker is woken once,
//! because anything sent while we were disconnected is gone.

use crate::db;
use crate::queue::NOTIFY_CHANNEL;
use crate::secret::Secret;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub async fn listen(url: Secret, wake: Arc<Notify>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        match subscribe(&url).await {
            Ok(mut conn) => {
                backoff = Duration::from_millis(100);
                tracing::debug!("listening for job notifications");
                wake.notify_one();
                let mut stream = std::pin::pin!(conn.notifications_stream());
                loop {
                    tokio::select! {
                        n = stream.next() => match n {
                            Some(Ok(_)) => wake.notify_one(),
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "notification connection lost; reconnecting");
                                break;
                            }
                            None => {
                                tracing::warn!("notification connection closed; reconnecting");
                                break;
                            }
                        },
                        _ = stop.cancelled() => return,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot LISTEN; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn subscribe(url: &Secret) -> Result<diesel_async::AsyncPgConnection, db::DbError> {
    use diesel_async::RunQueryDsl;
    let mut conn = db::establish(url, Duration::from_secs(5)).await?;
    diesel::sql_query(format!("LISTEN {NOTIFY_CHANNEL}"))
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

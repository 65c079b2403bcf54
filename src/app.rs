//! Wiring for `provisiond serve`: the pool, the queue, the worker, the scheduled sweep, and the
//! order in which they stop.
//!
//! Shutdown order: stop claiming → let jobs reach a checkpoint → hand leases back → stop the
//! scheduler. systemd is told READY once migrations ran and the pool is up, and STOPPING when
//! the drain begins; the watchdog is pinged while the process is healthy.

use crate::config::{Config, HandlerKind};
use crate::db;
use crate::queue::Queue;
use crate::worker::{JobHandler, NoopHandler, Worker, WorkerSettings};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;

/// Connects, migrates, and builds the queue. Shared by every subcommand that needs the database.
pub async fn open_queue(config: &Config, migrate: bool) -> anyhow::Result<Queue> {
    let url = config.database_url()?;
    let timeout = config.database.connect_timeout;
    if migrate {
        let applied = db::migrate(url, timeout).await?;
        if !applied.is_empty() {
            tracing::info!(migrations = ?applied, "applied migrations");
        }
    }
    let pool = db::connect(url, config.database.pool_size, timeout).await?;
    Ok(Queue::new(pool, (&config.queue).into()))
}

fn handler_for(config: &Config) -> anyhow::Result<Arc<dyn JobHandler>> {
    match config.worker.handler {
        HandlerKind::Noop => {
            tracing::warn!(
                "worker.handler = \"noop\": jobs are marked running without provisioning anything"
            );
            Ok(Arc::new(NoopHandler {
                hold: config.worker.noop_hold,
            }))
        }
        HandlerKind::Provision => anyhow::bail!(
            "worker.handler = \"provision\" is not available in this build yet; \
             run with [worker] enabled = false, or handler = \"noop\" for tests"
        ),
    }
}

/// Runs the daemon until `shutdown` fires.
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let handler = if config.worker.enabled {
        Some(handler_for(&config)?)
    } else {
        None
    };
    let queue = open_queue(&config, true).await?;
    let mut scheduler = start_sweeper(&config.sweep.schedule, queue.clone()).await?;

    let worker = handler.map(|handler| {
        let settings = WorkerSettings::from_config(&config.worker);
        tracing::info!(owner = %settings.owner, concurrency = settings.concurrency, "worker starting");
        let url = config.database_url().expect("checked by open_queue").clone();
        let worker = Worker::new(queue.clone(), handler, settings, url);
        tokio::spawn(worker.run(shutdown.clone()))
    });

    // --- HTTP surface (issue #5): started before READY, stopped after the worker drained, so
    // runner callbacks and webhooks are answered for as long as jobs may still move.
    let http_stop = CancellationToken::new();
    let http = if config.http.listen.is_empty() {
        None
    } else {
        let state = crate::http::HttpState {
            queue: queue.clone(),
            settings: crate::http::HttpSettings::from_config(&config.http, &config.regions)?,
            regions: config.regions.clone(),
            database_url: config.database_url()?.clone(),
            connect_timeout: config.database.connect_timeout,
        };
        let (_addr, task) =
            crate::http::serve(state, &config.http.listen, http_stop.clone()).await?;
        Some(task)
    };
    // --- end HTTP surface

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let watchdog = tokio::spawn(watchdog(queue.clone(), shutdown.clone()));
    tracing::info!("provisiond serving");
    shutdown.cancelled().await;

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if let Some(worker) = worker {
        worker.await.context("worker task")?;
    }
    // --- HTTP surface: stop accepting, let in-flight requests finish.
    http_stop.cancel();
    if let Some(http) = http {
        http.await.context("http server task")?;
    }
    // --- end HTTP surface
    let _ = scheduler.shutdown().await;
    watchdog.abort();
    tracing::info!("provisiond stopped");
    Ok(())
}

/// The sweep on a cron schedule. A failing sweep is logged and the schedule goes on.
async fn start_sweeper(schedule: &str, queue: Queue) -> anyhow::Result<JobScheduler> {
    let scheduler = JobScheduler::new().await.context("sweep scheduler")?;
    let job = CronJob::new_async(schedule, move |_id, _lock| {
        let queue = queue.clone();
        Box::pin(async move {
            match queue.sweep().await {
                Ok(r) if r.retried.is_empty() && r.failed.is_empty() => {}
                Ok(r) => {
                    tracing::info!(retried = r.retried.len(), failed = r.failed.len(), "sweep")
                }
                Err(e) => tracing::warn!(error = %e, "sweep failed; next run will try again"),
            }
        })
    })
    .with_context(|| format!("sweep.schedule {schedule:?} is not a valid cron expression"))?;
    scheduler.add(job).await.context("schedule sweep")?;
    scheduler.start().await.context("start scheduler")?;
    Ok(scheduler)
}

/// Pings the systemd watchdog while the database answers, so that a wedged process is restarted.
async fn watchdog(queue: Queue, stop: CancellationToken) {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec) / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        if queue.ping().await.is_ok() {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }
}

/// Fires the token on SIGTERM or ctrl-c.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
        }
        t.cancel();
    });
    token
}

//! Wiring for `provisiond serve`: the pool, the queue, the worker, the scheduled sweep, and the
//! order in which they stop.
//!
//! Startup: the clouds are checked first (the server type against Hetzner, the OAuth client
//! against Tailscale); a transient error there is retried with backoff and logged, only a
//! definitive answer (401, an unknown or deprecated type, a refused OAuth client) stops the
//! process. Shutdown order: stop claiming → let jobs reach a checkpoint → hand leases back →
//! stop the scheduler. systemd is told READY once the checks passed, migrations ran and the
//! pool is up, and STOPPING when the drain begins; the watchdog is pinged while the process is
//! healthy.

use crate::clients::hetzner::{HetznerClient, HetznerConfig};
use crate::clients::retry::{RetryPolicy, Verdict, retry};
use crate::clients::tailscale::{TailscaleClient, TailscaleConfig};
use crate::config::{Config, HandlerKind, Regions};
use crate::db;
use crate::provision::watch::WatchSettings;
use crate::provision::{ProvisionSettings, Provisioner, reaper, usable_regions};
use crate::queue::Queue;
use crate::worker::{JobHandler, NoopHandler, Worker, WorkerSettings};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;

/// Connects, migrates, and builds the queue with the database mode resolved. Shared by every
/// subcommand that needs the database.
///
/// A database a newer release migrated is not migrated: this binary is the older one of a
/// rolling upgrade, and keeps serving with a warning (every migration is additive, so its
/// statements still work: docs/MIGRATIONS.md). One that lacks migrations this binary needs
/// while having unknown ones has diverged, and is refused.
pub async fn open_queue(config: &Config, migrate: bool) -> anyhow::Result<Queue> {
    let url = config.database_url()?;
    let timeout = config.database.connect_timeout;
    if migrate {
        let state = db::schema_state(url, timeout).await?;
        if state.ahead() {
            anyhow::ensure!(state.pending.is_empty(), "database {}", state.describe());
            tracing::warn!(
                unknown = ?state.unknown,
                "the database was migrated by a newer provisiond release; running as the older \
                 release of a rolling upgrade (not migrating). Upgrade this host next."
            );
        } else {
            let applied = db::migrate(url, timeout).await?;
            if !applied.is_empty() {
                tracing::info!(migrations = ?applied, "applied migrations");
            }
        }
    }
    let pool = db::connect(url, config.database.pool_size, timeout).await?;
    let mut settings: crate::queue::QueueSettings = (&config.queue).into();
    let resolved = {
        let mut conn = pool.get().await.map_err(db::DbError::from)?;
        db::mode::resolve(&mut conn, config.database.mode).await?
    };
    tracing::debug!(mode = %resolved.mode, reason = %resolved.reason, "database mode");
    settings.mode = resolved.mode;
    Ok(Queue::new(pool, settings))
}

/// The Hetzner and Tailscale clients from config (one of each per process: the Hetzner client
/// carries the process's rate budget).
pub fn clients(config: &Config) -> anyhow::Result<(HetznerClient, TailscaleClient)> {
    let token = config
        .hetzner
        .token
        .clone()
        .context("no Hetzner token: set hetzner.token_file (or PROVISIOND__HETZNER__TOKEN)")?;
    let mut h = HetznerConfig::new(config.hetzner.base_url.clone(), token);
    h.request_timeout = config.hetzner.request_timeout;
    let ts = &config.tailscale;
    anyhow::ensure!(
        !ts.client_id.is_empty(),
        "no Tailscale OAuth client: set tailscale.client_id"
    );
    let secret = ts.client_secret.clone().context(
        "no Tailscale OAuth secret: set tailscale.client_secret_file (or PROVISIOND__TAILSCALE__CLIENT_SECRET)",
    )?;
    let mut t = TailscaleConfig::new(
        ts.base_url.clone(),
        ts.client_id.clone(),
        secret,
        ts.tags.clone(),
    );
    t.tailnet = ts.tailnet.clone();
    t.request_timeout = ts.request_timeout;
    Ok((HetznerClient::new(h), TailscaleClient::new(t)))
}

/// How long `serve` keeps asking the clouds at startup: until they answer (or SIGTERM).
pub const SERVE_STARTUP_PATIENCE: RetryPolicy = RetryPolicy {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(30),
    max_retries: u32::MAX,
};

/// `check-config` and one-shot commands ask a few times, then report the last error.
pub const CLI_PATIENCE: RetryPolicy = RetryPolicy {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(8),
    max_retries: 3,
};

/// Checks both clouds: the server type (returns the usable regions) and the Tailscale OAuth
/// client (a token request). Transient errors are retried by `patience` and logged; a
/// definitive answer is an error at once, one line naming what to fix.
pub async fn check_clouds(
    hetzner: &HetznerClient,
    tailscale: &TailscaleClient,
    settings: &ProvisionSettings,
    patience: &RetryPolicy,
) -> anyhow::Result<Regions> {
    let regions = retry(
        patience,
        None,
        "startup check of hetzner.server_type",
        || usable_regions(hetzner, settings),
        |e| {
            if e.transient() {
                tracing::warn!(error = %e, "startup check of hetzner.server_type: transient error; retrying");
                Verdict::Backoff
            } else {
                Verdict::Stop
            }
        },
    )
    .await
    .context("startup check of hetzner.server_type")?;
    tailscale
        .check_credentials(patience)
        .await
        .inspect_err(|e| {
            if e.is_retryable() {
                tracing::warn!(error = %e, "startup check of the tailscale OAuth client: still failing");
            }
        })
        .context("startup check of the tailscale OAuth client")?;
    Ok(regions)
}

/// The provisioning handler, after the startup checks of both clouds.
pub async fn provisioner(config: &Config, patience: &RetryPolicy) -> anyhow::Result<Provisioner> {
    let (hetzner, tailscale) = clients(config)?;
    let mut settings = ProvisionSettings::from_config(config);
    settings.regions = check_clouds(&hetzner, &tailscale, &settings, patience).await?;
    Ok(Provisioner::new(
        hetzner,
        tailscale,
        settings,
        WatchSettings::default(),
    ))
}

async fn handler_for(
    config: &Config,
) -> anyhow::Result<(Arc<dyn JobHandler>, Option<Provisioner>)> {
    match config.worker.handler {
        HandlerKind::Noop => {
            tracing::warn!(
                "worker.handler = \"noop\": jobs are marked running without provisioning anything"
            );
            Ok((
                Arc::new(NoopHandler {
                    hold: config.worker.noop_hold,
                }),
                None,
            ))
        }
        HandlerKind::Provision => {
            let p = provisioner(config, &SERVE_STARTUP_PATIENCE).await?;
            Ok((Arc::new(p.clone()), Some(p)))
        }
    }
}

/// Runs the daemon until `shutdown` fires.
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (handler, provisioner) = if config.worker.enabled {
        // SIGTERM during the startup checks (a cloud that stays down) stops cleanly.
        let (h, p) = tokio::select! {
            r = handler_for(&config) => r?,
            _ = shutdown.cancelled() => {
                tracing::info!("stopped during the startup checks");
                return Ok(());
            }
        };
        (Some(h), p)
    } else {
        (None, None)
    };
    let queue = open_queue(&config, true).await?;
    let mut scheduler = start_sweeper(&config.sweep.schedule, queue.clone()).await?;
    if let Some(p) = &provisioner {
        schedule_reaper(&scheduler, &config, queue.clone(), p.clone()).await?;
    }

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
        let state = crate::http::HttpState::new(
            queue.clone(),
            crate::http::HttpSettings::from_config(&config.http, &config.regions)?,
            config.regions.clone(),
            config.database_url()?.clone(),
            config.database.connect_timeout,
        );
        let (_addr, task) =
            crate::http::serve(state, &config.http.listen, http_stop.clone()).await?;
        Some(task)
    };
    // --- end HTTP surface

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let watchdog = tokio::spawn(watchdog(queue.clone(), shutdown.clone()));
    tracing::info!(database.mode = %queue.settings().mode, "provisiond serving");
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

/// The reaper on its cron schedule; a failing pass is logged and the schedule goes on.
async fn schedule_reaper(
    scheduler: &JobScheduler,
    config: &Config,
    queue: Queue,
    p: Provisioner,
) -> anyhow::Result<()> {
    let grace = config.provision.reaper_grace;
    let schedule = config.provision.reaper_schedule.clone();
    let job = CronJob::new_async(schedule.as_str(), move |_id, _lock| {
        let (queue, p) = (queue.clone(), p.clone());
        Box::pin(async move {
            let r = reaper::reap(
                &queue,
                p.hetzner(),
                p.tailscale(),
                &p.settings().tags,
                grace,
            )
            .await;
            if !r.servers_deleted.is_empty()
                || !r.devices_deleted.is_empty()
                || !r.keys_revoked.is_empty()
            {
                tracing::warn!(
                    servers = r.servers_deleted.len(),
                    devices = r.devices_deleted.len(),
                    keys = r.keys_revoked.len(),
                    "reaper pass"
                );
            }
        })
    })
    .with_context(|| {
        format!("provision.reaper_schedule {schedule:?} is not a valid cron expression")
    })?;
    scheduler.add(job).await.context("schedule reaper")?;
    Ok(())
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

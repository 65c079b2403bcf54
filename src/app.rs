//! Wiring for `provisiond serve`: the pool, the queue, the worker, the scheduled sweep, and the
//! order in which they stop.
//!
//! Startup: migrations first (additive, so harmless even for a daemon whose cloud credentials
//! turn out wrong; and the shared Hetzner request budget lives in the database), then the clouds
//! are checked (the server type against Hetzner, the OAuth client against Tailscale), paced by
//! that shared budget; a transient error there is retried with backoff and logged, only a
//! definitive answer (401, an unknown or deprecated type, a refused OAuth client) stops the
//! process. Start order: migrations → checks → schedules → HTTP listener bound → worker, so no
//! job is claimed before the daemon can answer for it. Shutdown order: stop claiming → let jobs
//! reach a checkpoint → hand leases back → stop HTTP → stop the scheduler. `serve` watches its
//! tasks (worker, HTTP server, watchdog): one that ends or panics on its own is logged in one
//! line, the rest are shut down in that order, and `serve` returns an error (a non-zero exit, so
//! systemd restarts the unit). systemd is told READY once the checks passed, migrations ran, the
//! listener is bound and the worker started, and STOPPING when the drain begins; the watchdog
//! is pinged while the database answers.

use crate::clients::hetzner::{HetznerClient, HetznerConfig};
use crate::clients::retry::{RetryPolicy, Verdict, retry};
use crate::clients::tailscale::{TailscaleClient, TailscaleConfig};
use crate::config::{Config, Regions};
use crate::db;
use crate::provision::watch::WatchSettings;
use crate::provision::{ProvisionSettings, Provisioner, reaper, usable_regions};
use crate::queue::Queue;
use crate::worker::{Worker, WorkerSettings};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
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

/// The provisioning handler, after the startup checks of both clouds. With a queue, its
/// Hetzner requests (the checks' included) are paced by the project's shared budget.
pub async fn provisioner(
    config: &Config,
    patience: &RetryPolicy,
    queue: Option<&Queue>,
) -> anyhow::Result<Provisioner> {
    let (hetzner, tailscale) = clients(config)?;
    if let Some(queue) = queue {
        share_rate_budget(config, queue, &hetzner).await?;
    }
    let mut settings = ProvisionSettings::from_config(config);
    settings.regions = check_clouds(&hetzner, &tailscale, &settings, patience).await?;
    Ok(Provisioner::new(
        hetzner,
        tailscale,
        settings,
        WatchSettings::default(),
    ))
}

/// Paces `hetzner`'s requests with the project's budget in the database, shared by every
/// daemon that names the same `hetzner.project`. Before the first request: a request sent
/// outside the shared bucket spends tokens the other daemons still count on.
async fn share_rate_budget(
    config: &Config,
    queue: &Queue,
    hetzner: &HetznerClient,
) -> anyhow::Result<()> {
    if !config.hetzner.share_budget {
        tracing::info!("hetzner.share_budget = false: this daemon paces its requests alone");
        return Ok(());
    }
    let store = db::rate_budget::PgRateBudget::open(queue.pool().clone(), &config.hetzner.project)
        .await
        .context("opening the shared Hetzner rate budget")?;
    hetzner.budget().attach(Arc::new(store));
    tracing::info!(
        project = %config.hetzner.project,
        "Hetzner requests paced by the project's shared budget"
    );
    Ok(())
}

/// Runs the daemon until `shutdown` fires (then `Ok`), or until one of its tasks ends on its
/// own (then the others are shut down in order and the error says which task died, so that
/// the process exits non-zero and systemd restarts it).
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    match start(config, shutdown).await? {
        Some(daemon) => daemon.run().await,
        None => Ok(()),
    }
}

/// A started daemon: its HTTP listener bound, its worker claiming, its schedules running.
pub struct Daemon {
    /// The signal (SIGTERM) that stops the daemon normally.
    shutdown: CancellationToken,
    /// Stops the worker and the watchdog: on `shutdown`, or when a task died.
    stop: CancellationToken,
    /// Stops the HTTP server, after the worker drained.
    http_stop: CancellationToken,
    http_addr: Option<SocketAddr>,
    /// In shutdown order: the worker, then the HTTP server, then the watchdog.
    tasks: Vec<Task>,
    scheduler: JobScheduler,
}

struct Task {
    name: &'static str,
    handle: JoinHandle<()>,
}

/// Starts the daemon: migrates, checks the clouds (when it provisions; paced by the project's
/// shared request budget, which lives in the database), schedules the sweep and the reaper, binds the HTTP listener, and only then starts the worker, so no job is claimed
/// by a process that cannot answer the callbacks and probes that follow. `None` when `shutdown`
/// fired during the startup checks.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Option<Daemon>> {
    let queue = open_queue(&config, true).await?;
    let provisioner = if config.worker.enabled {
        // SIGTERM during the startup checks (a cloud that stays down) stops cleanly.
        tokio::select! {
            r = provisioner(&config, &SERVE_STARTUP_PATIENCE, Some(&queue)) => Some(r?),
            _ = shutdown.cancelled() => {
                tracing::info!("stopped during the startup checks");
                return Ok(None);
            }
        }
    } else {
        None
    };
    let scheduler = start_sweeper(&config.sweep.schedule, queue.clone()).await?;
    if let Some(p) = &provisioner {
        schedule_reaper(&scheduler, &config, queue.clone(), p.clone()).await?;
    }
    let stop = shutdown.child_token();
    let http_stop = CancellationToken::new();
    let mut tasks = Vec::new();

    // HTTP first (started before READY, stopped after the worker drained), so runner callbacks
    // and webhooks are answered for as long as jobs may move.
    let http = match start_http(&config, &queue, &http_stop).await {
        Ok(http) => http,
        Err(e) => {
            let mut scheduler = scheduler;
            let _ = scheduler.shutdown().await;
            return Err(e);
        }
    };
    let http_addr = http.as_ref().map(|(addr, _)| *addr);

    if let Some(p) = provisioner {
        let settings = WorkerSettings::from_config(&config.worker);
        tracing::info!(owner = %settings.owner, concurrency = settings.concurrency, "worker starting");
        let url = config.database_url()?.clone();
        let worker = Worker::new(queue.clone(), Arc::new(p), settings, url);
        let stop = stop.clone();
        tasks.push(Task {
            name: "worker",
            handle: tokio::spawn(async move {
                worker.run(stop).await;
            }),
        });
    }
    if let Some((_, handle)) = http {
        tasks.push(Task {
            name: "http server",
            handle,
        });
    }
    if let Some(every) = watchdog_interval() {
        tasks.push(Task {
            name: "watchdog",
            handle: tokio::spawn(watchdog(queue.clone(), every, stop.clone())),
        });
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(database.mode = %queue.settings().mode, "provisiond serving");
    Ok(Some(Daemon {
        shutdown,
        stop,
        http_stop,
        http_addr,
        tasks,
        scheduler,
    }))
}

/// Binds `http.listen` and starts serving (`None` when it is empty).
async fn start_http(
    config: &Config,
    queue: &Queue,
    stop: &CancellationToken,
) -> anyhow::Result<Option<(SocketAddr, JoinHandle<()>)>> {
    if config.http.listen.is_empty() {
        return Ok(None);
    }
    let state = crate::http::HttpState::new(
        queue.clone(),
        crate::http::HttpSettings::from_config(&config.http, &config.regions)?,
        config.regions.clone(),
        config.database_url()?.clone(),
        config.database.connect_timeout,
    );
    Ok(Some(
        crate::http::serve(state, &config.http.listen, stop.clone()).await?,
    ))
}

impl Daemon {
    /// Where the HTTP surface listens (`None` without one).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The names of the running tasks, in shutdown order.
    pub fn task_names(&self) -> Vec<&'static str> {
        self.tasks.iter().map(|t| t.name).collect()
    }

    /// Aborts the named task, as a crash of that task would end it (a test hook: nothing the
    /// daemon reads can call it). Returns whether such a task exists.
    pub fn abort_task(&self, name: &str) -> bool {
        self.tasks
            .iter()
            .filter(|t| t.name == name)
            .map(|t| t.handle.abort())
            .count()
            > 0
    }

    /// Waits for the shutdown signal or the first task to end, then shuts down in order: stop
    /// claiming → let jobs reach a checkpoint → hand leases back (the worker) → stop HTTP →
    /// stop the schedules. A task that ended on its own is an error.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let died = self.first_to_end().await;
        if let Some((name, how)) = &died {
            tracing::error!(task = name, "{name} task {how}; shutting down");
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        self.stop.cancel();
        for task in std::mem::take(&mut self.tasks) {
            if task.name == "http server" {
                // Stop accepting once the worker drained; in-flight requests finish.
                self.http_stop.cancel();
            }
            if let Err(e) = task.handle.await
                && died.is_none()
            {
                tracing::warn!(task = task.name, error = %e, "task failed while stopping");
            }
        }
        self.http_stop.cancel();
        let _ = self.scheduler.shutdown().await;
        match died {
            Some((name, how)) => Err(anyhow::anyhow!("the {name} task {how}")),
            None => {
                tracing::info!("provisiond stopped");
                Ok(())
            }
        }
    }

    /// `None` when the shutdown signal came first; else the task that ended and how.
    async fn first_to_end(&mut self) -> Option<(&'static str, String)> {
        if self.tasks.is_empty() {
            self.shutdown.cancelled().await;
            return None;
        }
        let (index, result) = {
            let ended = futures::future::select_all(self.tasks.iter_mut().map(|t| &mut t.handle));
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                (result, index, _) = ended => (index, result),
            }
        };
        let task = self.tasks.remove(index);
        let how = match result {
            Ok(()) => "ended unexpectedly".to_owned(),
            Err(e) if e.is_panic() => "panicked".to_owned(),
            Err(e) if e.is_cancelled() => "was aborted".to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        Some((task.name, how))
    }
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

/// How often to ping systemd's watchdog (a third of its timeout), if it watches this process.
fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec) / 3)
}

/// Pings the systemd watchdog while the database answers, so that a wedged process is restarted.
async fn watchdog(queue: Queue, every: Duration, stop: CancellationToken) {
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

//! The step machine of one daemon-run job: what the GitHub Actions workflow used to do.
//!
//! `key_minted` → `vm_created` → `vm_running` → `network_configured` → done. Every step is
//! idempotent and ends in a fenced checkpoint (a `job_events` row, `current_step` on the job and
//! on its agent instance), so a resumed attempt starts from what an earlier one recorded:
//!
//! - No server can exist for a job that never minted a key (the key checkpoint precedes every
//!   create), so only a resumed attempt looks servers up by label before creating; it adopts
//!   what it finds. A `uniqueness_error` adopts by name; a create whose outcome is unknown looks
//!   again by label. A create is never retried blindly.
//! - The key secret exists only in memory and in the server's user_data. A resumed attempt that
//!   finds no server revokes the old key and mints a new one; one that finds the server keeps it.
//! - Waiting is done by the shared watchers (`watch.rs`), never by polling per job.
//! - A terminal failure (fatal error, deadline, retries spent) rolls back: server deleted (retried
//!   through 429s and 5xx), device deleted, key revoked; the reaper (`reaper.rs`) is the backstop
//!   for anything a crash leaves behind. The rollback runs only after the fenced write that
//!   decided it (the worker's `fail`), while the lease is held, and confirms the lease before
//!   every delete and revoke: a worker whose job was taken over touches nothing.
//!
//! Must not: hold a database transaction across a cloud call (the queue API has none to hold),
//! or write anything after its lease is lost.

pub mod cloud_init;
pub mod reaper;
pub mod watch;

use crate::clients::hetzner::{
    CreateServerRequest, CreateServerResponse, ErrorClass, HetznerClient, HetznerError,
    PublicNetRequest, Server, ServerQuery, ServerStatus,
};
use crate::clients::retry::{RetryPolicy, Verdict, retry};
use crate::clients::tailscale::{
    AuthKey, CreateKey, DeviceFilter, TailscaleClient, TailscaleError,
};
use crate::config::Regions;
use crate::db::models::Job;
use crate::queue::{Fence, QueueError, StepFields, VmMetadata};
use crate::worker::{JobContext, JobHandler, Outcome, RollbackOutcome};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use uuid::Uuid;
use watch::{ActionWatcher, DeviceWatcher, WatchSettings};

/// The `managed-by` label on every server we create; the reaper lists by it.
pub const MANAGED_BY: &str = "provisiond";

/// Step names, in order. `vm_created` and `network_configured` are the seed's.
pub const STEPS: [&str; 4] = [
    "key_minted",
    "vm_created",
    "vm_running",
    "network_configured",
];

/// The server (and tailnet) name of a job: deterministic, unique, a valid hostname.
pub fn server_name(job_id: Uuid) -> String {
    format!("pv-{}", job_id.simple())
}

/// The label selector of a job's servers.
pub fn job_selector(job_id: Uuid) -> String {
    format!("managed-by={MANAGED_BY},job={job_id}")
}

#[derive(Debug, Clone)]
pub struct ProvisionSettings {
    pub server_type: String,
    pub image: String,
    pub ssh_keys: Vec<String>,
    pub regions: Regions,
    pub tags: Vec<String>,
    pub key_expiry: Duration,
    pub deadline: Duration,
    pub rollback_timeout: Duration,
}

impl ProvisionSettings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        ProvisionSettings {
            server_type: c.hetzner.server_type.clone(),
            image: c.hetzner.image.clone(),
            ssh_keys: c.hetzner.ssh_keys.clone(),
            regions: c.regions.clone(),
            tags: c.tailscale.tags.clone(),
            key_expiry: c.tailscale.key_expiry,
            deadline: c.provision.deadline,
            rollback_timeout: c.provision.rollback_timeout,
        }
    }
}

/// Why the startup check of the server type failed.
#[derive(Debug, thiserror::Error)]
pub enum StartupCheckError {
    /// The API did not answer usefully; `transient()` tells whether asking again may help.
    #[error("hetzner: {0}")]
    Api(#[from] HetznerError),
    /// A definitive answer: the type is unknown, or unusable in every location of a region.
    #[error("{0}")]
    Unusable(String),
}

impl StartupCheckError {
    /// Worth asking again (5xx, timeout, 429): not a verdict on the configuration.
    pub fn transient(&self) -> bool {
        matches!(self, StartupCheckError::Api(e) if e.class() == ErrorClass::Retryable)
    }
}

/// Startup check: the configured server type exists and is usable (not deprecated, available)
/// in at least one location of every region. Returns the regions with the unusable locations
/// removed (so that jobs do not try them); a region left with none is an error.
pub async fn usable_regions(
    hetzner: &HetznerClient,
    settings: &ProvisionSettings,
) -> Result<Regions, StartupCheckError> {
    let types = hetzner.list_server_types().await?;
    let Some(t) = types.iter().find(|t| t.name == settings.server_type) else {
        return Err(StartupCheckError::Unusable(format!(
            "hetzner.server_type {:?} does not exist in this project (known: {})",
            settings.server_type,
            types
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let mut usable = Regions(BTreeMap::new());
    for (region, locations) in &settings.regions.0 {
        let (ok, bad): (Vec<String>, Vec<String>) =
            locations.iter().cloned().partition(|l| t.usable_in(l));
        if ok.is_empty() {
            return Err(StartupCheckError::Unusable(format!(
                "hetzner.server_type {:?} is deprecated or unavailable in every location of region {region} ({}); pick another type or location",
                settings.server_type,
                locations.join(", ")
            )));
        }
        if !bad.is_empty() {
            tracing::warn!(region, locations = %bad.join(", "), server_type = %settings.server_type, "server type unusable there; skipping those locations");
        }
        usable.0.insert(region.clone(), ok);
    }
    Ok(usable)
}

/// A test and chaos hook: called with a point's name at every step boundary; `true` makes the
/// attempt stop dead there, writing nothing more, as if the process had died.
pub type Failpoint = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Clone)]
pub struct Provisioner {
    inner: Arc<Inner>,
}

struct Inner {
    hetzner: HetznerClient,
    tailscale: TailscaleClient,
    settings: ProvisionSettings,
    actions: ActionWatcher,
    devices: DeviceWatcher,
    failpoint: Option<Failpoint>,
}

/// Why an attempt stopped early.
#[derive(Debug)]
enum Stop {
    /// Try again later from the last checkpoint.
    Retry {
        error: String,
        step: &'static str,
    },
    /// Give up: roll back and fail the job.
    Fatal {
        error: String,
        step: &'static str,
    },
    LeaseLost,
    /// The stop token fired (shutdown): hand the lease back.
    Interrupted,
    /// A failpoint fired: behave as a dead process would (write nothing more).
    Crashed,
}

impl From<QueueError> for Stop {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::LeaseLost(_) => Stop::LeaseLost,
            other => Stop::Retry {
                error: format!("database: {other}"),
                step: "checkpoint",
            },
        }
    }
}

fn hetzner_stop(step: &'static str, what: &str, e: &HetznerError) -> Stop {
    let error = format!("{what}: {e}");
    match e.class() {
        ErrorClass::Retryable => Stop::Retry { error, step },
        _ => Stop::Fatal { error, step },
    }
}

fn tailscale_stop(step: &'static str, what: &str, e: &TailscaleError) -> Stop {
    let error = format!("{what}: {e}");
    if e.is_retryable() {
        Stop::Retry { error, step }
    } else {
        Stop::Fatal { error, step }
    }
}

impl Provisioner {
    pub fn new(
        hetzner: HetznerClient,
        tailscale: TailscaleClient,
        settings: ProvisionSettings,
        watch: WatchSettings,
    ) -> Self {
        Provisioner {
            inner: Arc::new(Inner {
                actions: ActionWatcher::start(hetzner.clone(), watch.clone()),
                devices: DeviceWatcher::start(tailscale.clone(), watch),
                hetzner,
                tailscale,
                settings,
                failpoint: None,
            }),
        }
    }

    /// Installs a failpoint hook (tests and chaos drills only).
    pub fn with_failpoint(self, failpoint: Failpoint) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|arc| Inner {
            hetzner: arc.hetzner.clone(),
            tailscale: arc.tailscale.clone(),
            settings: arc.settings.clone(),
            actions: arc.actions.clone(),
            devices: arc.devices.clone(),
            failpoint: None,
        });
        Provisioner {
            inner: Arc::new(Inner {
                failpoint: Some(failpoint),
                ..inner
            }),
        }
    }

    pub fn hetzner(&self) -> &HetznerClient {
        &self.inner.hetzner
    }

    pub fn tailscale(&self) -> &TailscaleClient {
        &self.inner.tailscale
    }

    pub fn settings(&self) -> &ProvisionSettings {
        &self.inner.settings
    }

    fn failpoint(&self, name: &str) -> Result<(), Stop> {
        match &self.inner.failpoint {
            Some(f) if f(name) => Err(Stop::Crashed),
            _ => Ok(()),
        }
    }

    async fn run_attempt(&self, ctx: JobContext) -> Outcome {
        let started = tokio::time::Instant::now();
        // The deadline counts from this attempt's claim.
        let used = (chrono::Utc::now() - ctx.job.claimed_at.unwrap_or_else(chrono::Utc::now))
            .to_std()
            .unwrap_or_default();
        let deadline = started + self.inner.settings.deadline.saturating_sub(used);
        let mut attempt = Attempt {
            p: self,
            ctx: &ctx,
            job: ctx.job.clone(),
            deadline,
            step_started: started,
        };
        let result = attempt.run().await;
        if let Err(Stop::Retry { step, .. } | Stop::Fatal { step, .. }) = &result {
            crate::metrics::step_finished(step, attempt.step_started.elapsed(), false);
        }
        match result {
            Ok(()) => Outcome::Finished,
            Err(Stop::Interrupted) | Err(Stop::Crashed) => Outcome::Interrupted,
            Err(Stop::LeaseLost) => Outcome::LeaseLost,
            // Whether a retry is left is decided by the queue, from the row it updates; a
            // failure for good is rolled back by the worker after that fenced write.
            Err(Stop::Retry { error, step }) => {
                tracing::warn!(step, error = %error, "attempt failed");
                Outcome::Retry {
                    error,
                    step: Some(step.to_owned()),
                }
            }
            Err(Stop::Fatal { error, step }) => {
                tracing::error!(step, error = %error, "provisioning failed");
                Outcome::Fail {
                    error,
                    step: Some(step.to_owned()),
                }
            }
        }
    }

    /// Deletes what a failed job created: its servers (by id and by label), its device, its key.
    /// Every delete and revoke is preceded by a lease check (`Queue::confirm_lease`, which also
    /// renews it), so that a worker whose job was taken over stops before touching anything the
    /// new owner may use. Deletes are retried through 429s and 5xx for `rollback_timeout`; what
    /// is left after that is the reaper's. Idempotent: a resumed rollback does it all again.
    async fn roll_back(&self, ctx: JobContext) -> RollbackOutcome {
        let guard = LeaseGuard { p: self, ctx: &ctx };
        match self.rollback_all(&ctx.job, &guard).await {
            Ok(complete) => RollbackOutcome::Done { complete },
            Err(stopped) => stopped,
        }
    }

    /// Returns whether everything was deleted, or why it stopped.
    async fn rollback_all(
        &self,
        job: &Job,
        guard: &LeaseGuard<'_>,
    ) -> Result<bool, RollbackOutcome> {
        let mut complete = true;
        let until = tokio::time::Instant::now() + self.inner.settings.rollback_timeout;
        let h = &self.inner.hetzner;
        let t = &self.inner.tailscale;
        let mut servers: Vec<i64> = job.server_id.into_iter().collect();
        let q = ServerQuery {
            label_selector: Some(job_selector(job.id)),
            name: None,
        };
        match retry_until(until, None, "list servers", || h.list_servers(&q)).await? {
            Some(found) => {
                servers.extend(found.iter().map(|s| s.id));
                servers.sort_unstable();
                servers.dedup();
            }
            None => complete = false,
        }
        for id in servers {
            let deleted = retry_until(until, Some(guard), "delete server", || h.delete_server(id));
            if deleted.await?.is_some() {
                tracing::info!(server.id = id, "rollback: server deleted");
            } else {
                complete = false;
            }
        }
        let mut devices: Vec<String> = job.device_id.iter().cloned().collect();
        let filter = DeviceFilter {
            hostname: Some(server_name(job.id)),
            tags: self.inner.settings.tags.clone(),
        };
        match retry_until(until, None, "list devices", || t.list_devices(&filter)).await? {
            Some(found) => {
                devices.extend(found.into_iter().map(|d| d.node_id));
                devices.sort_unstable();
                devices.dedup();
            }
            None => complete = false,
        }
        for node in devices {
            let deleted = retry_until(until, Some(guard), "delete device", || {
                t.delete_device(&node)
            });
            complete &= deleted.await?.is_some();
        }
        let description = key_description(job.id);
        let revoked = retry_until(until, Some(guard), "revoke keys", || {
            revoke_job_keys(t, &description, job.tailscale_key_id.as_deref())
        });
        complete &= revoked.await?.is_some();
        Ok(complete)
    }
}

/// The lease check a rollback makes before each irreversible call.
struct LeaseGuard<'a> {
    p: &'a Provisioner,
    ctx: &'a JobContext,
}

impl LeaseGuard<'_> {
    async fn check(&self, what: &str) -> Result<(), RollbackOutcome> {
        // A crash drill stops the rollback dead here, writing nothing, as a killed process would.
        if self.ctx.stop.is_cancelled() || self.p.failpoint(&format!("rollback:{what}")).is_err() {
            return Err(RollbackOutcome::Interrupted);
        }
        match self.ctx.queue.confirm_lease(&self.ctx.lease).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!("rollback: lease lost; touching nothing more");
                Err(RollbackOutcome::LeaseLost)
            }
            // Unconfirmed is not ours: stop, and let the next holder resume the rollback.
            Err(e) => {
                tracing::warn!(error = %e, "rollback: cannot confirm the lease; stopping");
                Err(RollbackOutcome::Interrupted)
            }
        }
    }
}

/// Retries `f` with backoff until it succeeds (`Some`) or `until` passes (`None`). With a
/// guard, every try is preceded by a lease check, and a failed check ends the rollback. The
/// clients already retry each idempotent call; this adds patience on top, bounded by the
/// rollback timeout.
async fn retry_until<T, E: std::fmt::Display, F, Fut>(
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

/// The description of every auth key minted for a job: the server name, `pv-` and the job id
/// without hyphens (35 characters; Tailscale allows 50 alphanumerics, hyphens and spaces). It is
/// how a key whose mint outcome is unknown, or whose checkpoint never landed, is found again.
pub fn key_description(job_id: Uuid) -> String {
    server_name(job_id)
}

/// How many times one step may retry a create or a mint (after resolving its outcome), on top
/// of the clients' own retries of each idempotent call.
const STEP_RETRIES: u32 = 8;

fn step_policy(client: RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        max_retries: STEP_RETRIES,
        cap: client.cap.min(Duration::from_secs(30)),
        ..client
    }
}

/// A failed mint, and which part of it failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {error}")]
struct MintFailure {
    what: &'static str,
    error: TailscaleError,
}

/// A create's outcome once resolved.
enum Made {
    Created(Box<CreateServerResponse>),
    /// The create failed in transit, but the server exists.
    Found(Server),
}

/// The job's live server, if any (the oldest, when a bug ever made two).
async fn find_job_server(h: &HetznerClient, job_id: Uuid) -> Result<Option<Server>, HetznerError> {
    let q = ServerQuery {
        label_selector: Some(job_selector(job_id)),
        name: None,
    };
    let mut found = h.list_servers(&q).await?;
    found.retain(|s| s.status != ServerStatus::Deleting);
    found.sort_by_key(|s| (s.created, s.id));
    Ok(found.into_iter().next())
}

/// Revokes the recorded key and every valid key described as the job's, so that no key minted
/// for the job stays usable once it is no longer the one the job will use.
pub async fn revoke_job_keys(
    t: &TailscaleClient,
    description: &str,
    recorded: Option<&str>,
) -> Result<Vec<String>, TailscaleError> {
    let mut ids: Vec<String> = t
        .keys_described(description)
        .await?
        .into_iter()
        .map(|k| k.id)
        .collect();
    ids.extend(recorded.map(str::to_owned));
    ids.sort_unstable();
    ids.dedup();
    for id in &ids {
        t.revoke_key(id).await?;
        tracing::info!(key = %id, "revoked a key minted for this job");
    }
    Ok(ids)
}

impl JobHandler for Provisioner {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        let p = self.clone();
        async move { p.run_attempt(ctx).await }.boxed()
    }

    fn rollback(&self, ctx: JobContext) -> BoxFuture<'static, RollbackOutcome> {
        let p = self.clone();
        async move { p.roll_back(ctx).await }.boxed()
    }
}

/// One attempt at one job; `job` is kept in step with every checkpoint written.
struct Attempt<'a> {
    p: &'a Provisioner,
    ctx: &'a JobContext,
    job: Job,
    deadline: tokio::time::Instant,
    /// When the step now under way began (for its duration metric).
    step_started: tokio::time::Instant,
}

impl Attempt<'_> {
    fn fence(&self) -> Fence {
        Fence::Lease(self.ctx.lease)
    }

    fn reached(&self, step: &str) -> bool {
        let pos = |s: &str| STEPS.iter().position(|x| *x == s);
        match (self.job.current_step.as_deref().and_then(pos), pos(step)) {
            (Some(at), Some(want)) => at >= want,
            _ => false,
        }
    }

    /// Between steps: stop for shutdown, a lost lease or the deadline before the next call.
    fn check(&self, step: &'static str) -> Result<(), Stop> {
        if self.ctx.stop.is_cancelled() {
            return Err(Stop::Interrupted);
        }
        if tokio::time::Instant::now() >= self.deadline {
            return Err(self.deadline_stop(step));
        }
        Ok(())
    }

    fn deadline_stop(&self, step: &'static str) -> Stop {
        Stop::Fatal {
            error: format!(
                "deadline of {} exceeded",
                humantime::format_duration(self.p.inner.settings.deadline)
            ),
            step,
        }
    }

    /// Waits for `fut`, unless the stop token or the deadline comes first. Only for waits with
    /// no side effects (watchers, sleeps).
    async fn wait<T>(
        &self,
        step: &'static str,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, Stop> {
        tokio::select! {
            v = fut => Ok(v),
            _ = self.ctx.stop.cancelled() => Err(Stop::Interrupted),
            _ = tokio::time::sleep_until(self.deadline) => Err(self.deadline_stop(step)),
        }
    }

    async fn checkpoint(
        &mut self,
        step: &'static str,
        message: String,
        data: serde_json::Value,
        fields: StepFields,
    ) -> Result<(), Stop> {
        self.job = self
            .ctx
            .queue
            .checkpoint_step(self.job.id, self.fence(), step, &message, data, fields)
            .await?;
        crate::metrics::step_finished(step, self.step_started.elapsed(), true);
        self.step_started = tokio::time::Instant::now();
        tracing::info!(step, "{message}");
        self.p.failpoint(&format!("after_checkpoint:{step}"))
    }

    async fn run(&mut self) -> Result<(), Stop> {
        if self.job.server_id.is_none() {
            self.server().await?;
        }
        if !self.reached("vm_running") {
            self.vm_running().await?;
        }
        if !self.reached("network_configured") {
            self.network().await?;
        }
        self.check("done")?;
        // The key is used up once the device joined, but only a revoked key is certainly
        // useless. Revoking is idempotent, so a resumed attempt simply does it again.
        if let Some(key) = self.job.tailscale_key_id.clone() {
            self.p
                .inner
                .tailscale
                .revoke_key(&key)
                .await
                .map_err(|e| tailscale_stop("network_configured", "revoke the used key", &e))?;
            self.ctx
                .queue
                .record_step(
                    self.job.id,
                    self.fence(),
                    "network_configured",
                    "auth key revoked",
                    json!({ "key_id": key }),
                )
                .await?;
        }
        let meta = VmMetadata {
            server_id: self
                .job
                .server_id
                .map(|i| i.to_string())
                .unwrap_or_default(),
            server_ip: self.job.server_ip.clone().unwrap_or_default(),
            tailscale_ip: self.job.tailscale_ip.clone().unwrap_or_default(),
        };
        self.ctx
            .queue
            .complete_with_metadata(self.job.id, self.fence(), &meta)
            .await?;
        tracing::info!(
            "provisioned: server {} at {}",
            meta.server_id,
            meta.tailscale_ip
        );
        Ok(())
    }

    /// `key_minted` and `vm_created`: adopt the job's server, or mint a key and create it.
    async fn server(&mut self) -> Result<(), Stop> {
        let p = self.p;
        let h = &p.inner.hetzner;
        let s = &p.inner.settings;
        let name = server_name(self.job.id);
        let resumed = self.job.tailscale_key_id.is_some() || self.job.retry_count > 0;
        if resumed {
            self.check("vm_created")?;
            if let Some(found) = self.find_server().await? {
                return self
                    .adopt(found, "adopted the server of an earlier attempt")
                    .await;
            }
        }

        self.check("key_minted")?;
        p.failpoint("before_key")?;
        if self.job.tailscale_key_id.is_some() {
            // A server of an earlier attempt may have joined under this name and been lost
            // since: its device would be mistaken for the new one.
            self.delete_stale_devices(&name).await?;
        }
        let key = self.mint_key(resumed).await?;
        p.failpoint("after_key")?;
        self.checkpoint(
            "key_minted",
            format!("minted single-use auth key {}", key.id),
            json!({ "key_id": key.id, "expires": key.expires }),
            StepFields {
                tailscale_key_id: Some(Some(key.id.clone())),
                server_name: Some(name.clone()),
                ..StepFields::default()
            },
        )
        .await?;
        let user_data =
            cloud_init::user_data(&name, key.key.expose(), &s.tags).map_err(|e| Stop::Fatal {
                error: e.to_string(),
                step: "vm_created",
            })?;
        drop(key);

        let locations = s
            .regions
            .0
            .get(&self.job.region)
            .cloned()
            .ok_or_else(|| Stop::Fatal {
                error: format!("region {:?} is not configured", self.job.region),
                step: "vm_created",
            })?;
        let labels = BTreeMap::from([
            ("managed-by".to_owned(), MANAGED_BY.to_owned()),
            ("job".to_owned(), self.job.id.to_string()),
        ]);
        let mut no_capacity = Vec::new();
        for location in &locations {
            self.check("vm_created")?;
            p.failpoint("before_create")?;
            let request = CreateServerRequest {
                name: name.clone(),
                server_type: s.server_type.clone(),
                image: s.image.clone(),
                location: Some(location.clone()),
                user_data: Some(user_data.clone()),
                labels: labels.clone(),
                ssh_keys: s.ssh_keys.clone(),
                start_after_create: true,
                public_net: Some(PublicNetRequest {
                    enable_ipv4: true,
                    enable_ipv6: true,
                }),
            };
            match self.create_or_find(&request).await {
                Ok(Made::Created(created)) => {
                    p.failpoint("after_create")?;
                    let mut actions = vec![created.action.id];
                    actions.extend(created.next_actions.iter().map(|a| a.id));
                    let server = created.server;
                    return self
                        .record_server(
                            &server,
                            actions,
                            format!("created server {} in {location}", server.id),
                        )
                        .await;
                }
                Ok(Made::Found(server)) => {
                    return self
                        .adopt(server, "create failed but the server exists: adopted")
                        .await;
                }
                Err(e) => match e.class() {
                    ErrorClass::Adopt => {
                        // Never create again under this name: take over the one that exists.
                        let q = ServerQuery {
                            label_selector: None,
                            name: Some(name.clone()),
                        };
                        let found = h.list_servers(&q).await.map_err(|e| {
                            hetzner_stop("vm_created", "look up the server by name", &e)
                        })?;
                        return match found.into_iter().next() {
                            Some(server) => {
                                self.adopt(
                                    server,
                                    "name already taken: adopted the existing server",
                                )
                                .await
                            }
                            None => Err(Stop::Retry {
                                error: format!(
                                    "create said the name is taken but no server has it: {e}"
                                ),
                                step: "vm_created",
                            }),
                        };
                    }
                    ErrorClass::Relocate => {
                        tracing::warn!(location, error = %e, "no capacity; trying the next location");
                        no_capacity.push(location.clone());
                    }
                    _ => return Err(hetzner_stop("vm_created", "create the server", &e)),
                },
            }
        }
        Err(Stop::Retry {
            error: format!(
                "no capacity for {} in {}",
                s.server_type,
                no_capacity.join(", ")
            ),
            step: "vm_created",
        })
    }

    /// Mints the job's key. A mint is never repeated blindly: before minting again — on a
    /// resumed attempt (a crash or error may have come between an earlier mint and its
    /// checkpoint) and after a mint whose outcome is unknown (timeout, 5xx) — every valid key
    /// carrying the job's description is revoked. Transient failures are retried within the
    /// step's budget.
    async fn mint_key(&self, resumed: bool) -> Result<AuthKey, Stop> {
        let t = &self.p.inner.tailscale;
        let s = &self.p.inner.settings;
        let description = key_description(self.job.id);
        let request = CreateKey::single_use(description.clone(), s.key_expiry, s.tags.clone());
        let recorded = self.job.tailscale_key_id.clone();
        let clean_first = AtomicBool::new(resumed);
        let (description, request, recorded, clean_first) =
            (&description, &request, &recorded, &clean_first);
        let once = move || async move {
            if clean_first.load(Ordering::SeqCst) {
                revoke_job_keys(t, description, recorded.as_deref())
                    .await
                    .map_err(|error| MintFailure {
                        what: "revoke the job's earlier keys",
                        error,
                    })?;
            }
            // From here on a failure may have minted a key.
            clean_first.store(true, Ordering::SeqCst);
            t.create_auth_key(request)
                .await
                .map_err(|error| MintFailure {
                    what: "create the auth key",
                    error,
                })
        };
        retry(
            &step_policy(t.retry_policy()),
            Some(self.deadline),
            "mint the auth key",
            once,
            |f: &MintFailure| {
                if f.error.is_retryable() {
                    Verdict::Backoff
                } else {
                    Verdict::Stop
                }
            },
        )
        .await
        .map_err(|f| tailscale_stop("key_minted", f.what, &f.error))
    }

    /// One create, resolved if its outcome is unclear: after a transient failure (a timeout, a
    /// 5xx — the API may have acted before the answer was lost) the job's server is looked up
    /// by label before creating again, within the step's budget. Errors that are a verdict
    /// (`uniqueness_error`, no capacity, invalid input) are returned at once.
    async fn create_or_find(&self, request: &CreateServerRequest) -> Result<Made, HetznerError> {
        let h = &self.p.inner.hetzner;
        let job_id = self.job.id;
        let once = move || async move {
            match h.create_server(request).await {
                Ok(created) => Ok(Made::Created(Box::new(created))),
                Err(e) if e.class() == ErrorClass::Retryable => {
                    match find_job_server(h, job_id).await {
                        Ok(Some(server)) => Ok(Made::Found(server)),
                        // Not there (or the lookup failed too): the create may be repeated.
                        _ => Err(e),
                    }
                }
                Err(e) => Err(e),
            }
        };
        retry(
            &step_policy(h.retry_policy()),
            Some(self.deadline),
            "create the server",
            once,
            |e: &HetznerError| {
                if e.class() == ErrorClass::Retryable {
                    Verdict::Backoff
                } else {
                    Verdict::Stop
                }
            },
        )
        .await
    }

    async fn find_server(&self) -> Result<Option<Server>, Stop> {
        find_job_server(&self.p.inner.hetzner, self.job.id)
            .await
            .map_err(|e| hetzner_stop("vm_created", "look up the job's server", &e))
    }

    async fn adopt(&mut self, server: Server, why: &str) -> Result<(), Stop> {
        self.record_server(&server, Vec::new(), format!("{why}: server {}", server.id))
            .await
    }

    /// The `vm_created` checkpoint, written the moment the server's id is known.
    async fn record_server(
        &mut self,
        server: &Server,
        actions: Vec<i64>,
        message: String,
    ) -> Result<(), Stop> {
        let ip = server.ipv4().map(str::to_owned);
        let location = server.location_name().map(str::to_owned);
        self.checkpoint(
            "vm_created",
            message,
            json!({ "server_id": server.id, "server_ip": ip, "location": location, "actions": actions }),
            StepFields {
                server_name: Some(server_name(self.job.id)),
                server_id: Some(Some(server.id)),
                server_ip: Some(ip),
                location: Some(location),
                pending_action_ids: Some(actions),
                ..StepFields::default()
            },
        )
        .await
    }

    /// Devices left by an earlier server of this job would be mistaken for the new one.
    async fn delete_stale_devices(&self, name: &str) -> Result<(), Stop> {
        let t = &self.p.inner.tailscale;
        let filter = DeviceFilter {
            hostname: Some(name.to_owned()),
            tags: Vec::new(),
        };
        let stale = t
            .list_devices(&filter)
            .await
            .map_err(|e| tailscale_stop("key_minted", "list stale devices", &e))?;
        for d in stale {
            t.delete_device(&d.node_id)
                .await
                .map_err(|e| tailscale_stop("key_minted", "delete a stale device", &e))?;
        }
        Ok(())
    }

    /// `vm_running`: the create and start actions finished and the server runs; a server left
    /// `off` is powered on (twice at most).
    async fn vm_running(&mut self) -> Result<(), Stop> {
        let p = self.p;
        let h = &p.inner.hetzner;
        let Some(id) = self.job.server_id else {
            return Err(Stop::Retry {
                error: "no server recorded".into(),
                step: "vm_running",
            });
        };
        let mut pending = self.job.pending_action_ids.clone();
        let mut failed_actions = Vec::new();
        let mut power_ons = 0;
        loop {
            let waits = pending.iter().map(|a| p.inner.actions.wait(*a));
            let done = self
                .wait("vm_running", futures::future::join_all(waits))
                .await?;
            for a in done {
                if let Some(err) = a.error {
                    tracing::warn!(action = a.id, command = %a.command, code = %err.code, "action failed");
                    failed_actions.push(format!("{} ({})", a.command, err.code));
                }
            }
            self.check("vm_running")?;
            let server = h
                .get_server(id)
                .await
                .map_err(|e| hetzner_stop("vm_running", "get the server", &e))?;
            let Some(server) = server else {
                // Gone (deleted behind our back): forget it, so the next attempt creates anew.
                self.checkpoint(
                    "key_minted",
                    format!("server {id} disappeared"),
                    json!({ "server_id": id }),
                    StepFields {
                        server_id: Some(None),
                        server_ip: Some(None),
                        pending_action_ids: Some(Vec::new()),
                        ..StepFields::default()
                    },
                )
                .await?;
                return Err(Stop::Retry {
                    error: format!("server {id} disappeared"),
                    step: "vm_running",
                });
            };
            match server.status {
                ServerStatus::Running => {
                    let ip = server
                        .ipv4()
                        .map(str::to_owned)
                        .or(self.job.server_ip.clone());
                    return self
                        .checkpoint(
                            "vm_running",
                            format!("server {id} is running"),
                            json!({ "server_id": id, "failed_actions": failed_actions }),
                            StepFields {
                                server_ip: Some(ip),
                                pending_action_ids: Some(Vec::new()),
                                ..StepFields::default()
                            },
                        )
                        .await;
                }
                ServerStatus::Off if power_ons < 2 => {
                    power_ons += 1;
                    tracing::warn!(server.id = id, "server is off; powering it on");
                    let action = h
                        .power_on(id)
                        .await
                        .map_err(|e| hetzner_stop("vm_running", "power the server on", &e))?;
                    pending = vec![action.id];
                }
                ServerStatus::Off => {
                    return Err(Stop::Fatal {
                        error: format!(
                            "server {id} stays off after {power_ons} power-ons ({})",
                            failed_actions.join(", ")
                        ),
                        step: "vm_running",
                    });
                }
                ServerStatus::Initializing | ServerStatus::Starting => {
                    pending = Vec::new();
                    self.wait("vm_running", tokio::time::sleep(Duration::from_secs(1)))
                        .await?;
                }
                other => {
                    return Err(Stop::Retry {
                        error: format!("server {id} is {other:?}"),
                        step: "vm_running",
                    });
                }
            }
        }
    }

    /// `network_configured`: the device joined; record it.
    async fn network(&mut self) -> Result<(), Stop> {
        let p = self.p;
        let name = server_name(self.job.id);
        self.check("network_configured")?;
        let device = self
            .wait(
                "network_configured",
                p.inner.devices.wait(&name, &p.inner.settings.tags),
            )
            .await?;
        let ip = device.ipv4_100().map(|a| a.to_string());
        self.checkpoint(
            "network_configured",
            format!(
                "{name} joined the tailnet as {}",
                ip.as_deref().unwrap_or("?")
            ),
            json!({ "device_id": device.node_id, "tailscale_ip": ip }),
            StepFields {
                device_id: Some(Some(device.node_id.clone())),
                tailscale_ip: Some(ip),
                ..StepFields::default()
            },
        )
        .await?;
        Ok(())
    }
}

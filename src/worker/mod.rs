//! The claim loop: takes jobs from the queue, runs a [`JobHandler`] on each, keeps their leases
//! alive, and finishes them.
//!
//! - Claims in batches when slots are free; wakes on NOTIFY, on a polling backstop, and when a
//!   slot frees up while it was full.
//! - One heartbeat statement per interval extends every lease this process holds. A lease that
//!   was not extended, or whose local deadline passed while the database was unreachable, is
//!   lost: its job's stop token fires and the handler must not touch the cloud again.
//! - Completions of many jobs are written in one statement (group commit).
//! - On shutdown: stop claiming at once, ask handlers to stop at a checkpoint, wait up to the
//!   grace period, then hand every lease still held back to the queue without spending an
//!   attempt.
//! - A job that fails for good is rolled back by the lease holder, never after the lease is
//!   gone: the fenced `fail` records the decision first and keeps the lease, then the handler's
//!   [`JobHandler::rollback`] runs (the heartbeat keeps renewing the lease), then the fenced
//!   `finish_rollback` makes the job `failed`. A claimed job that is already rolling back (its
//!   previous holder died mid-rollback, or the sweep gave it up) goes straight to the rollback.
//!
//! A panicking handler is caught and counts as a retryable failure of that attempt.

mod listener;

use crate::db::models::{Job, Lease};
use crate::queue::{FailOutcome, Failure, Queue, QueueError};
use crate::secret::Secret;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// What a handler reports when it returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the worker marks the job `running` (batched with other completions).
    Complete,
    /// Done, and the handler already wrote the job's final state in its own fenced transaction.
    Finished,
    /// This attempt failed; retry after backoff while retries remain.
    Retry { error: String, step: Option<String> },
    /// Failed for good.
    Fail { error: String, step: Option<String> },
    /// Stopped at a checkpoint because its stop token fired.
    Interrupted,
    /// A fenced write reported the lease lost.
    LeaseLost,
}

/// Everything a handler gets for one attempt.
pub struct JobContext {
    pub job: Job,
    pub lease: Lease,
    pub queue: Queue,
    /// Fires when the process is stopping or the lease was lost. A handler checks it between
    /// steps and returns [`Outcome::Interrupted`] instead of starting the next external call.
    pub stop: CancellationToken,
}

impl JobContext {
    /// A fenced checkpoint with its event row.
    pub async fn checkpoint(
        &self,
        step: &str,
        message: &str,
        data: serde_json::Value,
    ) -> Result<(), QueueError> {
        self.queue
            .checkpoint(&self.lease, step, message, data)
            .await
    }
}

/// How a rollback ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackOutcome {
    /// Finished; `complete` is false when something was left for the reaper.
    Done { complete: bool },
    /// Stopped before an external call because the stop token fired or the lease could not be
    /// confirmed. The rollback decision stays recorded; whoever holds the job next resumes it.
    Interrupted,
    /// A lease check said the job has another owner: nothing more was touched.
    LeaseLost,
}

pub trait JobHandler: Send + Sync + 'static {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome>;

    /// Undoes what `run` made outside the database, for a job that failed for good. Called with
    /// the lease held and renewed, and with `ctx.job` as the row is now (checkpoints included).
    /// It must be idempotent (it may be resumed after a crash) and confirm the lease
    /// ([`Queue::confirm_lease`]) before every irreversible external call. The default has
    /// nothing to undo.
    fn rollback(&self, _ctx: JobContext) -> BoxFuture<'static, RollbackOutcome> {
        futures::future::ready(RollbackOutcome::Done { complete: true }).boxed()
    }
}

/// Completes each job after `hold`, touching nothing outside the database. For tests and
/// benchmarks of the queue itself.
pub struct NoopHandler {
    pub hold: Duration,
}

impl JobHandler for NoopHandler {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        let hold = self.hold;
        async move {
            if hold.is_zero() {
                return Outcome::Complete;
            }
            tokio::select! {
                _ = tokio::time::sleep(hold) => Outcome::Complete,
                _ = ctx.stop.cancelled() => Outcome::Interrupted,
            }
        }
        .boxed()
    }
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Written to `lease_owner`: which process holds a job.
    pub owner: String,
    pub concurrency: usize,
    pub claim_batch: usize,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    pub shutdown_grace: Duration,
}

impl WorkerSettings {
    pub fn from_config(c: &crate::config::WorkerConfig) -> Self {
        WorkerSettings {
            owner: default_owner(),
            concurrency: c.concurrency,
            claim_batch: c.claim_batch,
            poll_interval: c.poll_interval,
            heartbeat_interval: c.heartbeat_interval,
            shutdown_grace: c.shutdown_grace,
        }
    }
}

/// `host:pid:random`, unique per process even when two share a host.
pub fn default_owner() -> String {
    // /proc/sys is hidden under systemd's ProcSubset=pid; /etc/hostname is still readable.
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let tag = &Uuid::new_v4().simple().to_string()[..6];
    format!("{host}:{}:{tag}", std::process::id())
}

/// What a worker did before it stopped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    pub claimed: u64,
    pub handed_back: u64,
}

struct Held {
    lease: Lease,
    stop: CancellationToken,
    /// When the lease runs out if no heartbeat succeeds before then.
    expires: Instant,
}

type HeldMap = Arc<Mutex<HashMap<Uuid, Held>>>;

pub struct Worker {
    queue: Queue,
    handler: Arc<dyn JobHandler>,
    settings: WorkerSettings,
    database_url: Secret,
}

impl Worker {
    pub fn new(
        queue: Queue,
        handler: Arc<dyn JobHandler>,
        settings: WorkerSettings,
        database_url: Secret,
    ) -> Self {
        Worker {
            queue,
            handler,
            settings,
            database_url,
        }
    }

    /// Runs until `shutdown` fires, then drains as described in the module docs.
    pub async fn run(self, shutdown: CancellationToken) -> WorkerReport {
        let Worker {
            queue,
            handler,
            settings,
            database_url,
        } = self;
        let held: HeldMap = Arc::default();
        let wake = Arc::new(Notify::new());
        // Background tasks stop with `background`, which outlives the drain below.
        let background = CancellationToken::new();
        let listener = tokio::spawn(listener::listen(
            database_url,
            wake.clone(),
            background.clone(),
        ));
        let heartbeat = tokio::spawn(heartbeat(
            queue.clone(),
            held.clone(),
            settings.heartbeat_interval,
            background.clone(),
        ));
        let (complete_tx, complete_rx) = mpsc::channel(4096);
        let completer = tokio::spawn(completer(queue.clone(), complete_rx));

        let mut report = WorkerReport::default();
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut claim_errors = 0u32;
        while !shutdown.is_cancelled() {
            crate::metrics::worker_claim_loop_ran();
            while tasks.try_join_next().is_some() {}
            let free = settings.concurrency.saturating_sub(tasks.len());
            if free > 0 {
                let want = free.min(settings.claim_batch);
                match queue.claim(&settings.owner, want).await {
                    Ok(jobs) => {
                        claim_errors = 0;
                        let got = jobs.len();
                        report.claimed += got as u64;
                        for job in jobs {
                            spawn_job(
                                &mut tasks,
                                job,
                                &queue,
                                &handler,
                                &held,
                                &complete_tx,
                                settings.heartbeat_interval,
                            );
                        }
                        if got == want {
                            continue; // likely more waiting
                        }
                    }
                    Err(e) => {
                        claim_errors += 1;
                        let pause = Duration::from_millis(100 * 2u64.pow(claim_errors.min(6)));
                        tracing::warn!(error = %e, "claim failed; retrying in {pause:?}");
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = shutdown.cancelled() => {}
                        }
                        continue;
                    }
                }
            }
            let full = tasks.len() >= settings.concurrency;
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(settings.poll_interval) => {}
                _ = tasks.join_next(), if full => {}
                _ = shutdown.cancelled() => {}
            }
        }

        // Drain: no more claims. Ask every running job to stop at its next checkpoint.
        let stopping: Vec<CancellationToken> =
            lock(&held).values().map(|h| h.stop.clone()).collect();
        tracing::info!(
            jobs = stopping.len(),
            "stopping: handing jobs back after their next checkpoint"
        );
        for s in stopping {
            s.cancel();
        }
        let drained = tokio::time::timeout(settings.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("jobs still running after the grace period; aborting them");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let leftover: Vec<Lease> = lock(&held).drain().map(|(_, h)| h.lease).collect();
        if !leftover.is_empty() {
            match queue.hand_back(&leftover).await {
                Ok(res) => report.handed_back = res.iter().filter(|ok| **ok).count() as u64,
                // Not fatal: the leases expire and the sweep retries the jobs.
                Err(e) => tracing::error!(error = %e, "could not hand leases back"),
            }
        }
        background.cancel();
        drop(complete_tx);
        let _ = tokio::join!(listener, heartbeat, completer);
        tracing::info!(
            claimed = report.claimed,
            handed_back = report.handed_back,
            "worker stopped"
        );
        report
    }
}

fn lock(held: &HeldMap) -> std::sync::MutexGuard<'_, HashMap<Uuid, Held>> {
    // A panic while holding this lock cannot leave the map inconsistent (single inserts and
    // removes), so a poisoned lock is still usable.
    held.lock().unwrap_or_else(|p| p.into_inner())
}

type Completion = (Lease, oneshot::Sender<Result<bool, String>>);

fn spawn_job(
    tasks: &mut JoinSet<()>,
    job: Job,
    queue: &Queue,
    handler: &Arc<dyn JobHandler>,
    held: &HeldMap,
    complete_tx: &mpsc::Sender<Completion>,
    heartbeat_interval: Duration,
) {
    let Some(lease) = job.lease() else {
        tracing::error!(job.id = %job.id, "claimed job has no lease token");
        return;
    };
    // From when the job became claimable (enqueued, or its backoff ended) to its claim.
    if let Some(claimed) = job.claimed_at {
        let ready = job.created_at.max(job.run_after);
        crate::metrics::job_claimed((claimed - ready).to_std().unwrap_or_default());
    }
    let stop = CancellationToken::new();
    let ttl = queue.settings().lease_ttl;
    lock(held).insert(
        job.id,
        Held {
            lease,
            stop: stop.clone(),
            // Be conservative: count from now, minus one heartbeat of slack.
            expires: Instant::now() + ttl.saturating_sub(heartbeat_interval),
        },
    );
    let span = tracing::info_span!("job", job.id = %job.id, attempt = job.retry_count + 1);
    let (queue, handler, held, complete_tx) = (
        queue.clone(),
        handler.clone(),
        held.clone(),
        complete_tx.clone(),
    );
    tasks.spawn(
        async move {
            let ctx = |job| JobContext {
                job,
                lease,
                queue: queue.clone(),
                stop: stop.clone(),
            };
            let to_roll_back = if job.rolling_back() {
                tracing::warn!("job is rolling back: resuming its rollback");
                Some(job)
            } else {
                let outcome = AssertUnwindSafe(handler.run(ctx(job)))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| Outcome::Retry {
                        error: "handler panicked".into(),
                        step: None,
                    });
                finish(&queue, &held, &complete_tx, lease, &stop, outcome).await
            };
            if let Some(job) = to_roll_back {
                roll_back(&queue, &held, lease, &stop, handler.rollback(ctx(job))).await;
            }
        }
        .instrument(span),
    );
}

/// Runs a rollback while the lease is held, then ends the job with the fenced final write.
async fn roll_back(
    queue: &Queue,
    held: &HeldMap,
    lease: Lease,
    stop: &CancellationToken,
    rollback: BoxFuture<'static, RollbackOutcome>,
) {
    // A panicking rollback would panic again on every resume: count it as incomplete and leave
    // the rest to the reaper.
    let outcome = AssertUnwindSafe(rollback)
        .catch_unwind()
        .await
        .unwrap_or(RollbackOutcome::Done { complete: false });
    let still_held = lock(held).contains_key(&lease.job_id);
    match outcome {
        RollbackOutcome::Done { complete } => {
            crate::metrics::rollback(if complete {
                "complete"
            } else {
                "left_to_reaper"
            });
            let note = if complete {
                "rolled back"
            } else {
                "rollback incomplete: the reaper deletes what is left"
            };
            match queue.finish_rollback(&lease, note).await {
                Ok(()) => tracing::info!(complete, "rolled back; job failed"),
                Err(QueueError::LeaseLost(_)) => {
                    tracing::warn!("lease lost before the rollback's final write")
                }
                // The lease expires, the sweep requeues the job and its next holder finishes
                // the (idempotent) rollback.
                Err(e) => tracing::error!(error = %e, "could not record the end of the rollback"),
            }
        }
        RollbackOutcome::Interrupted if still_held && stop.is_cancelled() => {
            // Shutting down: handed back with the rollback still recorded; resumed elsewhere.
            tracing::info!("rollback interrupted; lease will be handed back");
            return;
        }
        RollbackOutcome::Interrupted | RollbackOutcome::LeaseLost => {
            tracing::warn!("rollback stopped: lease lost or unconfirmed; left to its next holder");
        }
    }
    lock(held).remove(&lease.job_id);
}

/// Writes the end of an attempt. Returns the job when the attempt failed for good and its
/// rollback is to run now, under the same lease (which then stays in `held`).
async fn finish(
    queue: &Queue,
    held: &HeldMap,
    complete_tx: &mpsc::Sender<Completion>,
    lease: Lease,
    stop: &CancellationToken,
    outcome: Outcome,
) -> Option<Job> {
    let still_held = lock(held).contains_key(&lease.job_id);
    let result: Result<Option<Job>, QueueError> = match outcome {
        Outcome::Interrupted if still_held && stop.is_cancelled() => {
            // Shutting down: the lease stays in `held` and is handed back in one statement.
            tracing::info!("interrupted at a checkpoint; lease will be handed back");
            return None;
        }
        Outcome::LeaseLost | Outcome::Interrupted if !still_held => {
            tracing::warn!("lease lost; job left to its new owner");
            return None;
        }
        Outcome::Complete => {
            let (tx, rx) = oneshot::channel();
            let written = match complete_tx.send((lease, tx)).await {
                Ok(()) => rx.await.unwrap_or_else(|_| Err("completer stopped".into())),
                Err(_) => Err("completer stopped".into()),
            };
            match written {
                Ok(true) => {
                    tracing::info!("completed");
                    Ok(None)
                }
                Ok(false) => Err(QueueError::LeaseLost(lease.job_id)),
                Err(e) => {
                    // The lease will expire and the sweep retries the job; handlers are
                    // idempotent, so that is safe.
                    tracing::error!(error = %e, "could not record completion");
                    Ok(None)
                }
            }
        }
        Outcome::Finished => Ok(None),
        Outcome::Retry { error, step } => {
            report_failure(
                queue,
                &lease,
                Failure {
                    error,
                    step,
                    retryable: true,
                },
            )
            .await
        }
        Outcome::Fail { error, step } => {
            report_failure(
                queue,
                &lease,
                Failure {
                    error,
                    step,
                    retryable: false,
                },
            )
            .await
        }
        Outcome::LeaseLost | Outcome::Interrupted => {
            // Stopped without a reason we know of: count it as a failed attempt.
            report_failure(
                queue,
                &lease,
                Failure {
                    error: "handler stopped without finishing".into(),
                    step: None,
                    retryable: true,
                },
            )
            .await
        }
    };
    match result {
        Ok(Some(job)) => return Some(job),
        Ok(None) => {}
        Err(QueueError::LeaseLost(_)) => tracing::warn!("lease lost before the job's final write"),
        Err(e) => tracing::error!(error = %e, "could not record the job's outcome"),
    }
    lock(held).remove(&lease.job_id);
    None
}

async fn report_failure(
    queue: &Queue,
    lease: &Lease,
    failure: Failure,
) -> Result<Option<Job>, QueueError> {
    match queue.fail(lease, &failure).await? {
        FailOutcome::RetryScheduled { run_after } => {
            tracing::warn!(error = %failure.error, step = ?failure.step, %run_after, "attempt failed; retry scheduled");
            Ok(None)
        }
        FailOutcome::RollingBack(job) => {
            tracing::error!(error = %failure.error, step = ?failure.step, "job failed for good; rolling back");
            Ok(Some(*job))
        }
    }
}

/// Extends all held leases in one statement per interval; fires the stop token of any job whose
/// lease was not extended or has run out locally.
async fn heartbeat(queue: Queue, held: HeldMap, every: Duration, stop: CancellationToken) {
    let ttl = queue.settings().lease_ttl;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let leases: Vec<Lease> = lock(&held).values().map(|h| h.lease).collect();
        if leases.is_empty() {
            continue;
        }
        let sent = Instant::now();
        match queue.extend_leases(&leases).await {
            Ok(kept) => {
                let kept: std::collections::HashSet<Uuid> = kept.into_iter().collect();
                let mut map = lock(&held);
                for lease in &leases {
                    if kept.contains(&lease.job_id) {
                        if let Some(h) = map.get_mut(&lease.job_id) {
                            h.expires = sent + ttl;
                        }
                    } else if let Some(h) = map.remove(&lease.job_id) {
                        crate::metrics::lease_lost();
                        tracing::warn!(job.id = %lease.job_id, "lease lost: stopping the job");
                        h.stop.cancel();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; leases not extended"),
        }
        // Whatever the database said, a lease past its deadline is no longer ours to act on.
        let now = Instant::now();
        lock(&held).retain(|id, h| {
            let alive = h.expires > now;
            if !alive {
                crate::metrics::lease_lost();
                tracing::warn!(job.id = %id, "lease ran out without a heartbeat: stopping the job");
                h.stop.cancel();
            }
            alive
        });
    }
}

/// Writes completions in batches: whatever has queued up while the previous write ran goes
/// into the next statement.
async fn completer(queue: Queue, mut rx: mpsc::Receiver<Completion>) {
    const MAX_BATCH: usize = 512;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let leases: Vec<Lease> = batch.iter().map(|(l, _)| *l).collect();
        let mut result = queue.complete_many(&leases).await;
        for pause in [50, 200, 1000] {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
            result = queue.complete_many(&leases).await;
        }
        match result {
            Ok(done) => {
                for ((_, tx), ok) in batch.into_iter().zip(done) {
                    let _ = tx.send(Ok(ok));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, tx) in batch {
                    let _ = tx.send(Err(msg.clone()));
                }
            }
        }
    }
}

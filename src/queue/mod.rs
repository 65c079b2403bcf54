//! The PostgreSQL job queue: enqueue, claim, lease heartbeat, fenced writes, retry, sweep.
//!
//! Rules this module keeps (DESIGN.md §4):
//! - one statement per operation where possible, and never a transaction held across anything
//!   but the database;
//! - claims use `FOR UPDATE SKIP LOCKED`, so any number of daemons can share one database;
//! - every worker write is fenced by the lease token it got from its claim: zero rows updated
//!   means the lease was lost, reported as [`QueueError::LeaseLost`];
//! - the invariants themselves live in the schema (unique keys, one provisioning job per user,
//!   terminal states never regress); the SQL here is written to not trip them in normal flow.
//!
//! It knows nothing about Hetzner or Tailscale.

use crate::db::models::{Job, JobEvent, Lease};
use crate::db::schema::{job_events, provisioning_jobs};
use crate::db::{DbError, Pool};
use crate::domain::{Executor, JobStatus};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use std::time::Duration;
use tokio::sync::mpsc;
use uuid::Uuid;

/// The channel the database triggers NOTIFY on when a job may have become claimable.
pub const NOTIFY_CHANNEL: &str = "provisiond_jobs";

mod external;
mod instances;

pub use external::{ExternalEnd, StripeEventRecord};
pub use instances::{Fence, StepFields, VmMetadata};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("lease on job {0} lost: the job was reclaimed or finished by someone else")]
    LeaseLost(Uuid),
    #[error("job {0} not found")]
    NotFound(Uuid),
    #[error("job {job} is {from} and cannot become {to}")]
    IllegalTransition {
        job: Uuid,
        from: JobStatus,
        to: JobStatus,
    },
    #[error("agent {agent} belongs to another user")]
    AgentOfAnotherUser { agent: Uuid },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<DieselError> for QueueError {
    fn from(e: DieselError) -> Self {
        QueueError::Db(DbError::Query(e))
    }
}

impl From<diesel_async::pooled_connection::bb8::RunError> for QueueError {
    fn from(e: diesel_async::pooled_connection::bb8::RunError) -> Self {
        QueueError::Db(e.into())
    }
}

/// Timing of leases and retries.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub lease_ttl: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub external_timeout: Duration,
    pub default_max_retries: i32,
}

impl From<&crate::config::QueueConfig> for QueueSettings {
    fn from(c: &crate::config::QueueConfig) -> Self {
        QueueSettings {
            lease_ttl: c.lease_ttl,
            backoff_base: c.backoff_base,
            backoff_cap: c.backoff_cap,
            external_timeout: c.external_timeout,
            default_max_retries: c.max_retries,
        }
    }
}

impl Default for QueueSettings {
    /// The documented defaults of `[queue]`.
    fn default() -> Self {
        (&crate::config::QueueConfig::default()).into()
    }
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub agent_id: Uuid,
    pub user_id: Uuid,
    pub region: String,
    pub stripe_event_id: Option<String>,
    pub business_key: Option<String>,
    pub executor: Executor,
    pub max_retries: Option<i32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    Created(Job),
    /// The event or business key was already enqueued; this is that job.
    Existing(Job),
}

impl Enqueued {
    pub fn job(&self) -> &Job {
        match self {
            Enqueued::Created(j) | Enqueued::Existing(j) => j,
        }
    }

    pub fn into_job(self) -> Job {
        match self {
            Enqueued::Created(j) | Enqueued::Existing(j) => j,
        }
    }

    pub fn created(&self) -> bool {
        matches!(self, Enqueued::Created(_))
    }
}

/// A failed attempt, as the worker reports it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: String,
    pub step: Option<String>,
    /// Retryable failures go back to `queued` with backoff until `max_retries` is spent.
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FailOutcome {
    RetryScheduled { run_after: DateTime<Utc> },
    Failed,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SweepReport {
    /// Jobs put back to `queued` with backoff.
    pub retried: Vec<Uuid>,
    /// Jobs failed for good (retries spent, or a silent external runner).
    pub failed: Vec<Uuid>,
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

#[derive(QueryableByName)]
struct FailRow {
    #[diesel(sql_type = Bool)]
    failed: bool,
    #[diesel(sql_type = Timestamptz)]
    run_after: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct SweptRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Bool)]
    failed: bool,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn millis_i32(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

const ENQUEUE_SQL: &str = "\
WITH agent AS (
    INSERT INTO agents (id, user_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING
)
INSERT INTO provisioning_jobs
    (agent_id, user_id, stripe_event_id, business_key, region, executor, max_retries)
VALUES ($1, $2, $3, $4, $5, $6::job_executor, $7)
ON CONFLICT DO NOTHING
RETURNING *";

// Candidates are taken oldest first, skipping rows other claimers hold and users who already have
// a job provisioning. The advisory lock keeps two concurrent claim statements off the same user;
// DISTINCT ON keeps one statement to one job per user. The partial unique index is still the
// guarantee: a claim that loses a race to it fails with 23505 and is simply run again.
const CLAIM_SQL: &str = "\
WITH candidates AS (
    SELECT j.id, j.user_id, j.created_at
    FROM provisioning_jobs j
    WHERE j.status = 'queued' AND j.executor = 'daemon' AND j.run_after <= now()
      AND NOT EXISTS (SELECT 1 FROM provisioning_jobs p
                      WHERE p.user_id = j.user_id AND p.status = 'provisioning')
      AND pg_try_advisory_xact_lock(7001, hashtext(j.user_id::text))
    ORDER BY j.created_at, j.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), chosen AS (
    SELECT DISTINCT ON (user_id) id FROM candidates ORDER BY user_id, created_at, id
)
UPDATE provisioning_jobs j
SET status = 'provisioning', lease_token = gen_random_uuid(), lease_owner = $2,
    lease_expires_at = now() + $3 * interval '1 millisecond',
    claimed_at = now(), last_heartbeat_at = now(), updated_at = now()
FROM chosen WHERE j.id = chosen.id
RETURNING j.*";

const EXTEND_SQL: &str = "\
UPDATE provisioning_jobs j
SET lease_expires_at = now() + $3 * interval '1 millisecond', last_heartbeat_at = now()
FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
WHERE j.id = l.id AND j.lease_token = l.token AND j.status = 'provisioning'
RETURNING j.id";

const COMPLETE_SQL: &str = "\
UPDATE provisioning_jobs j
SET status = 'running', completed_at = now(), updated_at = now(),
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
    current_step = NULL, error = NULL, failed_step = NULL
FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
WHERE j.id = l.id AND j.lease_token = l.token AND j.status = 'provisioning'
RETURNING j.id";

const HAND_BACK_SQL: &str = "\
UPDATE provisioning_jobs j
SET status = 'queued', run_after = now(), updated_at = now(),
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL
FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
WHERE j.id = l.id AND j.lease_token = l.token AND j.status = 'provisioning'
RETURNING j.id";

// All SET expressions read the row as it was before the update, so `retry_count < max_retries`
// means "a retry is left" throughout.
const FAIL_SQL: &str = "\
WITH decided AS (
    SELECT id, ($3 AND retry_count < max_retries) AS retry
    FROM provisioning_jobs WHERE id = $1 AND lease_token = $2 AND status = 'provisioning'
), upd AS (
UPDATE provisioning_jobs j
SET status = CASE WHEN d.retry THEN 'queued'::job_status ELSE 'failed'::job_status END,
    retry_count = j.retry_count + d.retry::int,
    run_after = CASE WHEN d.retry
                     THEN now() + provisiond_backoff(j.retry_count, $6, $7) ELSE j.run_after END,
    last_error = $4,
    error = CASE WHEN d.retry THEN j.error ELSE $4 END,
    failed_step = CASE WHEN d.retry THEN j.failed_step ELSE coalesce($5, j.current_step) END,
    completed_at = CASE WHEN d.retry THEN NULL ELSE now() END,
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM decided d WHERE j.id = d.id
RETURNING j.id, NOT d.retry AS failed, j.run_after
), instance AS (
    UPDATE agent_instances i SET status = 'failed', updated_at = now()
    FROM upd WHERE i.job_id = upd.id AND upd.failed
)
SELECT failed, run_after FROM upd";

/// `{filter}` narrows the sweep to one job for the status path.
const SWEEP_SQL: &str = "\
WITH stale AS (
    SELECT id FROM provisioning_jobs
    WHERE status = 'provisioning' {filter}
      AND ((executor = 'daemon' AND lease_expires_at < now())
        OR (executor = 'external'
            AND coalesce(last_heartbeat_at, claimed_at, updated_at)
                < now() - $1 * interval '1 millisecond'))
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
), decided AS (
    SELECT j.id, (j.executor = 'daemon' AND j.retry_count < j.max_retries) AS retry,
           CASE WHEN j.executor = 'daemon'
                THEN 'lease expired: worker ' || coalesce(j.lease_owner, '?')
                     || ' stopped renewing it'
                ELSE 'Timeout: No heartbeat for '
                     || floor(extract(epoch FROM now()
                        - coalesce(j.last_heartbeat_at, j.claimed_at, j.updated_at)))::bigint
                     || 's'
           END AS reason
    FROM provisioning_jobs j JOIN stale s ON s.id = j.id
), upd AS (
UPDATE provisioning_jobs j
SET status = CASE WHEN d.retry THEN 'queued'::job_status ELSE 'failed'::job_status END,
    retry_count = j.retry_count + d.retry::int,
    run_after = CASE WHEN d.retry
                     THEN now() + provisiond_backoff(j.retry_count, $2, $3) ELSE j.run_after END,
    last_error = d.reason,
    error = CASE WHEN d.retry THEN j.error ELSE d.reason END,
    failed_step = CASE WHEN d.retry THEN j.failed_step
                       ELSE coalesce(j.current_step, 'provisioning') END,
    completed_at = CASE WHEN d.retry THEN NULL ELSE now() END,
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM decided d WHERE j.id = d.id
RETURNING j.id, NOT d.retry AS failed
), instance AS (
    UPDATE agent_instances i SET status = 'failed', updated_at = now()
    FROM upd WHERE i.job_id = upd.id AND upd.failed
)
SELECT id, failed FROM upd";

/// Announces, after commit, that jobs may have become claimable: one `pg_notify` for any number
/// of pokes that arrive while the previous one is being sent.
///
/// Why not NOTIFY inside each writing transaction: PostgreSQL serialises the commits of
/// notifying transactions, fsync included, which capped enqueues at a few hundred per second.
/// Sending after commit also means a woken worker always finds the row. If the process dies
/// between commit and notify, the claim loop's polling backstop still finds the job.
#[derive(Clone)]
struct Notifier {
    tx: mpsc::Sender<()>,
}

impl Notifier {
    fn spawn(pool: Pool) -> Notifier {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                let sent = async {
                    let mut conn = pool.get().await.map_err(DbError::from)?;
                    diesel::sql_query(format!("SELECT pg_notify('{NOTIFY_CHANNEL}', 'poke')"))
                        .execute(&mut conn)
                        .await
                        .map_err(DbError::from)
                }
                .await;
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "notify failed; workers will poll");
                }
            }
        });
        Notifier { tx }
    }

    fn poke(&self) {
        // A full channel means a NOTIFY is already pending, which covers this write too.
        let _ = self.tx.try_send(());
    }
}

/// The queue over a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    pool: Pool,
    settings: QueueSettings,
    notifier: Notifier,
}

impl Queue {
    /// Must be called inside a tokio runtime (it starts the notifier task, which ends when the
    /// last clone of this queue is dropped).
    pub fn new(pool: Pool, settings: QueueSettings) -> Self {
        Queue {
            notifier: Notifier::spawn(pool.clone()),
            pool,
            settings,
        }
    }

    /// Wakes workers on every daemon sharing the database (after our own commit).
    pub fn notify_workers(&self) {
        self.notifier.poke();
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// Inserts a job, or returns the job already enqueued for the same Stripe event or business
    /// key. The insert's trigger NOTIFYs workers in the same transaction.
    pub async fn enqueue(&self, new: &NewJob) -> Result<Enqueued, QueueError> {
        let mut conn = self.pool.get().await?;
        let max_retries = new.max_retries.unwrap_or(self.settings.default_max_retries);
        // Two rounds at most: if a conflicting insert rolled back between our two statements,
        // the second insert goes through.
        for _ in 0..3 {
            let inserted: Result<Vec<Job>, DieselError> = diesel::sql_query(ENQUEUE_SQL)
                .bind::<diesel::sql_types::Uuid, _>(new.agent_id)
                .bind::<diesel::sql_types::Uuid, _>(new.user_id)
                .bind::<Nullable<Text>, _>(new.stripe_event_id.as_deref())
                .bind::<Nullable<Text>, _>(new.business_key.as_deref())
                .bind::<Text, _>(&new.region)
                .bind::<Text, _>(new.executor.as_str())
                .bind::<Integer, _>(max_retries)
                .load(&mut conn)
                .await;
            match inserted {
                Ok(mut rows) if !rows.is_empty() => {
                    self.notifier.poke();
                    return Ok(Enqueued::Created(rows.remove(0)));
                }
                Ok(_) => {}
                Err(DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)) => {
                    return Err(QueueError::AgentOfAnotherUser {
                        agent: new.agent_id,
                    });
                }
                Err(e) => return Err(e.into()),
            }
            // ON CONFLICT DO NOTHING waited for the conflicting insert to commit, so this new
            // statement (a new snapshot) sees it.
            let mut q = provisioning_jobs::table.into_boxed();
            q = match (&new.stripe_event_id, &new.business_key) {
                (Some(e), Some(k)) => q.filter(
                    provisioning_jobs::stripe_event_id
                        .eq(e)
                        .or(provisioning_jobs::business_key.eq(k)),
                ),
                (Some(e), None) => q.filter(provisioning_jobs::stripe_event_id.eq(e)),
                (None, Some(k)) => q.filter(provisioning_jobs::business_key.eq(k)),
                (None, None) => continue,
            };
            let existing: Option<Job> = q
                .order(provisioning_jobs::created_at)
                .select(Job::as_select())
                .first(&mut conn)
                .await
                .optional()?;
            if let Some(job) = existing {
                return Ok(Enqueued::Existing(job));
            }
        }
        Err(DbError::Query(DieselError::NotFound).into())
    }

    /// Claims up to `limit` claimable daemon jobs for `owner`, in one statement.
    pub async fn claim(&self, owner: &str, limit: usize) -> Result<Vec<Job>, QueueError> {
        let mut conn = self.pool.get().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut attempt = 0;
        loop {
            let result: Result<Vec<Job>, DieselError> = diesel::sql_query(CLAIM_SQL)
                .bind::<BigInt, _>(limit)
                .bind::<Text, _>(owner)
                .bind::<BigInt, _>(millis(self.settings.lease_ttl))
                .load(&mut conn)
                .await;
            match result {
                // Lost a race for a user's single provisioning slot to another claimer whose
                // commit our snapshot did not see. The next statement sees it.
                Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _))
                    if attempt < 5 =>
                {
                    attempt += 1;
                }
                other => return Ok(other?),
            }
        }
    }

    /// Extends the leases of every job a process holds, in one statement, and writes the seed's
    /// `last_heartbeat_at`. Returns the ids still held; the rest were lost.
    pub async fn extend_leases(&self, leases: &[Lease]) -> Result<Vec<Uuid>, QueueError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = split(leases);
        let mut conn = self.pool.get().await?;
        let rows: Vec<IdRow> = diesel::sql_query(EXTEND_SQL)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .bind::<Array<diesel::sql_types::Uuid>, _>(tokens)
            .bind::<BigInt, _>(millis(self.settings.lease_ttl))
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Marks one job `running`. Fenced.
    pub async fn complete(&self, lease: &Lease) -> Result<(), QueueError> {
        match self.complete_many(std::slice::from_ref(lease)).await?[..] {
            [true] => Ok(()),
            _ => Err(QueueError::LeaseLost(lease.job_id)),
        }
    }

    /// Marks many jobs `running` in one statement. Fenced per job: the result says, in order,
    /// which leases were still held.
    pub async fn complete_many(&self, leases: &[Lease]) -> Result<Vec<bool>, QueueError> {
        self.fenced_batch(COMPLETE_SQL, leases).await
    }

    /// Puts jobs back to `queued` without spending an attempt (graceful shutdown).
    pub async fn hand_back(&self, leases: &[Lease]) -> Result<Vec<bool>, QueueError> {
        self.fenced_batch(HAND_BACK_SQL, leases).await
    }

    async fn fenced_batch(&self, sql: &str, leases: &[Lease]) -> Result<Vec<bool>, QueueError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = split(leases);
        let mut conn = self.pool.get().await?;
        let rows: Vec<IdRow> = diesel::sql_query(sql)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .bind::<Array<diesel::sql_types::Uuid>, _>(tokens)
            .load(&mut conn)
            .await?;
        if !rows.is_empty() {
            // A handed-back job is claimable; a finished one may free its user's next purchase.
            self.notifier.poke();
        }
        let done: std::collections::HashSet<Uuid> = rows.into_iter().map(|r| r.id).collect();
        Ok(leases.iter().map(|l| done.contains(&l.job_id)).collect())
    }

    /// Ends an attempt that failed: back to `queued` with backoff while retries remain and the
    /// failure is retryable, else `failed` with `error` and `failed_step`. Fenced.
    pub async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, QueueError> {
        let mut conn = self.pool.get().await?;
        let rows: Vec<FailRow> = diesel::sql_query(FAIL_SQL)
            .bind::<diesel::sql_types::Uuid, _>(lease.job_id)
            .bind::<diesel::sql_types::Uuid, _>(lease.token)
            .bind::<Bool, _>(failure.retryable)
            .bind::<Text, _>(&failure.error)
            .bind::<Nullable<Text>, _>(failure.step.as_deref())
            .bind::<Integer, _>(millis_i32(self.settings.backoff_base))
            .bind::<Integer, _>(millis_i32(self.settings.backoff_cap))
            .load(&mut conn)
            .await?;
        if !rows.is_empty() {
            self.notifier.poke();
        }
        match rows.into_iter().next() {
            None => Err(QueueError::LeaseLost(lease.job_id)),
            Some(FailRow { failed: true, .. }) => Ok(FailOutcome::Failed),
            Some(FailRow { run_after, .. }) => Ok(FailOutcome::RetryScheduled { run_after }),
        }
    }

    /// Records that a job reached `step`: the job's and its instance's `current_step`, and an
    /// event row, in one transaction. Fenced. (`checkpoint_step` also records step results.)
    pub async fn checkpoint(
        &self,
        lease: &Lease,
        step: &str,
        message: &str,
        data: serde_json::Value,
    ) -> Result<(), QueueError> {
        self.checkpoint_step(
            lease.job_id,
            Fence::Lease(*lease),
            step,
            message,
            data,
            StepFields::default(),
        )
        .await
        .map(drop)
    }

    /// Retries or fails every job whose lease expired (daemon) or whose runner went silent for
    /// longer than the job timeout (external). Safe to run from any number of daemons at once.
    pub async fn sweep(&self) -> Result<SweepReport, QueueError> {
        self.sweep_where("", None).await
    }

    /// The seed's one-job timeout check, run before a job's status is read. Returns whether the
    /// job was swept.
    pub async fn check_job_timeout(&self, job_id: Uuid) -> Result<bool, QueueError> {
        let report = self.sweep_where("AND id = $4", Some(job_id)).await?;
        Ok(!report.retried.is_empty() || !report.failed.is_empty())
    }

    async fn sweep_where(
        &self,
        filter: &str,
        job_id: Option<Uuid>,
    ) -> Result<SweepReport, QueueError> {
        let sql = SWEEP_SQL.replace("{filter}", filter);
        let mut conn = self.pool.get().await?;
        let query = diesel::sql_query(sql)
            .bind::<BigInt, _>(millis(self.settings.external_timeout))
            .bind::<Integer, _>(millis_i32(self.settings.backoff_base))
            .bind::<Integer, _>(millis_i32(self.settings.backoff_cap));
        let rows: Vec<SweptRow> = match job_id {
            Some(id) => {
                query
                    .bind::<diesel::sql_types::Uuid, _>(id)
                    .load(&mut conn)
                    .await?
            }
            None => query.load(&mut conn).await?,
        };
        if !rows.is_empty() {
            self.notifier.poke();
        }
        let mut report = SweepReport::default();
        for row in rows {
            if row.failed {
                report.failed.push(row.id);
            } else {
                report.retried.push(row.id);
            }
        }
        Ok(report)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Job>, QueueError> {
        let mut conn = self.pool.get().await?;
        Ok(provisioning_jobs::table
            .find(id)
            .select(Job::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// The jobs with these ids (missing ones are simply absent).
    pub async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Job>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.pool.get().await?;
        Ok(provisioning_jobs::table
            .filter(provisioning_jobs::id.eq_any(ids))
            .select(Job::as_select())
            .load(&mut conn)
            .await?)
    }

    /// Newest first.
    pub async fn list(
        &self,
        status: Option<JobStatus>,
        limit: i64,
    ) -> Result<Vec<Job>, QueueError> {
        let mut conn = self.pool.get().await?;
        let mut q = provisioning_jobs::table
            .select(Job::as_select())
            .order(provisioning_jobs::created_at.desc())
            .limit(limit)
            .into_boxed();
        if let Some(s) = status {
            q = q.filter(provisioning_jobs::status.eq(crate::db::models::DbJobStatus(s)));
        }
        Ok(q.load(&mut conn).await?)
    }

    pub async fn events(&self, job_id: Uuid) -> Result<Vec<JobEvent>, QueueError> {
        let mut conn = self.pool.get().await?;
        Ok(job_events::table
            .filter(job_events::job_id.eq(job_id))
            .order(job_events::id)
            .select(JobEvent::as_select())
            .load(&mut conn)
            .await?)
    }

    /// Number of jobs in each status (for metrics and `jobs list`).
    pub async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>, QueueError> {
        let mut conn = self.pool.get().await?;
        let rows: Vec<(crate::db::models::DbJobStatus, i64)> = provisioning_jobs::table
            .group_by(provisioning_jobs::status)
            .select((provisioning_jobs::status, diesel::dsl::count_star()))
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|(s, n)| (s.0, n)).collect())
    }

    /// One round trip to the database (health checks).
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.pool.get().await?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await?;
        Ok(())
    }
}

fn split(leases: &[Lease]) -> (Vec<Uuid>, Vec<Uuid>) {
    leases.iter().map(|l| (l.job_id, l.token)).unzip()
}

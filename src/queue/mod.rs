//! The PostgreSQL job queue: enqueue, claim, lease heartbeat, fenced writes, retry, sweep.
//!
//! Rules this module keeps:
//! - one statement per operation where possible, and never a transaction held across anything
//!   but the database;
//! - claims use `FOR UPDATE SKIP LOCKED`, so any number of daemons can share one database;
//! - every worker write is fenced by the lease token it got from its claim, and the fence
//!   (`lease_token = $token AND status = 'provisioning'`) is in the statement that writes, never
//!   only in a CTE: after waiting on a row lock PostgreSQL re-checks only the writing
//!   statement's own quals. Zero rows updated means the lease was lost, reported as
//!   [`QueueError::LeaseLost`];
//! - a job that fails for good is not failed at once: `fail` records the rollback decision and
//!   keeps the lease, the holder cleans up, `finish_rollback` fails it (see `worker`);
//! - the invariants themselves live in the schema (unique keys, one provisioning job per user,
//!   terminal states never regress); the SQL here is written to not trip them in normal flow.
//!
//! It knows nothing about Hetzner or Tailscale.

use crate::db::models::{Job, JobEvent, Lease};
use crate::db::schema::{job_events, provisioning_jobs};
use crate::db::{DatabaseMode, DbError, Pool};
use crate::domain::{Executor, JobStatus};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text};
use diesel_async::RunQueryDsl;
use std::sync::LazyLock;
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
    /// Adopted database: the web app has no such agent (the daemon does not invent one).
    #[error("agent {agent} does not exist")]
    UnknownAgent { agent: Uuid },
    /// Adopted database: the web app has no such user.
    #[error("user {user} does not exist")]
    UnknownUser { user: Uuid },
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
    /// Who owns `agents` and `users` (resolved at startup; see `db::mode`).
    pub mode: DatabaseMode,
}

impl From<&crate::config::QueueConfig> for QueueSettings {
    fn from(c: &crate::config::QueueConfig) -> Self {
        QueueSettings {
            lease_ttl: c.lease_ttl,
            backoff_base: c.backoff_base,
            backoff_cap: c.backoff_cap,
            external_timeout: c.external_timeout,
            default_max_retries: c.max_retries,
            mode: DatabaseMode::Standalone,
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
    RetryScheduled {
        run_after: DateTime<Utc>,
    },
    /// No retry: the decision to roll back is recorded and the lease is still held (renewed).
    /// The holder cleans up, then ends the job with [`Queue::finish_rollback`]. The row is the
    /// job as it is now, checkpoints included.
    RollingBack(Box<Job>),
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SweepReport {
    /// Jobs put back to `queued` with backoff.
    pub retried: Vec<Uuid>,
    /// Jobs failed for good (a silent external runner, or a rollback resumed too often).
    pub failed: Vec<Uuid>,
    /// Daemon jobs with no retry left, or whose rollback's holder died: requeued for the next
    /// claimer to roll back and fail.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rolling_back: Vec<Uuid>,
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

#[derive(QueryableByName)]
struct SweptRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    outcome: String,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn millis_i32(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

// Standalone: the daemon's own `agents` table, whose row for a new agent it creates here.
const ENQUEUE_SQL: &str = "\
WITH agent AS (
    INSERT INTO agents (id, user_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING
)
INSERT INTO provisioning_jobs
    (agent_id, user_id, stripe_event_id, business_key, region, executor, max_retries)
VALUES ($1, $2, $3, $4, $5, $6::job_executor, $7)
ON CONFLICT DO NOTHING
RETURNING *";

// Adopted: `agents` is the web app's (its `name` is NOT NULL, which PostgreSQL checks before
// ON CONFLICT, so even a no-op insert of an existing agent fails). The order was checked against
// it first (`ORDER_CHECK_SQL`); the foreign key still guards a race with a delete.
const ENQUEUE_ADOPTED_SQL: &str = "\
INSERT INTO provisioning_jobs
    (agent_id, user_id, stripe_event_id, business_key, region, executor, max_retries)
VALUES ($1, $2, $3, $4, $5, $6::job_executor, $7)
ON CONFLICT DO NOTHING
RETURNING *";

// Whether the order names an agent of that user, in the web app's tables. `{user}` is the user
// check, or `true` when there is no `users` table to check against.
const ORDER_CHECK_SQL: &str = "\
SELECT (SELECT user_id FROM agents WHERE id = $1) AS agent_user, {user} AS user_exists";

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
  AND j.rollback_started_at IS NULL
RETURNING j.id";

const HAND_BACK_SQL: &str = "\
UPDATE provisioning_jobs j
SET status = 'queued', run_after = now(), updated_at = now(),
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL
FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)
WHERE j.id = l.id AND j.lease_token = l.token AND j.status = 'provisioning'
RETURNING j.id";

// One fenced statement ends an attempt. Every decision is taken from the row being updated, and
// the fence is in this UPDATE's own WHERE: after waiting on a row lock (another worker's claim),
// PostgreSQL re-checks only these quals against the newest row version, so a stale worker's
// write finds 0 rows. (A token checked in a CTE would be checked against the old snapshot.)
// SET expressions read the row as it was before the update, so `retry_count < max_retries`
// means "a retry is left" throughout.
//
// A retry puts the job back to `queued` with backoff. Anything else does not fail the job yet:
// it records the decision to roll back (status stays `provisioning`, the lease is kept and
// renewed) so that the cleanup is done by the lease holder, and only then
// `FINISH_ROLLBACK_SQL` makes the job `failed`.
static FAIL_SQL: LazyLock<String> = LazyLock::new(|| {
    let retry = "($3 AND j.retry_count < j.max_retries)";
    format!(
        "\
WITH upd AS (
UPDATE provisioning_jobs j
SET status = CASE WHEN {retry} THEN 'queued'::job_status ELSE j.status END,
    retry_count = j.retry_count + {retry}::int,
    run_after = CASE WHEN {retry}
                     THEN now() + provisiond_backoff(j.retry_count, $6, $7) ELSE j.run_after END,
    last_error = $4,
    rollback_started_at = CASE WHEN {retry} THEN j.rollback_started_at
                               ELSE coalesce(j.rollback_started_at, now()) END,
    rollback_error = CASE WHEN {retry} THEN j.rollback_error ELSE $4 END,
    rollback_step = CASE WHEN {retry} THEN j.rollback_step
                         ELSE coalesce($5, j.current_step) END,
    lease_token = CASE WHEN {retry} THEN NULL ELSE j.lease_token END,
    lease_owner = CASE WHEN {retry} THEN NULL ELSE j.lease_owner END,
    lease_expires_at = CASE WHEN {retry} THEN NULL
                            ELSE now() + $8 * interval '1 millisecond' END,
    updated_at = now()
WHERE j.id = $1 AND j.lease_token = $2 AND j.status = 'provisioning'
RETURNING j.*
), event AS (
    -- The status does not change, so the audit trigger is silent: say it here.
    INSERT INTO job_events (job_id, step, message, data)
    SELECT id, rollback_step, 'rolling back',
           jsonb_build_object('error', $4, 'attempt', retry_count + 1)
    FROM upd WHERE status = 'provisioning'
)
SELECT * FROM upd"
    )
});

// The last write of a rollback: the job becomes `failed` with the error and step its rollback
// recorded. Fenced like every worker write; only a job that is rolling back can end this way.
const FINISH_ROLLBACK_SQL: &str = "\
WITH upd AS (
UPDATE provisioning_jobs j
SET status = 'failed', completed_at = now(), updated_at = now(),
    error = coalesce(j.rollback_error, j.last_error, 'rolled back'),
    failed_step = coalesce(j.rollback_step, j.current_step),
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL
WHERE j.id = $1 AND j.lease_token = $2 AND j.status = 'provisioning'
  AND j.rollback_started_at IS NOT NULL
RETURNING j.id, j.failed_step
), event AS (
    INSERT INTO job_events (job_id, step, message)
    SELECT id, failed_step, $3 FROM upd
), instance AS (
    UPDATE agent_instances i SET status = 'failed', updated_at = now()
    FROM upd WHERE i.job_id = upd.id
)
SELECT id FROM upd";

/// How often the sweep requeues a rollback whose holder died before it gives the job up.
pub const MAX_ROLLBACK_RESUMES: i32 = 5;

// The sweep takes back expired leases (daemon) and silent runners (external), deciding from the
// row being updated, with the staleness re-checked in the UPDATE's own WHERE (the CTE only picks
// and locks candidates). A daemon job with a retry left is requeued with backoff. One with no
// retry left is not failed here: it is requeued at once with the rollback decision recorded, so
// the next claimer deletes what it made and then fails it. A job that was already rolling back
// is requeued at once (its servers bill while it waits) without spending a provisioning
// attempt, at most MAX_ROLLBACK_RESUMES times. Only a rollback that ran out of those, and an
// external job, are failed by the sweep (the reaper cleans up after them). `{filter}` narrows
// the sweep to one job for the status path.
static SWEEP_SQL: LazyLock<String> = LazyLock::new(|| {
    let stale = "(j.executor = 'daemon' AND j.lease_expires_at < now())
        OR (j.executor = 'external'
            AND coalesce(j.last_heartbeat_at, j.claimed_at, j.updated_at)
                < now() - $1 * interval '1 millisecond')";
    let daemon = "j.executor = 'daemon'";
    // Exactly one of these holds for a daemon job; an external job is failed.
    let retry =
        format!("({daemon} AND j.rollback_started_at IS NULL AND j.retry_count < j.max_retries)");
    let roll =
        format!("({daemon} AND j.rollback_started_at IS NULL AND j.retry_count >= j.max_retries)");
    let resume = format!(
        "({daemon} AND j.rollback_started_at IS NOT NULL \
         AND j.rollback_resumes < {MAX_ROLLBACK_RESUMES})"
    );
    let requeue = format!("({retry} OR {roll} OR {resume})");
    let reason = "(CASE WHEN j.executor = 'daemon'
                THEN 'lease expired: worker ' || coalesce(j.lease_owner, '?')
                     || ' stopped renewing it'
                ELSE 'Timeout: No heartbeat for '
                     || floor(extract(epoch FROM now()
                        - coalesce(j.last_heartbeat_at, j.claimed_at, j.updated_at)))::bigint
                     || 's'
           END)";
    format!(
        "\
WITH stale AS (
    SELECT j.id FROM provisioning_jobs j
    WHERE j.status = 'provisioning' {{filter}} AND ({stale})
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
), upd AS (
UPDATE provisioning_jobs j
SET status = CASE WHEN {requeue} THEN 'queued'::job_status ELSE 'failed'::job_status END,
    retry_count = j.retry_count + {retry}::int,
    rollback_resumes = j.rollback_resumes + {resume}::int,
    run_after = CASE WHEN {retry} THEN now() + provisiond_backoff(j.retry_count, $2, $3)
                     WHEN {requeue} THEN now()
                     ELSE j.run_after END,
    last_error = {reason},
    rollback_started_at = CASE WHEN {roll} THEN now() ELSE j.rollback_started_at END,
    rollback_error = CASE WHEN {roll} THEN {reason} ELSE j.rollback_error END,
    rollback_step = CASE WHEN {roll} THEN coalesce(j.current_step, 'provisioning')
                         ELSE j.rollback_step END,
    error = CASE WHEN {requeue} THEN j.error ELSE coalesce(j.rollback_error, {reason}) END,
    failed_step = CASE WHEN {requeue} THEN j.failed_step
                       ELSE coalesce(j.rollback_step, j.current_step, 'provisioning') END,
    completed_at = CASE WHEN {requeue} THEN NULL ELSE now() END,
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
FROM stale s WHERE j.id = s.id AND j.status = 'provisioning' AND ({stale})
RETURNING j.id, j.rollback_step, j.rollback_error, j.retry_count, j.last_error,
          CASE WHEN j.status = 'failed' THEN 'failed'
               -- now() is this statement's transaction time: decided by this statement.
               WHEN j.rollback_started_at = now() THEN 'rolling_back'
               WHEN j.rollback_started_at IS NOT NULL THEN 'rollback_resumed'
               ELSE 'retried' END AS outcome
), event AS (
    -- The trigger records the requeue; this says why (other CTEs see the old row: use upd's).
    INSERT INTO job_events (job_id, step, message, data)
    SELECT id, rollback_step,
           CASE outcome WHEN 'rolling_back' THEN 'rolling back'
                        ELSE 'rollback resumed: its worker stopped' END,
           jsonb_build_object('error', rollback_error, 'cause', last_error,
                              'attempt', retry_count + 1)
    FROM upd WHERE outcome IN ('rolling_back', 'rollback_resumed')
), instance AS (
    UPDATE agent_instances i SET status = 'failed', updated_at = now()
    FROM upd WHERE i.job_id = upd.id AND upd.outcome = 'failed'
)
SELECT id, outcome FROM upd"
    )
});

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
        let sql = match self.settings.mode {
            DatabaseMode::Standalone => ENQUEUE_SQL,
            DatabaseMode::Adopted { users_table } => {
                check_order(&mut conn, new, users_table).await?;
                ENQUEUE_ADOPTED_SQL
            }
        };
        // Two rounds at most: if a conflicting insert rolled back between our two statements,
        // the second insert goes through.
        for _ in 0..3 {
            let inserted: Result<Vec<Job>, DieselError> = diesel::sql_query(sql)
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
                    // Adopted: the agent or user went away since the check; say which.
                    if let DatabaseMode::Adopted { users_table } = self.settings.mode {
                        check_order(&mut conn, new, users_table).await?;
                    }
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
    /// failure is retryable; else the job starts rolling back (see [`FailOutcome::RollingBack`]).
    /// Either way the error is kept in `last_error` and in the job's events. Fenced.
    pub async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, QueueError> {
        let mut conn = self.pool.get().await?;
        let rows: Vec<Job> = diesel::sql_query(FAIL_SQL.as_str())
            .bind::<diesel::sql_types::Uuid, _>(lease.job_id)
            .bind::<diesel::sql_types::Uuid, _>(lease.token)
            .bind::<Bool, _>(failure.retryable)
            .bind::<Text, _>(&failure.error)
            .bind::<Nullable<Text>, _>(failure.step.as_deref())
            .bind::<Integer, _>(millis_i32(self.settings.backoff_base))
            .bind::<Integer, _>(millis_i32(self.settings.backoff_cap))
            .bind::<BigInt, _>(millis(self.settings.lease_ttl))
            .load(&mut conn)
            .await?;
        match rows.into_iter().next() {
            None => Err(QueueError::LeaseLost(lease.job_id)),
            Some(job) if job.status() == JobStatus::Queued => {
                self.notifier.poke();
                Ok(FailOutcome::RetryScheduled {
                    run_after: job.run_after,
                })
            }
            Some(job) => Ok(FailOutcome::RollingBack(Box::new(job))),
        }
    }

    /// Ends a rollback: the job becomes `failed` with the error and step recorded when the
    /// rollback was decided; `note` goes into its events (whether everything was deleted).
    /// Fenced: only the holder of the lease of a job that is rolling back can do this.
    pub async fn finish_rollback(&self, lease: &Lease, note: &str) -> Result<(), QueueError> {
        let mut conn = self.pool.get().await?;
        let rows: Vec<IdRow> = diesel::sql_query(FINISH_ROLLBACK_SQL)
            .bind::<diesel::sql_types::Uuid, _>(lease.job_id)
            .bind::<diesel::sql_types::Uuid, _>(lease.token)
            .bind::<Text, _>(note)
            .load(&mut conn)
            .await?;
        if rows.is_empty() {
            return Err(QueueError::LeaseLost(lease.job_id));
        }
        // A failed job may free its user's next purchase.
        self.notifier.poke();
        Ok(())
    }

    /// Renews one lease and says whether it is still held: `true` means nobody else can take
    /// the job for a whole `lease_ttl` from now (the sweep only takes expired leases), which is
    /// what a holder checks before an irreversible external call such as a delete.
    pub async fn confirm_lease(&self, lease: &Lease) -> Result<bool, QueueError> {
        Ok(!self
            .extend_leases(std::slice::from_ref(lease))
            .await?
            .is_empty())
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
        let report = self.sweep_where("AND j.id = $4", Some(job_id)).await?;
        Ok(report != SweepReport::default())
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
            match row.outcome.as_str() {
                "failed" => report.failed.push(row.id),
                "rolling_back" | "rollback_resumed" => report.rolling_back.push(row.id),
                _ => report.retried.push(row.id),
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
        match status {
            // Cancellations are `failed` with `cancelled_at` (older daemons wrote `cancelled`,
            // a label an adopted enum lacks: compared as text, never bound as the enum).
            Some(JobStatus::Cancelled) => {
                q = q.filter(diesel::dsl::sql::<Bool>(
                    "(provisioning_jobs.cancelled_at IS NOT NULL \
                     OR provisioning_jobs.status::text = 'cancelled')",
                ));
            }
            Some(s) => {
                q = q.filter(provisioning_jobs::status.eq(crate::db::models::DbJobStatus(s)));
            }
            None => {}
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

#[derive(QueryableByName)]
struct OrderCheck {
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    agent_user: Option<Uuid>,
    #[diesel(sql_type = Bool)]
    user_exists: bool,
}

/// Adopted database: refuses an order whose user or agent the web app does not have, or whose
/// agent is another user's, before anything is written.
async fn check_order(
    conn: &mut crate::db::PooledConn<'_>,
    new: &NewJob,
    users_table: bool,
) -> Result<(), QueueError> {
    let user = if users_table {
        "EXISTS (SELECT 1 FROM users WHERE id = $2)"
    } else {
        "true"
    };
    let found: OrderCheck = diesel::sql_query(ORDER_CHECK_SQL.replace("{user}", user))
        .bind::<diesel::sql_types::Uuid, _>(new.agent_id)
        .bind::<diesel::sql_types::Uuid, _>(new.user_id)
        .get_result(conn)
        .await?;
    match found {
        OrderCheck {
            user_exists: false, ..
        } => Err(QueueError::UnknownUser { user: new.user_id }),
        OrderCheck {
            agent_user: None, ..
        } => Err(QueueError::UnknownAgent {
            agent: new.agent_id,
        }),
        OrderCheck {
            agent_user: Some(owner),
            ..
        } if owner != new.user_id => Err(QueueError::AgentOfAnotherUser {
            agent: new.agent_id,
        }),
        OrderCheck { .. } => Ok(()),
    }
}

fn split(leases: &[Lease]) -> (Vec<Uuid>, Vec<Uuid>) {
    leases.iter().map(|l| (l.job_id, l.token)).unzip()
}

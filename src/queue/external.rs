//! The queue writes and reads the HTTP surface needs: an external runner's status callbacks,
//! operator retry and cancel, the status API's lookups, the Stripe event log, and the numbers
//! `/metrics` reads at scrape time.
//!
//! Each write is one statement whose `WHERE` clause is the legality check, so two racing writers
//! (a runner callback and the daemon's claim, an operator and the sweep) cannot both win: zero
//! rows means "not allowed now", and only then is the row read to say why (404 or 409). Terminal
//! states never regress; the schema's trigger refuses it anyway. Must not: know about HTTP,
//! signatures or Stripe's JSON; hold a transaction across anything but the database.
//!
//! Replays. A legacy runner callback carries no timestamp, so a captured one can be sent again
//! at any time. What binds it to the attempt it belongs to: a runner takes only a job no one
//! has ever claimed (no daemon attempt, no operator retry: an operator-retried job is the
//! daemon's, and every other runner write requires `executor = 'external'`); a repeated
//! `provisioning` must carry the attempt's `workflow_run_id` (or none); steps only move
//! forward, and a step at or before the current one changes nothing. What legacy mode cannot
//! close: a replayed heartbeat (or bare `provisioning`) keeps a silent runner's job from
//! timing out. `http.runner_require_timestamp` closes that: a replay is refused once it is
//! older than the tolerance.

use super::{Queue, QueueError};
use crate::db::models::{AgentInstance, Job};
use crate::db::schema::{agent_instances, job_events, provisioning_jobs};
use crate::domain::{Executor, JobStatus};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{Double, Nullable, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use std::time::Duration;
use uuid::Uuid;

// A queued job that was never claimed (by the daemon or a runner) and never retried by an
// operator becomes the runner's: a replayed `provisioning` from an earlier attempt cannot take
// the attempt after an operator retry (or a daemon retry). A repeated `provisioning` callback
// for a job the runner already drives refreshes its heartbeat, if it names the same workflow
// run (or none). A daemon-held job (leased) never matches.
const START_EXTERNAL_SQL: &str = "\
UPDATE provisioning_jobs
SET status = 'provisioning', executor = 'external',
    claimed_at = CASE WHEN status = 'queued' THEN now() ELSE claimed_at END,
    last_heartbeat_at = now(), updated_at = now(),
    workflow_run_id = coalesce($2, workflow_run_id)
WHERE id = $1
  AND ((status = 'queued' AND lease_token IS NULL
        AND claimed_at IS NULL AND operator_retries = 0)
    OR (status = 'provisioning' AND executor = 'external'
        AND ($2::text IS NULL OR workflow_run_id IS NULL OR workflow_run_id = $2)))
RETURNING *";

const EXTERNAL_HEARTBEAT_SQL: &str = "\
UPDATE provisioning_jobs SET last_heartbeat_at = now()
WHERE id = $1 AND executor = 'external' AND status = 'provisioning'
RETURNING *";

const EXTERNAL_RUNNING_SQL: &str = "\
UPDATE provisioning_jobs
SET status = 'running', completed_at = now(), updated_at = now(),
    current_step = NULL, error = NULL, failed_step = NULL
WHERE id = $1 AND executor = 'external' AND status = 'provisioning'
RETURNING *";

// External jobs are not retried by the daemon: the runner decided the attempt is over.
const EXTERNAL_FAILED_SQL: &str = "\
UPDATE provisioning_jobs
SET status = 'failed', completed_at = now(), updated_at = now(),
    error = $2, last_error = $2, failed_step = coalesce($3, current_step)
WHERE id = $1 AND executor = 'external' AND status = 'provisioning'
RETURNING *";

// Queued: run now (skip the backoff; a job waiting to be rolled back stays so). Failed: the
// operator retry the schema's trigger allows (operator_retries + 1), with a fresh retry budget,
// run by the daemon from now on. A failed job was rolled back, so the resources its checkpoints
// name are gone: forget them, and the rollback decision with them (else the next claim would
// roll back again instead of provisioning). The key id stays,
// which makes the next attempt look the job's servers up by label first (and adopt anything an
// incomplete rollback left behind) before it mints a new key.
const RETRY_SQL: &str = "\
UPDATE provisioning_jobs
SET run_after = now(), updated_at = now(),
    status = 'queued',
    current_step = CASE WHEN status = 'failed' THEN NULL ELSE current_step END,
    server_id = CASE WHEN status = 'failed' THEN NULL ELSE server_id END,
    server_ip = CASE WHEN status = 'failed' THEN NULL ELSE server_ip END,
    location = CASE WHEN status = 'failed' THEN NULL ELSE location END,
    pending_action_ids = CASE WHEN status = 'failed' THEN '{}' ELSE pending_action_ids END,
    device_id = CASE WHEN status = 'failed' THEN NULL ELSE device_id END,
    tailscale_ip = CASE WHEN status = 'failed' THEN NULL ELSE tailscale_ip END,
    rollback_started_at = CASE WHEN status = 'failed' THEN NULL ELSE rollback_started_at END,
    rollback_error = CASE WHEN status = 'failed' THEN NULL ELSE rollback_error END,
    rollback_step = CASE WHEN status = 'failed' THEN NULL ELSE rollback_step END,
    operator_retries = operator_retries + (status = 'failed')::int,
    retry_count = CASE WHEN status = 'failed' THEN 0 ELSE retry_count END,
    error = CASE WHEN status = 'failed' THEN NULL ELSE error END,
    failed_step = CASE WHEN status = 'failed' THEN NULL ELSE failed_step END,
    completed_at = CASE WHEN status = 'failed' THEN NULL ELSE completed_at END,
    cancelled_at = CASE WHEN status = 'failed' THEN NULL ELSE cancelled_at END,
    executor = CASE WHEN status = 'failed' THEN 'daemon'::job_executor ELSE executor END
WHERE id = $1 AND status IN ('queued', 'failed')
RETURNING *";

// A cancelled job is `failed` with `cancelled_at` and an error saying so: the web app's types
// and progress view know `failed`, not `cancelled` (a label its enum lacks). Older daemons wrote
// `cancelled`; such rows stay readable.
const CANCEL_SQL: &str = "\
UPDATE provisioning_jobs
SET status = 'failed', error = 'cancelled by an operator before it started',
    cancelled_at = now(), completed_at = now(), updated_at = now()
WHERE id = $1 AND status = 'queued'
RETURNING *";

const OLDEST_QUEUED_SQL: &str = "\
SELECT coalesce(extract(epoch FROM now() - min(run_after)), 0)::float8 AS age
FROM provisioning_jobs WHERE status = 'queued' AND run_after <= now()";

const FIND_STRIPE_EVENT_SQL: &str = "\
SELECT event_id, type, outcome, reason, job_id FROM stripe_events WHERE event_id = $1";

const RECORD_STRIPE_EVENT_SQL: &str = "\
INSERT INTO stripe_events (event_id, type, outcome, reason, session_id, job_id)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (event_id) DO NOTHING";

/// How an external runner ended its attempt, without VM metadata (the seed's `updateJobStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalEnd {
    Running,
    Failed {
        error: String,
        failed_step: Option<String>,
    },
}

/// A verified Stripe event and what was done about it (the `stripe_events` table).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct StripeEventRecord {
    #[diesel(sql_type = Text)]
    pub event_id: String,
    #[diesel(sql_type = Text, column_name = "type")]
    #[serde(rename = "type")]
    pub event_type: String,
    /// `enqueued`, `duplicate`, `ignored` or `not_actionable`.
    #[diesel(sql_type = Text)]
    pub outcome: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub reason: Option<String>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    pub job_id: Option<Uuid>,
}

#[derive(QueryableByName)]
struct AgeRow {
    #[diesel(sql_type = Double)]
    age: f64,
}

impl Queue {
    /// The runner's `status: provisioning` callback: takes a queued job nobody holds, or
    /// refreshes one it already drives.
    pub async fn start_external(
        &self,
        job_id: Uuid,
        workflow_run_id: Option<&str>,
    ) -> Result<Job, QueueError> {
        let mut conn = self.pool().get().await?;
        let rows: Result<Vec<Job>, DieselError> = diesel::sql_query(START_EXTERNAL_SQL)
            .bind::<diesel::sql_types::Uuid, _>(job_id)
            .bind::<Nullable<Text>, _>(workflow_run_id)
            .load(&mut conn)
            .await;
        match rows {
            Ok(mut rows) if !rows.is_empty() => Ok(rows.remove(0)),
            Ok(_) => Err(self.why_not(job_id, JobStatus::Provisioning).await),
            // The user already has another job provisioning: this one waits.
            Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
                Err(QueueError::IllegalTransition {
                    job: job_id,
                    from: JobStatus::Queued,
                    to: JobStatus::Provisioning,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The runner's step callback. `order` lists the step names first to last; a step at or
    /// before the job's current one (a replay, a duplicate delivery) changes nothing and
    /// returns `None`. Otherwise the step is recorded on the job and its instance row, with an
    /// event, in one transaction that holds the job's row lock, so two racing callbacks cannot
    /// move progress backwards.
    pub async fn external_step(
        &self,
        job_id: Uuid,
        step: &str,
        order: &[&str],
    ) -> Result<Option<Job>, QueueError> {
        let rank = |s: Option<&str>| s.and_then(|s| order.iter().position(|o| *o == s));
        let Some(new_rank) = rank(Some(step)) else {
            return Ok(None);
        };
        let mut conn = self.pool().get().await?;
        let step = step.to_owned();
        conn.transaction::<_, QueueError, _>(async move |conn| {
            let job: Job = provisioning_jobs::table
                .find(job_id)
                .for_update()
                .select(Job::as_select())
                .first(conn)
                .await
                .optional()?
                .ok_or(QueueError::NotFound(job_id))?;
            if job.executor() != Executor::External || job.status() != JobStatus::Provisioning {
                return Err(QueueError::IllegalTransition {
                    job: job_id,
                    from: job.status(),
                    to: JobStatus::Provisioning,
                });
            }
            if rank(job.current_step.as_deref()).is_some_and(|current| current >= new_rank) {
                return Ok(None);
            }
            let job: Job = diesel::update(provisioning_jobs::table.find(job_id))
                .set((
                    provisioning_jobs::current_step.eq(&step),
                    provisioning_jobs::updated_at.eq(diesel::dsl::now),
                ))
                .returning(Job::as_returning())
                .get_result(conn)
                .await?;
            super::instances::upsert_instance(
                conn,
                &job,
                super::instances::InstanceStatus::Provisioning,
                Some(&step),
                None,
            )
            .await?;
            diesel::insert_into(job_events::table)
                .values((
                    job_events::job_id.eq(job_id),
                    job_events::step.eq(&step),
                    job_events::message.eq("runner step"),
                    job_events::data.eq(serde_json::json!({})),
                ))
                .execute(conn)
                .await?;
            Ok(Some(job))
        })
        .await
    }

    /// The runner's heartbeat: only for a job it drives.
    pub async fn external_heartbeat(&self, job_id: Uuid) -> Result<Job, QueueError> {
        self.external_write(
            EXTERNAL_HEARTBEAT_SQL,
            job_id,
            None,
            None,
            JobStatus::Provisioning,
        )
        .await
    }

    /// The runner's `running` (without metadata) or `failed` callback. Repeating the callback
    /// that already ended the job is accepted and changes nothing.
    pub async fn end_external(&self, job_id: Uuid, end: &ExternalEnd) -> Result<Job, QueueError> {
        let job = match end {
            ExternalEnd::Running => {
                self.external_write(EXTERNAL_RUNNING_SQL, job_id, None, None, JobStatus::Running)
                    .await
            }
            ExternalEnd::Failed { error, failed_step } => {
                self.external_write(
                    EXTERNAL_FAILED_SQL,
                    job_id,
                    Some(error),
                    failed_step.as_deref(),
                    JobStatus::Failed,
                )
                .await
            }
        }?;
        self.notify_workers();
        Ok(job)
    }

    async fn external_write(
        &self,
        sql: &str,
        job_id: Uuid,
        text: Option<&str>,
        step: Option<&str>,
        to: JobStatus,
    ) -> Result<Job, QueueError> {
        let mut conn = self.pool().get().await?;
        let query = diesel::sql_query(sql).bind::<diesel::sql_types::Uuid, _>(job_id);
        let mut rows: Vec<Job> = match text {
            Some(t) => {
                query
                    .bind::<Text, _>(t)
                    .bind::<Nullable<Text>, _>(step)
                    .load(&mut conn)
                    .await?
            }
            None => query.load(&mut conn).await?,
        };
        if rows.is_empty() {
            return match self.get(job_id).await? {
                // A runner retrying the callback that already ended its job.
                Some(job)
                    if to.is_terminal()
                        && job.status() == to
                        && job.executor() == Executor::External =>
                {
                    Ok(job)
                }
                _ => Err(self.why_not(job_id, to).await),
            };
        }
        Ok(rows.remove(0))
    }

    /// Operator retry: a queued job runs now; a failed one is queued again for the daemon
    /// (`operator_retries + 1`, retry budget and error reset). Anything else is a 409.
    pub async fn retry_now(&self, job_id: Uuid) -> Result<Job, QueueError> {
        let job = self
            .one_or_why(RETRY_SQL, job_id, JobStatus::Queued)
            .await?;
        self.notify_workers();
        Ok(job)
    }

    /// Cancels a queued job: it becomes `failed` with `cancelled_at` set. A provisioning job is
    /// refused: only its worker can stop it at a checkpoint and roll back what it created.
    pub async fn cancel(&self, job_id: Uuid) -> Result<Job, QueueError> {
        self.one_or_why(CANCEL_SQL, job_id, JobStatus::Cancelled)
            .await
    }

    async fn one_or_why(&self, sql: &str, job_id: Uuid, to: JobStatus) -> Result<Job, QueueError> {
        let mut conn = self.pool().get().await?;
        let mut rows: Vec<Job> = diesel::sql_query(sql)
            .bind::<diesel::sql_types::Uuid, _>(job_id)
            .load(&mut conn)
            .await?;
        if rows.is_empty() {
            return Err(self.why_not(job_id, to).await);
        }
        Ok(rows.remove(0))
    }

    /// Why a guarded write matched no row: the job is unknown, or its state forbids it.
    async fn why_not(&self, job_id: Uuid, to: JobStatus) -> QueueError {
        match self.get(job_id).await {
            Ok(None) => QueueError::NotFound(job_id),
            Ok(Some(job)) => QueueError::IllegalTransition {
                job: job_id,
                from: job.status(),
                to,
            },
            Err(e) => e,
        }
    }

    /// The agent's most recent job (the seed's `getJobByAgentId`).
    pub async fn latest_job_for_agent(&self, agent_id: Uuid) -> Result<Option<Job>, QueueError> {
        let mut conn = self.pool().get().await?;
        Ok(provisioning_jobs::table
            .filter(provisioning_jobs::agent_id.eq(agent_id))
            .order((
                provisioning_jobs::created_at.desc(),
                provisioning_jobs::id.desc(),
            ))
            .select(Job::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// The agent's instance row: the one `job_id` made, else its newest.
    pub async fn instance_for_agent(
        &self,
        agent_id: Uuid,
        job_id: Option<Uuid>,
    ) -> Result<Option<AgentInstance>, QueueError> {
        let mut conn = self.pool().get().await?;
        let job_id = job_id.unwrap_or(Uuid::nil());
        Ok(agent_instances::table
            .filter(agent_instances::agent_id.eq(agent_id))
            .order((
                agent_instances::job_id.eq(job_id).desc(),
                agent_instances::created_at.desc(),
            ))
            .select(AgentInstance::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// How long the oldest claimable queued job has waited (zero when none).
    pub async fn oldest_queued_age(&self) -> Result<Duration, QueueError> {
        let mut conn = self.pool().get().await?;
        let row: AgeRow = diesel::sql_query(OLDEST_QUEUED_SQL)
            .get_result(&mut conn)
            .await?;
        Ok(Duration::from_secs_f64(row.age.max(0.0)))
    }

    pub async fn find_stripe_event(
        &self,
        event_id: &str,
    ) -> Result<Option<StripeEventRecord>, QueueError> {
        let mut conn = self.pool().get().await?;
        Ok(diesel::sql_query(FIND_STRIPE_EVENT_SQL)
            .bind::<Text, _>(event_id)
            .get_result(&mut conn)
            .await
            .optional()?)
    }

    /// Records a verified event once; a concurrent delivery of the same event keeps the first.
    pub async fn record_stripe_event(
        &self,
        event: &StripeEventRecord,
        session_id: Option<&str>,
    ) -> Result<(), QueueError> {
        let mut conn = self.pool().get().await?;
        diesel::sql_query(RECORD_STRIPE_EVENT_SQL)
            .bind::<Text, _>(&event.event_id)
            .bind::<Text, _>(&event.event_type)
            .bind::<Text, _>(&event.outcome)
            .bind::<Nullable<Text>, _>(event.reason.as_deref())
            .bind::<Nullable<Text>, _>(session_id)
            .bind::<Nullable<diesel::sql_types::Uuid>, _>(event.job_id)
            .execute(&mut conn)
            .await?;
        Ok(())
    }
}

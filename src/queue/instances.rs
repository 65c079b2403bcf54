//! The writes the web app reads: a job's step on its `agent_instances` row, and completion as
//! the seed's `completeProvisioningWithMetadata` did it (job `running`, instance upserted with
//! the VM's metadata, agent `active`), in one transaction.
//!
//! Both the daemon's step machine (fenced by its lease) and an external runner's callbacks (no
//! lease; the job must be `external` and `provisioning`) come through here.

use super::{Queue, QueueError};
use crate::db::models::{DbExecutor, DbJobStatus, Job, Lease};
use crate::db::schema::{agent_instances, agents, job_events, provisioning_jobs};
use crate::domain::{Executor, JobStatus};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Nullable};
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who may write to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// The daemon worker holding this lease.
    Lease(Lease),
    /// An external runner (authenticated by its HMAC callback): only `external` jobs.
    External,
}

/// What a finished VM is known by (the seed's callback fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMetadata {
    pub server_id: String,
    pub server_ip: String,
    pub tailscale_ip: String,
}

/// What a daemon step found, recorded with its checkpoint. `None` leaves a column as it is;
/// `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, AsChangeset)]
#[diesel(table_name = provisioning_jobs)]
pub struct StepFields {
    pub tailscale_key_id: Option<Option<String>>,
    pub server_name: Option<String>,
    pub server_id: Option<Option<i64>>,
    pub server_ip: Option<Option<String>>,
    pub location: Option<Option<String>>,
    pub pending_action_ids: Option<Vec<i64>>,
    pub device_id: Option<Option<String>>,
    pub tailscale_ip: Option<Option<String>>,
}

/// Instance statuses the seed counts as "this agent's current instance", compared as text: the
/// web app's column is an enum, and a text parameter cannot be compared with it.
const LIVE_INSTANCE: &str =
    "agent_instances.status::text IN ('pending', 'provisioning', 'running')";

/// What the daemon writes to `agent_instances.status`. Written as SQL literals, which PostgreSQL
/// types from the column: the daemon's own schema has `text` there, the web app's an enum
/// (seeds 000/004), and a parameter bound as `text` would be refused by the enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InstanceStatus {
    Provisioning,
    Running,
}

impl InstanceStatus {
    fn literal(self) -> diesel::expression::SqlLiteral<diesel::sql_types::Text> {
        diesel::dsl::sql(match self {
            InstanceStatus::Provisioning => "'provisioning'",
            InstanceStatus::Running => "'running'",
        })
    }
}

impl Queue {
    /// Marks a `provisioning` job `running` with its VM's metadata: instance upserted, agent
    /// `active`, `current_step` cleared, one transaction. Repeating it for a job that is already
    /// `running` (a runner retrying its callback) returns the job unchanged.
    pub async fn complete_with_metadata(
        &self,
        job_id: Uuid,
        fence: Fence,
        meta: &VmMetadata,
    ) -> Result<Job, QueueError> {
        let mut conn = self.pool().get().await?;
        let meta = meta.clone();
        let job = conn
            .transaction::<_, QueueError, _>(async move |conn| {
                let job = lock_writable(conn, job_id, fence, JobStatus::Running).await?;
                if job.status() == JobStatus::Running {
                    return Ok(job);
                }
                let job: Job =
                    diesel::update(provisioning_jobs::table.filter(fenced(job_id, fence)))
                        .set((
                            provisioning_jobs::status.eq(DbJobStatus(JobStatus::Running)),
                            provisioning_jobs::completed_at.eq(diesel::dsl::now),
                            provisioning_jobs::updated_at.eq(diesel::dsl::now),
                            provisioning_jobs::current_step.eq(None::<String>),
                            provisioning_jobs::error.eq(None::<String>),
                            provisioning_jobs::failed_step.eq(None::<String>),
                            provisioning_jobs::lease_token.eq(None::<Uuid>),
                            provisioning_jobs::lease_owner.eq(None::<String>),
                            provisioning_jobs::lease_expires_at
                                .eq(None::<chrono::DateTime<chrono::Utc>>),
                            provisioning_jobs::server_ip.eq(&meta.server_ip),
                            provisioning_jobs::tailscale_ip.eq(&meta.tailscale_ip),
                        ))
                        .returning(Job::as_returning())
                        .get_result(conn)
                        .await
                        .optional()?
                        .ok_or(QueueError::LeaseLost(job_id))?;
                upsert_instance(conn, &job, InstanceStatus::Running, None, Some(&meta)).await?;
                diesel::update(agents::table.find(job.agent_id))
                    .set((
                        // A literal, typed by PostgreSQL from the column (the web app's is an enum).
                        agents::status.eq(diesel::dsl::sql::<diesel::sql_types::Text>("'active'")),
                        agents::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(conn)
                    .await?;
                Ok(job)
            })
            .await?;
        self.notify_workers();
        Ok(job)
    }

    /// Records the step a job reached on the job and on the agent's instance row (what the web
    /// app's progress view reads), with an event row. One transaction.
    pub async fn record_step(
        &self,
        job_id: Uuid,
        fence: Fence,
        step: &str,
        message: &str,
        data: serde_json::Value,
    ) -> Result<Job, QueueError> {
        self.checkpoint_step(job_id, fence, step, message, data, StepFields::default())
            .await
    }

    /// [`Queue::record_step`] that also records what the step found (its checkpoint), so that a
    /// resumed attempt starts from there.
    pub async fn checkpoint_step(
        &self,
        job_id: Uuid,
        fence: Fence,
        step: &str,
        message: &str,
        data: serde_json::Value,
        fields: StepFields,
    ) -> Result<Job, QueueError> {
        let mut conn = self.pool().get().await?;
        let (step, message) = (step.to_owned(), message.to_owned());
        conn.transaction::<_, QueueError, _>(async move |conn| {
            lock_writable(conn, job_id, fence, JobStatus::Provisioning).await?;
            let job: Job = diesel::update(provisioning_jobs::table.filter(fenced(job_id, fence)))
                .set((
                    provisioning_jobs::current_step.eq(&step),
                    provisioning_jobs::updated_at.eq(diesel::dsl::now),
                    fields,
                ))
                .returning(Job::as_returning())
                .get_result(conn)
                .await
                .optional()?
                .ok_or(QueueError::LeaseLost(job_id))?;
            upsert_instance(conn, &job, InstanceStatus::Provisioning, Some(&step), None).await?;
            diesel::insert_into(job_events::table)
                .values((
                    job_events::job_id.eq(job_id),
                    job_events::step.eq(&step),
                    job_events::message.eq(&message),
                    job_events::data.eq(&data),
                ))
                .execute(conn)
                .await?;
            Ok(job)
        })
        .await
    }
}

/// The job's row, narrowed to what `fence` may write. The row lock `lock_writable` took already
/// guarantees it (after waiting on a lock, `FOR UPDATE` returns the newest row version, which is
/// then checked); the statement that writes carries the fence as well, so that the rule "the
/// fence is in the writing statement" holds here as it does for every other worker write.
fn fenced(
    job_id: Uuid,
    fence: Fence,
) -> Box<dyn BoxableExpression<provisioning_jobs::table, Pg, SqlType = Nullable<Bool>>> {
    let id = provisioning_jobs::id.eq(job_id);
    match fence {
        Fence::Lease(lease) => Box::new(
            id.and(provisioning_jobs::lease_token.eq(lease.token))
                .and(provisioning_jobs::status.eq(DbJobStatus(JobStatus::Provisioning))),
        ),
        Fence::External => Box::new(id.nullable()),
    }
}

/// Locks the job row and checks that `fence` may move it towards `to`.
async fn lock_writable(
    conn: &mut diesel_async::AsyncPgConnection,
    job_id: Uuid,
    fence: Fence,
    to: JobStatus,
) -> Result<Job, QueueError> {
    let job: Job = provisioning_jobs::table
        .find(job_id)
        .for_update()
        .select(Job::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or(QueueError::NotFound(job_id))?;
    match fence {
        Fence::Lease(lease) => {
            if job.lease_token != Some(lease.token) || job.status() != JobStatus::Provisioning {
                return Err(QueueError::LeaseLost(job_id));
            }
            // A job that decided to roll back only ends `failed` (`Queue::finish_rollback`).
            if to == JobStatus::Running && job.rolling_back() {
                return Err(QueueError::IllegalTransition {
                    job: job_id,
                    from: job.status(),
                    to,
                });
            }
        }
        Fence::External => {
            // A repeated terminal callback is harmless; anything else must be a live external job.
            let repeat = job.status() == to && to.is_terminal();
            if !repeat
                && (job.executor != DbExecutor(Executor::External)
                    || job.status() != JobStatus::Provisioning)
            {
                return Err(QueueError::IllegalTransition {
                    job: job_id,
                    from: job.status(),
                    to,
                });
            }
        }
    }
    Ok(job)
}

/// The seed's rule: update the agent's live instance (or this job's), else insert one.
pub(super) async fn upsert_instance(
    conn: &mut diesel_async::AsyncPgConnection,
    job: &Job,
    status: InstanceStatus,
    step: Option<&str>,
    meta: Option<&VmMetadata>,
) -> Result<(), QueueError> {
    let existing: Option<Uuid> = agent_instances::table
        .filter(agent_instances::agent_id.eq(job.agent_id))
        .filter(
            agent_instances::job_id
                .eq(job.id)
                .or(agent_instances::job_id
                    .is_null()
                    .and(diesel::dsl::sql::<Bool>(LIVE_INSTANCE))),
        )
        .order((
            agent_instances::job_id.is_not_null().desc(),
            agent_instances::created_at.desc(),
        ))
        .select(agent_instances::id)
        .for_update()
        .first(conn)
        .await
        .optional()?;
    let started = meta.map(|_| chrono::Utc::now());
    match existing {
        Some(id) => {
            diesel::update(agent_instances::table.find(id))
                .set((
                    agent_instances::job_id.eq(job.id),
                    agent_instances::status.eq(status.literal()),
                    agent_instances::current_step.eq(step),
                    agent_instances::region.eq(&job.region),
                    agent_instances::updated_at.eq(diesel::dsl::now),
                ))
                .execute(conn)
                .await?;
            if let Some(m) = meta {
                diesel::update(agent_instances::table.find(id))
                    .set((
                        agent_instances::server_id.eq(&m.server_id),
                        agent_instances::server_ip.eq(&m.server_ip),
                        agent_instances::tailscale_ip.eq(&m.tailscale_ip),
                        agent_instances::started_at.eq(started),
                    ))
                    .execute(conn)
                    .await?;
            }
        }
        None => {
            diesel::insert_into(agent_instances::table)
                .values((
                    agent_instances::agent_id.eq(job.agent_id),
                    agent_instances::job_id.eq(job.id),
                    agent_instances::status.eq(status.literal()),
                    agent_instances::current_step.eq(step),
                    agent_instances::region.eq(&job.region),
                    agent_instances::server_id.eq(meta.map(|m| &m.server_id)),
                    agent_instances::server_ip.eq(meta.map(|m| &m.server_ip)),
                    agent_instances::tailscale_ip.eq(meta.map(|m| &m.tailscale_ip)),
                    agent_instances::started_at.eq(started),
                ))
                .execute(conn)
                .await?;
        }
    }
    Ok(())
}

//! Row types of the tables in `schema.rs`, and the SQL mapping of the domain enums.

use super::schema::{agent_instances, job_events, provisioning_jobs, sql_types};
use crate::domain::{Executor, JobStatus};
use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::pg::{Pg, PgValue};
use diesel::prelude::*;
use diesel::serialize::{self, IsNull, Output, ToSql};
use serde::Serialize;
use std::io::Write;
use uuid::Uuid;

/// A `provisioning_jobs` row.
#[derive(Debug, Clone, PartialEq, Queryable, QueryableByName, Selectable, Serialize)]
#[diesel(table_name = provisioning_jobs, check_for_backend(Pg))]
pub struct Job {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub user_id: Uuid,
    pub stripe_event_id: Option<String>,
    pub status: DbJobStatus,
    pub region: String,
    pub workflow_run_id: Option<String>,
    pub retry_count: i32,
    pub max_retries: i32,
    pub error: Option<String>,
    pub failed_step: Option<String>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub business_key: Option<String>,
    pub executor: DbExecutor,
    pub run_after: DateTime<Utc>,
    /// The fencing token. Skipped in JSON: whoever holds it can write as the worker.
    #[serde(skip)]
    pub lease_token: Option<Uuid>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub operator_retries: i32,
    pub current_step: Option<String>,
    pub tailscale_key_id: Option<String>,
    pub server_name: Option<String>,
    pub server_id: Option<i64>,
    pub server_ip: Option<String>,
    pub location: Option<String>,
    pub pending_action_ids: Vec<i64>,
    pub device_id: Option<String>,
    pub tailscale_ip: Option<String>,
    /// Set while the job is rolling back: the decision was recorded (fenced) before any delete;
    /// whoever claims the job next resumes the rollback instead of provisioning.
    pub rollback_started_at: Option<DateTime<Utc>>,
    /// The error and step the job fails with once its rollback is done.
    pub rollback_error: Option<String>,
    pub rollback_step: Option<String>,
    /// How often the sweep requeued the rollback after its holder died (bounded).
    pub rollback_resumes: i32,
    /// When an operator cancelled the job (it is then `failed`); NULL otherwise.
    pub cancelled_at: Option<DateTime<Utc>>,
}

impl Job {
    pub fn status(&self) -> JobStatus {
        self.status.0
    }

    pub fn executor(&self) -> Executor {
        self.executor.0
    }

    /// Whether the job gave up and is being (or is to be) rolled back.
    pub fn rolling_back(&self) -> bool {
        self.rollback_started_at.is_some()
    }

    /// The lease this row was claimed with, if it is held.
    pub fn lease(&self) -> Option<Lease> {
        self.lease_token.map(|token| Lease {
            job_id: self.id,
            token,
        })
    }
}

/// The right to write to one job: its id and the token of the claim that took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job_id: Uuid,
    pub token: Uuid,
}

/// An `agent_instances` row: what the web app shows for a running agent.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Serialize)]
#[diesel(table_name = agent_instances, check_for_backend(Pg))]
pub struct AgentInstance {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub job_id: Option<Uuid>,
    pub status: String,
    pub server_id: Option<String>,
    pub server_ip: Option<String>,
    pub tailscale_ip: Option<String>,
    pub region: Option<String>,
    pub current_step: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A `job_events` row.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Serialize)]
#[diesel(table_name = job_events, check_for_backend(Pg))]
pub struct JobEvent {
    pub id: i64,
    pub job_id: Uuid,
    pub at: DateTime<Utc>,
    pub step: Option<String>,
    pub message: String,
    pub data: serde_json::Value,
}

/// `JobStatus` as stored in the `job_status` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, AsExpression, FromSqlRow, Serialize)]
#[diesel(sql_type = sql_types::JobStatus)]
#[serde(transparent)]
pub struct DbJobStatus(pub JobStatus);

/// `Executor` as stored in the `job_executor` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, AsExpression, FromSqlRow, Serialize)]
#[diesel(sql_type = sql_types::JobExecutor)]
#[serde(transparent)]
pub struct DbExecutor(pub Executor);

impl ToSql<sql_types::JobStatus, Pg> for DbJobStatus {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        out.write_all(self.0.as_str().as_bytes())?;
        Ok(IsNull::No)
    }
}

impl FromSql<sql_types::JobStatus, Pg> for DbJobStatus {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        Ok(DbJobStatus(std::str::from_utf8(bytes.as_bytes())?.parse()?))
    }
}

impl ToSql<sql_types::JobExecutor, Pg> for DbExecutor {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        out.write_all(self.0.as_str().as_bytes())?;
        Ok(IsNull::No)
    }
}

impl FromSql<sql_types::JobExecutor, Pg> for DbExecutor {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        Ok(DbExecutor(std::str::from_utf8(bytes.as_bytes())?.parse()?))
    }
}

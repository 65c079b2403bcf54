//! What the chaos suite checks once every job has ended and a reap has run: the database's jobs
//! and instances against the simulated clouds, and the stale-write detector's record.
//!
//! Only reads; it must never repair what it finds.

use crate::db::models::{AgentInstance, Job};
use crate::db::{self, DbError, Pool};
use crate::domain::JobStatus;
use crate::provision::server_name;
use crate::sim::{ServerStatus, SimState};
use diesel::prelude::*;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// The detector's tables, functions and trigger (see the file for how it decides).
pub const STALE_WRITE_DETECTOR_SQL: &str = include_str!("stale_writes.sql");

/// Installs the stale-write detector on the database at `url` (after its migrations).
pub async fn install_stale_write_detector(url: &crate::secret::Secret) -> Result<(), DbError> {
    let mut conn = db::establish(url, std::time::Duration::from_secs(10)).await?;
    conn.batch_execute(STALE_WRITE_DETECTOR_SQL)
        .await
        .map_err(DbError::Query)
}

/// One write the detector recorded.
#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct StaleWrite {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub job_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub writer: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub rule: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub old_status: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub new_status: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub query: Option<String>,
}

pub async fn stale_writes(pool: &Pool) -> Result<Vec<StaleWrite>, DbError> {
    let mut conn = pool.get().await?;
    Ok(diesel::sql_query(
        "SELECT job_id, writer, rule, old_status, new_status, left(query, 300) AS query
         FROM chaos_stale_writes ORDER BY id",
    )
    .load(&mut conn)
    .await?)
}

/// Attempts that ended in a retry, by cause: a lease that ran out (its daemon was killed, or
/// could not reach PostgreSQL), a cloud API error, anything else (e.g. the database).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Retries {
    pub lease_expired: i64,
    pub cloud_error: i64,
    pub other: i64,
}

pub async fn retries(pool: &Pool) -> Result<Retries, DbError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        lease_expired: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        cloud_error: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        other: i64,
    }
    let mut conn = pool.get().await?;
    let r: Row = diesel::sql_query(
        "SELECT count(*) FILTER (WHERE e LIKE 'lease expired%') AS lease_expired,
                count(*) FILTER (WHERE e NOT LIKE 'lease expired%'
                                 AND e ~* '(hetzner|tailscale)') AS cloud_error,
                count(*) FILTER (WHERE e NOT LIKE 'lease expired%'
                                 AND e !~* '(hetzner|tailscale)') AS other
         FROM (SELECT coalesce(data->>'error', '') AS e FROM job_events
               WHERE message = 'retry scheduled') s",
    )
    .get_result(&mut conn)
    .await?;
    Ok(Retries {
        lease_expired: r.lease_expired,
        cloud_error: r.cloud_error,
        other: r.other,
    })
}

pub async fn instances(pool: &Pool, jobs: &[Uuid]) -> Result<Vec<AgentInstance>, DbError> {
    use crate::db::schema::agent_instances;
    let mut conn = pool.get().await?;
    Ok(agent_instances::table
        .filter(agent_instances::job_id.eq_any(jobs))
        .select(AgentInstance::as_select())
        .load(&mut conn)
        .await?)
}

/// The cloud side of the final checks, counted from the simulator after the reap.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CloudFindings {
    /// Jobs for which more than one server was ever created (deleted ones count).
    pub duplicate_servers: usize,
    /// Jobs with more than one tailnet device ever enrolled.
    pub duplicate_devices: usize,
    /// Servers (not being deleted) that no `running` job records.
    pub orphan_servers: usize,
    /// Tailnet devices of ours that no `running` job records.
    pub orphan_devices: usize,
    /// Auth keys still usable: not revoked, not expired, not used up.
    pub valid_keys: usize,
    /// Instances or jobs that disagree with the clouds, one line each.
    pub inconsistencies: Vec<String>,
}

pub fn cloud_findings(
    state: &SimState,
    jobs: &[Job],
    instances: &[AgentInstance],
) -> CloudFindings {
    let by_id: HashMap<Uuid, &Job> = jobs.iter().map(|j| (j.id, j)).collect();
    let names: HashMap<String, Uuid> = jobs.iter().map(|j| (server_name(j.id), j.id)).collect();
    let live_servers: Vec<_> = state
        .servers
        .iter()
        .filter(|s| s.status != ServerStatus::Deleting)
        .collect();
    let mut f = CloudFindings::default();

    let mut servers_per_job: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &live_servers {
        *servers_per_job.entry(s.name.as_str()).or_default() += 1;
    }
    f.duplicate_servers = names
        .keys()
        .filter(|n| {
            state.creates_by_name.get(*n).copied().unwrap_or(0) > 1
                || servers_per_job.get(n.as_str()).copied().unwrap_or(0) > 1
        })
        .count();
    f.duplicate_devices = names
        .keys()
        .filter(|n| {
            state.enrollments_by_hostname.get(*n).copied().unwrap_or(0) > 1
                || state.devices.iter().filter(|d| &d.hostname == *n).count() > 1
        })
        .count();

    let running = |id: &Uuid| {
        by_id
            .get(id)
            .filter(|j| j.status() == JobStatus::Running)
            .copied()
    };
    f.orphan_servers = live_servers
        .iter()
        .filter(|s| {
            let job = s
                .labels
                .get("job")
                .and_then(|j| Uuid::try_parse(j).ok())
                .and_then(|id| running(&id));
            job.is_none_or(|j| j.server_id != Some(s.id))
        })
        .count();
    f.orphan_devices = state
        .devices
        .iter()
        .filter(|d| {
            let job = names.get(&d.hostname).and_then(running);
            job.is_none_or(|j| j.device_id.as_deref() != Some(d.node_id.as_str()))
        })
        .count();
    let now = chrono::Utc::now();
    f.valid_keys = state.keys.iter().filter(|k| !k.invalid(now)).count();
    f.inconsistencies = inconsistencies(state, jobs, instances);
    f
}

/// Every `running` instance's server exists with its IP and its device with its tailnet IP;
/// every `running` job has a running instance; no failed job has a server or a running instance.
fn inconsistencies(state: &SimState, jobs: &[Job], instances: &[AgentInstance]) -> Vec<String> {
    let mut out = Vec::new();
    let instance_of: HashMap<Uuid, &AgentInstance> = instances
        .iter()
        .filter_map(|i| i.job_id.map(|j| (j, i)))
        .collect();
    for job in jobs {
        let name = server_name(job.id);
        let instance = instance_of.get(&job.id);
        match job.status() {
            JobStatus::Running => {
                let Some(i) = instance.filter(|i| i.status == "running") else {
                    out.push(format!(
                        "job {} is running without a running instance",
                        job.id
                    ));
                    continue;
                };
                let server = i
                    .server_id
                    .as_deref()
                    .and_then(|s| s.parse::<i64>().ok())
                    .and_then(|id| state.servers.iter().find(|s| s.id == id));
                match server {
                    None => out.push(format!(
                        "job {}: instance server {:?} does not exist",
                        job.id, i.server_id
                    )),
                    Some(s) if s.ipv4 != i.server_ip || s.name != name => out.push(format!(
                        "job {}: instance says {:?} at {:?}, the cloud has {} at {:?}",
                        job.id, i.server_id, i.server_ip, s.name, s.ipv4
                    )),
                    Some(s) if s.status != ServerStatus::Running => {
                        out.push(format!("job {}: server {} is {:?}", job.id, s.id, s.status))
                    }
                    Some(_) => {}
                }
                let device = state.devices.iter().find(|d| {
                    d.hostname == name
                        && i.tailscale_ip
                            .as_ref()
                            .is_some_and(|ip| d.addresses.contains(ip))
                });
                if device.is_none() {
                    out.push(format!(
                        "job {}: no tailnet device {name} with {:?}",
                        job.id, i.tailscale_ip
                    ));
                }
            }
            JobStatus::Failed | JobStatus::Cancelled => {
                if state
                    .servers
                    .iter()
                    .any(|s| s.name == name && s.status != ServerStatus::Deleting)
                {
                    out.push(format!("failed job {} still has a server", job.id));
                }
                if instance.is_some_and(|i| i.status == "running") {
                    out.push(format!("failed job {} has a running instance", job.id));
                }
            }
            JobStatus::Queued | JobStatus::Provisioning => {}
        }
    }
    out
}

//! The reaper: deletes servers labelled `managed-by=provisiond` and tagged tailnet devices that
//! no live job owns, and revokes valid auth keys described `pv-<job>` that no live job records,
//! once they are older than the grace period. It is what makes "nothing is billed without an
//! owner, and no minted key stays usable, for longer than one reaper interval" hold after
//! crashes mid-rollback or between a mint and its checkpoint, jobs failed by the sweep, and
//! manual mistakes. It survives errors: one failed delete or listing is logged and the pass
//! goes on.
//!
//! Ownership: a server labelled `job=<id>` (or a device named `pv-<id>`) belongs to a job that
//! is `queued` or `provisioning` (it will resume and adopt it) unless the job already recorded a
//! different one; to a `running` job only if it is the one the job recorded. Anything else —
//! unknown job, `failed`, `cancelled`, a duplicate — is unowned. A key belongs only to a `queued`
//! or `provisioning` job that recorded it: a live job that minted another key since (or never
//! checkpointed this one) revokes it on resume anyway. Devices whose hostname and keys whose
//! description we did not generate are never touched, whatever their tags.

use super::{MANAGED_BY, server_name};
use crate::clients::hetzner::{HetznerClient, ServerQuery};
use crate::clients::tailscale::{DeviceFilter, TailscaleClient};
use crate::db::models::Job;
use crate::domain::JobStatus;
use crate::queue::Queue;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ReapReport {
    pub servers_deleted: Vec<i64>,
    pub devices_deleted: Vec<String>,
    pub keys_revoked: Vec<String>,
    /// Unowned but younger than the grace period: left for a later pass.
    pub too_young: usize,
    pub errors: Vec<String>,
}

/// What a job record says about a resource it may own.
fn owns(job: Option<&Job>, recorded: Option<&str>, candidate: &str) -> bool {
    let Some(job) = job else { return false };
    match job.status() {
        JobStatus::Queued | JobStatus::Provisioning => recorded.is_none_or(|r| r == candidate),
        JobStatus::Running => recorded == Some(candidate),
        JobStatus::Failed | JobStatus::Cancelled => false,
    }
}

fn old_enough(created: Option<DateTime<Utc>>, grace: Duration) -> bool {
    // An unknown age is never old enough: we do not delete what we cannot date.
    created.is_some_and(|c| {
        Utc::now() - c >= chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX)
    })
}

/// The job a device hostname (or a key description, which is the same string) was generated
/// for.
fn job_of_hostname(hostname: &str) -> Option<Uuid> {
    let hex = hostname.strip_prefix("pv-")?;
    let id = Uuid::try_parse(hex).ok()?;
    (server_name(id) == hostname).then_some(id)
}

/// One pass. Errors are collected, never fatal: the next resource and the next pass go on.
pub async fn reap(
    queue: &Queue,
    hetzner: &HetznerClient,
    tailscale: &TailscaleClient,
    tags: &[String],
    grace: Duration,
) -> ReapReport {
    let mut report = ReapReport::default();
    let servers = match hetzner
        .list_servers(&ServerQuery {
            label_selector: Some(format!("managed-by={MANAGED_BY}")),
            name: None,
        })
        .await
    {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(format!("list servers: {e}"));
            Vec::new()
        }
    };
    let devices = match tailscale
        .list_devices(&DeviceFilter {
            hostname: None,
            tags: tags.to_vec(),
        })
        .await
    {
        Ok(d) => d,
        Err(e) => {
            report.errors.push(format!("list devices: {e}"));
            Vec::new()
        }
    };
    let keys = match tailscale.list_keys().await {
        Ok(mut k) => {
            k.retain(|k| !k.invalid && job_of_hostname(&k.description).is_some());
            k
        }
        Err(e) => {
            report.errors.push(format!("list keys: {e}"));
            Vec::new()
        }
    };
    let mut ids: Vec<Uuid> = servers
        .iter()
        .filter_map(|s| s.labels.get("job").and_then(|j| Uuid::try_parse(j).ok()))
        .chain(devices.iter().filter_map(|d| job_of_hostname(&d.hostname)))
        .chain(keys.iter().filter_map(|k| job_of_hostname(&k.description)))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let jobs: HashMap<Uuid, Job> = match queue.get_many(&ids).await {
        Ok(jobs) => jobs.into_iter().map(|j| (j.id, j)).collect(),
        Err(e) => {
            // Without the owners we cannot tell orphans from live resources: delete nothing.
            report.errors.push(format!("load jobs: {e}"));
            return report;
        }
    };

    for s in &servers {
        let job = s
            .labels
            .get("job")
            .and_then(|j| Uuid::try_parse(j).ok())
            .and_then(|id| jobs.get(&id));
        let recorded = job.and_then(|j| j.server_id).map(|id| id.to_string());
        if owns(job, recorded.as_deref(), &s.id.to_string()) {
            continue;
        }
        if !old_enough(s.created, grace) {
            report.too_young += 1;
            continue;
        }
        match hetzner.delete_server(s.id).await {
            Ok(_) => {
                tracing::warn!(server.id = s.id, server.name = %s.name, "reaped an unowned server");
                crate::metrics::orphan_reaped("server");
                report.servers_deleted.push(s.id);
            }
            Err(e) => report.errors.push(format!("delete server {}: {e}", s.id)),
        }
    }
    for d in &devices {
        let Some(id) = job_of_hostname(&d.hostname) else {
            continue;
        };
        let job = jobs.get(&id);
        if owns(job, job.and_then(|j| j.device_id.as_deref()), &d.node_id) {
            continue;
        }
        if !old_enough(d.created, grace) {
            report.too_young += 1;
            continue;
        }
        match tailscale.delete_device(&d.node_id).await {
            Ok(()) => {
                tracing::warn!(device = %d.node_id, hostname = %d.hostname, "reaped an unowned device");
                crate::metrics::orphan_reaped("device");
                report.devices_deleted.push(d.node_id.clone());
            }
            Err(e) => report
                .errors
                .push(format!("delete device {}: {e}", d.node_id)),
        }
    }
    for k in &keys {
        let job = job_of_hostname(&k.description).and_then(|id| jobs.get(&id));
        let recorded = job.and_then(|j| j.tailscale_key_id.as_deref());
        let live =
            job.is_some_and(|j| matches!(j.status(), JobStatus::Queued | JobStatus::Provisioning));
        if live && recorded == Some(k.id.as_str()) {
            continue;
        }
        if !old_enough(k.created, grace) {
            report.too_young += 1;
            continue;
        }
        match tailscale.revoke_key(&k.id).await {
            Ok(()) => {
                tracing::warn!(key = %k.id, description = %k.description, "revoked an unrecorded auth key");
                crate::metrics::orphan_reaped("key");
                report.keys_revoked.push(k.id.clone());
            }
            Err(e) => report.errors.push(format!("revoke key {}: {e}", k.id)),
        }
    }
    for e in &report.errors {
        tracing::warn!(error = %e, "reaper");
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_generated_hostnames_map_to_jobs() {
        let id = Uuid::new_v4();
        assert_eq!(job_of_hostname(&server_name(id)), Some(id));
        assert_eq!(job_of_hostname("pv-not-a-uuid"), None);
        assert_eq!(job_of_hostname("laptop"), None);
        // A hyphenated uuid parses but is not what we generate.
        assert_eq!(job_of_hostname(&format!("pv-{id}")), None);
    }

    #[test]
    fn unknown_age_is_never_old_enough() {
        assert!(!old_enough(None, Duration::ZERO));
        assert!(old_enough(
            Some(Utc::now() - chrono::Duration::hours(2)),
            Duration::from_secs(3600)
        ));
        assert!(!old_enough(Some(Utc::now()), Duration::from_secs(3600)));
    }
}

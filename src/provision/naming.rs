//! The names that tie cloud resources to a job: the server (and tailnet) name, the labels and
//! label selector of its servers, the description of its auth keys. Deterministic, so a resumed
//! attempt, the rollback and the reaper find what an earlier attempt made. Must not: do I/O.

use uuid::Uuid;

/// The `managed-by` label on every server we create; the reaper lists by it.
pub const MANAGED_BY: &str = "provisiond";

/// The server (and tailnet) name of a job: deterministic, unique, a valid hostname.
pub fn server_name(job_id: Uuid) -> String {
    format!("pv-{}", job_id.simple())
}

/// The label selector of a job's servers.
pub fn job_selector(job_id: Uuid) -> String {
    format!("managed-by={MANAGED_BY},job={job_id}")
}

/// The description of every auth key minted for a job: the server name, `pv-` and the job id
/// without hyphens (35 characters; Tailscale allows 50 alphanumerics, hyphens and spaces). It is
/// how a key whose mint outcome is unknown, or whose checkpoint never landed, is found again.
pub fn key_description(job_id: Uuid) -> String {
    server_name(job_id)
}

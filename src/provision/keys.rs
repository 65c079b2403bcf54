//! Revoking the auth keys minted for a job. Must not: revoke a key that is not the job's (keys
//! are found by the job's description).

use crate::clients::tailscale::{TailscaleClient, TailscaleError};

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

//! The rollback of a job that failed for good: its servers (by id and by label), its device and
//! its keys are deleted, each delete preceded by a lease check. Runs only after the fenced
//! write that decided it. Must not: touch anything once the lease is lost.

use super::keys::revoke_job_keys;
use super::lease_guard::LeaseGuard;
use super::naming::{job_selector, key_description, server_name};
use super::provisioner::Provisioner;
use super::retry::retry_until;
use crate::clients::hetzner::ServerQuery;
use crate::clients::tailscale::DeviceFilter;
use crate::db::models::Job;
use crate::worker::{JobContext, RollbackOutcome};

impl Provisioner {
    /// Deletes what a failed job created: its servers (by id and by label), its device, its key.
    /// Every delete and revoke is preceded by a lease check (`Queue::confirm_lease`, which also
    /// renews it), so that a worker whose job was taken over stops before touching anything the
    /// new owner may use. Deletes are retried through 429s and 5xx for `rollback_timeout`; what
    /// is left after that is the reaper's. Idempotent: a resumed rollback does it all again.
    pub(super) async fn roll_back(&self, ctx: JobContext) -> RollbackOutcome {
        let guard = LeaseGuard { p: self, ctx: &ctx };
        match self.rollback_all(&ctx.job, &guard).await {
            Ok(complete) => RollbackOutcome::Done { complete },
            Err(stopped) => stopped,
        }
    }

    /// Returns whether everything was deleted, or why it stopped.
    async fn rollback_all(
        &self,
        job: &Job,
        guard: &LeaseGuard<'_>,
    ) -> Result<bool, RollbackOutcome> {
        let mut complete = true;
        let until = tokio::time::Instant::now() + self.inner.settings.rollback_timeout;
        let h = &self.inner.hetzner;
        let t = &self.inner.tailscale;
        let mut servers: Vec<i64> = job.server_id.into_iter().collect();
        let q = ServerQuery {
            label_selector: Some(job_selector(job.id)),
            name: None,
        };
        match retry_until(until, None, "list servers", || h.list_servers(&q)).await? {
            Some(found) => {
                servers.extend(found.iter().map(|s| s.id));
                servers.sort_unstable();
                servers.dedup();
            }
            None => complete = false,
        }
        for id in servers {
            let deleted = retry_until(until, Some(guard), "delete server", || h.delete_server(id));
            if deleted.await?.is_some() {
                tracing::info!(server.id = id, "rollback: server deleted");
            } else {
                complete = false;
            }
        }
        let mut devices: Vec<String> = job.device_id.iter().cloned().collect();
        let filter = DeviceFilter {
            hostname: Some(server_name(job.id)),
            tags: self.inner.settings.tags.clone(),
        };
        match retry_until(until, None, "list devices", || t.list_devices(&filter)).await? {
            Some(found) => {
                devices.extend(found.into_iter().map(|d| d.node_id));
                devices.sort_unstable();
                devices.dedup();
            }
            None => complete = false,
        }
        for node in devices {
            let deleted = retry_until(until, Some(guard), "delete device", || {
                t.delete_device(&node)
            });
            complete &= deleted.await?.is_some();
        }
        let description = key_description(job.id);
        let revoked = retry_until(until, Some(guard), "revoke keys", || {
            revoke_job_keys(t, &description, job.tailscale_key_id.as_deref())
        });
        complete &= revoked.await?.is_some();
        Ok(complete)
    }
}

//! One attempt at one job: the deadline, the stop and lease checks between steps, the fenced
//! checkpoints, and the order of the steps (`create`, `join`), then the key revoke and the
//! final fenced write. Must not: hold a transaction across a cloud call, or write after its
//! lease is lost (every write is fenced by the queue).

use super::provisioner::Provisioner;
use super::stop::{Stop, tailscale_stop};
use crate::db::models::Job;
use crate::domain::Step;
use crate::queue::{Fence, StepFields, VmMetadata};
use crate::worker::{JobContext, Outcome};
use serde_json::json;

impl Provisioner {
    pub(super) async fn run_attempt(&self, ctx: JobContext) -> Outcome {
        let started = tokio::time::Instant::now();
        // The deadline counts from this attempt's claim.
        let used = (chrono::Utc::now() - ctx.job.claimed_at.unwrap_or_else(chrono::Utc::now))
            .to_std()
            .unwrap_or_default();
        let deadline = started + self.inner.settings.deadline.saturating_sub(used);
        let mut attempt = Attempt {
            p: self,
            ctx: &ctx,
            job: ctx.job.clone(),
            deadline,
            step_started: started,
        };
        let result = attempt.run().await;
        if let Err(Stop::Retry { step, .. } | Stop::Fatal { step, .. }) = &result {
            crate::metrics::step_finished(step, attempt.step_started.elapsed(), false);
        }
        match result {
            Ok(()) => Outcome::Finished,
            Err(Stop::Interrupted) | Err(Stop::Crashed) => Outcome::Interrupted,
            Err(Stop::LeaseLost) => Outcome::LeaseLost,
            // Whether a retry is left is decided by the queue, from the row it updates; a
            // failure for good is rolled back by the worker after that fenced write.
            Err(Stop::Retry { error, step }) => {
                tracing::warn!(step, error = %error, "attempt failed");
                Outcome::Retry {
                    error,
                    step: Some(step.to_owned()),
                }
            }
            Err(Stop::Fatal { error, step }) => {
                tracing::error!(step, error = %error, "provisioning failed");
                Outcome::Fail {
                    error,
                    step: Some(step.to_owned()),
                }
            }
        }
    }
}

/// One attempt at one job; `job` is kept in step with every checkpoint written.
pub(super) struct Attempt<'a> {
    pub(super) p: &'a Provisioner,
    pub(super) ctx: &'a JobContext,
    pub(super) job: Job,
    pub(super) deadline: tokio::time::Instant,
    /// When the step now under way began (for its duration metric).
    pub(super) step_started: tokio::time::Instant,
}

impl Attempt<'_> {
    pub(super) fn fence(&self) -> Fence {
        Fence::Lease(self.ctx.lease)
    }

    /// Whether the job's last checkpoint is `step` or a later step of the daemon's.
    pub(super) fn reached(&self, step: Step) -> bool {
        self.job
            .current_step
            .as_deref()
            .and_then(Step::parse)
            .is_some_and(|at| Step::DAEMON.contains(&at) && at >= step)
    }

    /// Between steps: stop for shutdown, a lost lease or the deadline before the next call.
    pub(super) fn check(&self, step: &'static str) -> Result<(), Stop> {
        if self.ctx.stop.is_cancelled() {
            return Err(Stop::Interrupted);
        }
        if tokio::time::Instant::now() >= self.deadline {
            return Err(self.deadline_stop(step));
        }
        Ok(())
    }

    pub(super) fn deadline_stop(&self, step: &'static str) -> Stop {
        Stop::Fatal {
            error: format!(
                "deadline of {} exceeded",
                humantime::format_duration(self.p.inner.settings.deadline)
            ),
            step,
        }
    }

    /// Waits for `fut`, unless the stop token or the deadline comes first. Only for waits with
    /// no side effects (watchers, sleeps).
    pub(super) async fn wait<T>(
        &self,
        step: &'static str,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T, Stop> {
        tokio::select! {
            v = fut => Ok(v),
            _ = self.ctx.stop.cancelled() => Err(Stop::Interrupted),
            _ = tokio::time::sleep_until(self.deadline) => Err(self.deadline_stop(step)),
        }
    }

    pub(super) async fn checkpoint(
        &mut self,
        step: Step,
        message: String,
        data: serde_json::Value,
        fields: StepFields,
    ) -> Result<(), Stop> {
        self.job = self
            .ctx
            .queue
            .checkpoint_step(
                self.job.id,
                self.fence(),
                step.as_str(),
                &message,
                data,
                fields,
            )
            .await?;
        crate::metrics::step_finished(step.as_str(), self.step_started.elapsed(), true);
        self.step_started = tokio::time::Instant::now();
        tracing::info!(step = step.as_str(), "{message}");
        self.p.failpoint(&format!("after_checkpoint:{step}"))
    }

    pub(super) async fn run(&mut self) -> Result<(), Stop> {
        if self.job.server_id.is_none() {
            self.server().await?;
        }
        if !self.reached(Step::VmRunning) {
            self.vm_running().await?;
        }
        if !self.reached(Step::NetworkConfigured) {
            self.network().await?;
        }
        self.check("done")?;
        // The key is used up once the device joined, but only a revoked key is certainly
        // useless. Revoking is idempotent, so a resumed attempt simply does it again.
        if let Some(key) = self.job.tailscale_key_id.clone() {
            self.p.inner.tailscale.revoke_key(&key).await.map_err(|e| {
                tailscale_stop(Step::NetworkConfigured.as_str(), "revoke the used key", &e)
            })?;
            self.ctx
                .queue
                .record_step(
                    self.job.id,
                    self.fence(),
                    Step::NetworkConfigured.as_str(),
                    "auth key revoked",
                    json!({ "key_id": key }),
                )
                .await?;
        }
        let meta = VmMetadata {
            server_id: self
                .job
                .server_id
                .map(|i| i.to_string())
                .unwrap_or_default(),
            server_ip: self.job.server_ip.clone().unwrap_or_default(),
            tailscale_ip: self.job.tailscale_ip.clone().unwrap_or_default(),
        };
        self.ctx
            .queue
            .complete_with_metadata(self.job.id, self.fence(), &meta)
            .await?;
        tracing::info!(
            "provisioned: server {} at {}",
            meta.server_id,
            meta.tailscale_ip
        );
        Ok(())
    }
}

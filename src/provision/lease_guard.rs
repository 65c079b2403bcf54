//! The lease check a rollback makes before each irreversible call (and the rollback's
//! failpoints). Must not: let a rollback go on after the lease is lost or unconfirmed.

use super::provisioner::Provisioner;
use crate::worker::{JobContext, RollbackOutcome};

/// The lease check a rollback makes before each irreversible call.
pub(super) struct LeaseGuard<'a> {
    pub(super) p: &'a Provisioner,
    pub(super) ctx: &'a JobContext,
}

impl LeaseGuard<'_> {
    pub(super) async fn check(&self, what: &str) -> Result<(), RollbackOutcome> {
        // A crash drill stops the rollback dead here, writing nothing, as a killed process would.
        if self.ctx.stop.is_cancelled() || self.p.failpoint(&format!("rollback:{what}")).is_err() {
            return Err(RollbackOutcome::Interrupted);
        }
        match self.ctx.queue.confirm_lease(&self.ctx.lease).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!("rollback: lease lost; touching nothing more");
                Err(RollbackOutcome::LeaseLost)
            }
            // Unconfirmed is not ours: stop, and let the next holder resume the rollback.
            Err(e) => {
                tracing::warn!(error = %e, "rollback: cannot confirm the lease; stopping");
                Err(RollbackOutcome::Interrupted)
            }
        }
    }
}

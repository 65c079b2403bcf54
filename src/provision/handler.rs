//! What the worker calls: one attempt (`attempt`), or the rollback of a job that failed for good
//! (`rollback`). Must not: decide retry versus failure (the queue does, from the row).

use super::provisioner::Provisioner;
use crate::worker::{JobContext, JobHandler, Outcome, RollbackOutcome};
use futures::FutureExt;
use futures::future::BoxFuture;

impl JobHandler for Provisioner {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        let p = self.clone();
        async move { p.run_attempt(ctx).await }.boxed()
    }

    fn rollback(&self, ctx: JobContext) -> BoxFuture<'static, RollbackOutcome> {
        let p = self.clone();
        async move { p.roll_back(ctx).await }.boxed()
    }
}

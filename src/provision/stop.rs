//! Why an attempt stopped early, and how a client error decides between retry and give-up.
//! Must not: do I/O.

use crate::clients::hetzner::{ErrorClass, HetznerError};
use crate::clients::tailscale::TailscaleError;
use crate::queue::QueueError;

/// Why an attempt stopped early.
#[derive(Debug)]
pub(super) enum Stop {
    /// Try again later from the last checkpoint.
    Retry {
        error: String,
        step: &'static str,
    },
    /// Give up: roll back and fail the job.
    Fatal {
        error: String,
        step: &'static str,
    },
    LeaseLost,
    /// The stop token fired (shutdown): hand the lease back.
    Interrupted,
    /// A failpoint fired: behave as a dead process would (write nothing more).
    Crashed,
}

impl From<QueueError> for Stop {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::LeaseLost(_) => Stop::LeaseLost,
            other => Stop::Retry {
                error: format!("database: {other}"),
                step: "checkpoint",
            },
        }
    }
}

pub(super) fn hetzner_stop(step: &'static str, what: &str, e: &HetznerError) -> Stop {
    let error = format!("{what}: {e}");
    match e.class() {
        ErrorClass::Retryable => Stop::Retry { error, step },
        _ => Stop::Fatal { error, step },
    }
}

pub(super) fn tailscale_stop(step: &'static str, what: &str, e: &TailscaleError) -> Stop {
    let error = format!("{what}: {e}");
    if e.is_retryable() {
        Stop::Retry { error, step }
    } else {
        Stop::Fatal { error, step }
    }
}

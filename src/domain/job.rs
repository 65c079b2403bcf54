//! Job states, who executes a job, and which status changes are legal. No I/O, no async.
//!
//! The database enforces the same rules (a trigger refuses to move a terminal job); this module
//! is what callers consult to answer "409 illegal transition" before they write anything.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The seed's `job_status` enum, plus `cancelled`: read only. Daemons before 2026-12 wrote it;
/// a cancellation is now `failed` with `cancelled_at` (the web app knows the seed's four words
/// only, and an adopted database's enum has no `cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Provisioning,
    /// Success: "the VM is running" (the seed's word).
    Running,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Provisioning,
        JobStatus::Running,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Provisioning => "provisioning",
            JobStatus::Running => "running",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Running | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Whether a job in `self` may be moved to `to` by anyone but an operator retry.
    /// Staying in the same state is allowed (callbacks repeat); terminal states never move.
    pub fn may_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        if self == to {
            return true;
        }
        match self {
            Queued => matches!(to, Provisioning | Failed | Cancelled),
            Provisioning => matches!(to, Queued | Running | Failed | Cancelled),
            Running | Failed | Cancelled => false,
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}; expected one of: {expected}")]
pub struct UnknownVariant {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl FromStr for JobStatus {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownVariant {
                kind: "job status",
                value: s.to_owned(),
                expected: "queued, provisioning, running, failed, cancelled",
            })
    }
}

/// Who executes a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// This daemon's step machine, under a lease.
    Daemon,
    /// An external runner posting the seed's HMAC callbacks; watched by heartbeat age.
    External,
}

impl Executor {
    pub fn as_str(self) -> &'static str {
        match self {
            Executor::Daemon => "daemon",
            Executor::External => "external",
        }
    }
}

impl fmt::Display for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Executor {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "daemon" => Ok(Executor::Daemon),
            "external" => Ok(Executor::External),
            _ => Err(UnknownVariant {
                kind: "executor",
                value: s.to_owned(),
                expected: "daemon, external",
            }),
        }
    }
}

/// Checks a region name's shape; whether it is a configured region is the config's business.
pub fn valid_region_name(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Checks a business key (a Checkout Session or PaymentIntent id, or an operator's own key).
pub fn valid_business_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 255
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    #[test]
    fn transition_table() {
        // (from, to, allowed)
        let table = [
            (Queued, Provisioning, true),
            (Queued, Running, false),
            (Queued, Failed, true),
            (Queued, Cancelled, true),
            (Provisioning, Queued, true),
            (Provisioning, Running, true),
            (Provisioning, Failed, true),
            (Provisioning, Cancelled, true),
            (Running, Running, true),
            (Failed, Failed, true),
        ];
        for (from, to, allowed) in table {
            assert_eq!(from.may_become(to), allowed, "{from} -> {to}");
        }
    }

    #[test]
    fn terminal_states_never_move() {
        for from in [Running, Failed, Cancelled] {
            assert!(from.is_terminal());
            for to in JobStatus::ALL {
                assert_eq!(from.may_become(to), from == to, "{from} -> {to}");
            }
        }
        assert!(!Queued.is_terminal() && !Provisioning.is_terminal());
    }

    #[test]
    fn status_names_round_trip() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>(), Ok(s));
        }
        assert!("Running".parse::<JobStatus>().is_err());
        assert_eq!("external".parse::<Executor>(), Ok(Executor::External));
    }

    #[test]
    fn region_and_key_shapes() {
        assert!(valid_region_name("eu-central"));
        assert!(!valid_region_name("EU"));
        assert!(!valid_region_name(""));
        assert!(valid_business_key(
            "cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY"
        ));
        assert!(!valid_business_key("has space"));
        assert!(!valid_business_key(""));
    }
}

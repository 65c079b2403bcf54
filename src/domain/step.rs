//! The web app's five progress steps, derived from a job's status and its last step (seed 004's
//! `getProvisioningSteps`). Pure; no I/O.
//!
//! Which step name puts the progress where (UI steps: Queued 0, Creating Server 1, Installing
//! Dependencies 2, Configuring Agent 3, Running 4):
//!
//! | step name (who sends it)              | UI steps completed | active UI step          |
//! |---------------------------------------|--------------------|-------------------------|
//! | none yet, or unknown                  | 0                  | Creating Server         |
//! | `key_minted` (daemon)                 | 0                  | Creating Server         |
//! | `vm_created` (runner, daemon)         | 0, 1               | Installing Dependencies |
//! | `vm_running` (daemon)                 | 0, 1               | Installing Dependencies |
//! | `network_configured` (runner, daemon) | 0, 1               | Installing Dependencies |
//! | `ansible_started` (runner)            | 0, 1, 2            | Configuring Agent       |
//! | `ansible_complete` (runner)           | 0, 1, 2, 3         | Running                 |
//!
//! `key_minted` is before the server exists, so the server is still being created; the daemon's
//! `vm_running` and `network_configured` (tailnet joined) are what the runner's
//! `vm_created`/`network_configured` meant: the machine exists and is being set up.
//! A queued job has Queued active; a running job has every step completed; a failed or cancelled
//! job marks the step it stopped at (its `failed_step`, else its last step) as `error`.

use crate::domain::JobStatus;
use serde::Serialize;

/// Every step name a job can report, first to last: the daemon's steps and the runners' (seed
/// 004's `vm_created` → `network_configured` → `ansible_started` → `ansible_complete`) merged
/// in the order the table above puts them. Progress never moves backwards along it: a runner
/// callback naming an earlier step than the job's current one is a replay and changes nothing.
pub const STEP_ORDER: [&str; 6] = [
    "key_minted",
    "vm_created",
    "vm_running",
    "network_configured",
    "ansible_started",
    "ansible_complete",
];

const UI_STEPS: [(&str, &str); 5] = [
    ("queued", "Queued"),
    ("creating", "Creating Server"),
    ("installing", "Installing Dependencies"),
    ("configuring", "Configuring Agent"),
    ("running", "Running"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Completed,
    Active,
    Pending,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UiStep {
    pub id: &'static str,
    pub label: &'static str,
    pub status: StepState,
}

/// The index of the active UI step while provisioning is at `step`.
fn active_index(step: Option<&str>) -> usize {
    match step {
        Some("vm_created" | "vm_running" | "network_configured") => 2,
        Some("ansible_started") => 3,
        Some("ansible_complete") => 4,
        _ => 1,
    }
}

/// The UI steps for a job in `status` whose last step was `step` (`failed_step` for a failed job).
pub fn derive(status: JobStatus, step: Option<&str>) -> Vec<UiStep> {
    let (at, at_state) = match status {
        JobStatus::Queued => (0, StepState::Active),
        JobStatus::Provisioning => (active_index(step), StepState::Active),
        JobStatus::Running => (UI_STEPS.len(), StepState::Completed),
        JobStatus::Failed | JobStatus::Cancelled => (active_index(step), StepState::Error),
    };
    UI_STEPS
        .iter()
        .enumerate()
        .map(|(i, (id, label))| UiStep {
            id,
            label,
            status: match i.cmp(&at) {
                std::cmp::Ordering::Less => StepState::Completed,
                std::cmp::Ordering::Equal => at_state,
                std::cmp::Ordering::Greater => StepState::Pending,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepState::*;

    fn states(status: JobStatus, step: Option<&str>) -> Vec<StepState> {
        derive(status, step).into_iter().map(|s| s.status).collect()
    }

    #[test]
    fn step_order_never_moves_the_ui_backwards() {
        let ui: Vec<usize> = STEP_ORDER.iter().map(|s| active_index(Some(s))).collect();
        assert!(ui.windows(2).all(|w| w[0] <= w[1]), "{ui:?}");
    }

    #[test]
    fn seed_004_derivation_table() {
        use JobStatus::*;
        let table: [(JobStatus, Option<&str>, [StepState; 5]); 9] = [
            (Queued, None, [Active, Pending, Pending, Pending, Pending]),
            (
                Provisioning,
                None,
                [Completed, Active, Pending, Pending, Pending],
            ),
            (
                Provisioning,
                Some("key_minted"),
                [Completed, Active, Pending, Pending, Pending],
            ),
            (
                Provisioning,
                Some("vm_created"),
                [Completed, Completed, Active, Pending, Pending],
            ),
            (
                Provisioning,
                Some("network_configured"),
                [Completed, Completed, Active, Pending, Pending],
            ),
            (
                Provisioning,
                Some("ansible_started"),
                [Completed, Completed, Completed, Active, Pending],
            ),
            (
                Provisioning,
                Some("ansible_complete"),
                [Completed, Completed, Completed, Completed, Active],
            ),
            (Running, Some("vm_running"), [Completed; 5]),
            (
                Failed,
                Some("vm_running"),
                [Completed, Completed, Error, Pending, Pending],
            ),
        ];
        for (status, step, want) in table {
            assert_eq!(states(status, step), want, "{status} {step:?}");
        }
        assert_eq!(derive(Queued, None)[1].label, "Creating Server");
    }
}

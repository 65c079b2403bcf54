//! Step names: every progress step a job can report (the daemon's and the external runners'),
//! their order, and their mapping to the web app's five progress steps (seed 004's
//! `getProvisioningSteps`). Pure; no I/O.
//!
//! The daemon checkpoints `key_minted` → `vm_created` → `vm_running` → `network_configured`;
//! the old runners post `vm_created` → `network_configured` → `ansible_started` →
//! `ansible_complete` (seeds 001 and 004). Both are stored as text in `current_step`,
//! `failed_step` and `job_events.step`, which the web app reads, so the names never change.
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

use super::job::JobStatus;
use serde::Serialize;

/// A progress step. Declared in the order progress moves (the daemon's and the runners' steps
/// merged as the table above puts them): progress never moves backwards along it, so a runner
/// callback naming an earlier step than the job's current one is a replay and changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// The daemon minted the job's single-use Tailscale key (before any server exists).
    KeyMinted,
    /// A server exists (runner and daemon).
    VmCreated,
    /// The daemon saw the server running.
    VmRunning,
    /// The machine joined the tailnet (runner and daemon).
    NetworkConfigured,
    /// The runner started configuring the agent.
    AnsibleStarted,
    /// The runner finished configuring the agent.
    AnsibleComplete,
}

impl Step {
    /// Every step, first to last.
    pub const ORDER: [Step; 6] = [
        Step::KeyMinted,
        Step::VmCreated,
        Step::VmRunning,
        Step::NetworkConfigured,
        Step::AnsibleStarted,
        Step::AnsibleComplete,
    ];

    /// The steps the daemon's step machine checkpoints, in order.
    pub const DAEMON: [Step; 4] = [
        Step::KeyMinted,
        Step::VmCreated,
        Step::VmRunning,
        Step::NetworkConfigured,
    ];

    /// The name stored in the database and sent by runners.
    pub const fn as_str(self) -> &'static str {
        match self {
            Step::KeyMinted => "key_minted",
            Step::VmCreated => "vm_created",
            Step::VmRunning => "vm_running",
            Step::NetworkConfigured => "network_configured",
            Step::AnsibleStarted => "ansible_started",
            Step::AnsibleComplete => "ansible_complete",
        }
    }

    /// The step a stored or received name stands for; `None` for any other text.
    pub fn parse(name: &str) -> Option<Step> {
        Step::ORDER.into_iter().find(|s| s.as_str() == name)
    }

    /// Every name, first to last (what the queue compares a runner's step against).
    pub fn names() -> [&'static str; 6] {
        Step::ORDER.map(Step::as_str)
    }

    /// The index of the UI step that is active while provisioning is at this step.
    pub fn ui_index(self) -> usize {
        match self {
            Step::KeyMinted => 1,
            Step::VmCreated | Step::VmRunning | Step::NetworkConfigured => 2,
            Step::AnsibleStarted => 3,
            Step::AnsibleComplete => 4,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// The index of the active UI step while provisioning is at `step` (a stored name; none yet or
/// an unknown one: Creating Server).
fn active_index(step: Option<&str>) -> usize {
    step.and_then(Step::parse).map_or(1, Step::ui_index)
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
        let ui: Vec<usize> = Step::ORDER.iter().map(|s| s.ui_index()).collect();
        assert!(ui.windows(2).all(|w| w[0] <= w[1]), "{ui:?}");
        assert!(Step::ORDER.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn names_order_and_ui_steps() {
        // The names are stored and read by the web app: this table is the contract.
        let table = [
            (Step::KeyMinted, "key_minted", 1, true),
            (Step::VmCreated, "vm_created", 2, true),
            (Step::VmRunning, "vm_running", 2, true),
            (Step::NetworkConfigured, "network_configured", 2, true),
            (Step::AnsibleStarted, "ansible_started", 3, false),
            (Step::AnsibleComplete, "ansible_complete", 4, false),
        ];
        assert_eq!(Step::ORDER.len(), table.len());
        for (i, (step, name, ui, daemon)) in table.into_iter().enumerate() {
            assert_eq!(Step::ORDER[i], step);
            assert_eq!(step.as_str(), name);
            assert_eq!(step.to_string(), name);
            assert_eq!(Step::parse(name), Some(step));
            assert_eq!(Step::names()[i], name);
            assert_eq!(step.ui_index(), ui, "{name}");
            assert_eq!(Step::DAEMON.contains(&step), daemon, "{name}");
        }
        for other in [
            "",
            "VM_CREATED",
            "checkpoint",
            "done",
            "provisioning",
            "vm_created ",
        ] {
            assert_eq!(Step::parse(other), None, "{other:?}");
        }
        // The seed's four runner steps, in the seed's order.
        let seed = [
            "vm_created",
            "network_configured",
            "ansible_started",
            "ansible_complete",
        ];
        let parsed: Vec<Step> = seed.iter().filter_map(|n| Step::parse(n)).collect();
        assert_eq!(parsed.len(), 4);
        assert!(parsed.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            UI_STEPS.map(|(_, label)| label),
            [
                "Queued",
                "Creating Server",
                "Installing Dependencies",
                "Configuring Agent",
                "Running"
            ]
        );
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

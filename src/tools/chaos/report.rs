//! The chaos suite's report: the figures of one run, the verdict of each check, and their
//! rendering as the Markdown table published in BENCHMARKS.md. Computes nothing from the world.

use super::checks;
use crate::provision::reaper::ReapReport;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// Figures and verdicts of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChaosReport {
    pub jobs: usize,
    pub running: usize,
    pub failed: usize,
    pub not_terminal: usize,
    pub missing: usize,
    /// The most frequent errors of failed jobs, with counts.
    pub failure_reasons: Vec<(String, usize)>,
    pub failed_jobs: Vec<Uuid>,
    pub daemons: usize,
    pub kills: u32,
    pub restarts: u32,
    pub exits: u32,
    pub pg_restarts: u32,
    pub api_requests: u64,
    pub faults_injected: u64,
    pub retries: checks::Retries,
    pub cloud: checks::CloudFindings,
    pub reap: ReapSummary,
    pub stale_writes: Vec<checks::StaleWrite>,
    pub wall: Duration,
    pub max_failed: usize,
    /// Where the daemons' logs were kept, if they were.
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReapSummary {
    pub servers_deleted: usize,
    pub devices_deleted: usize,
    pub errors: Vec<String>,
}

impl From<ReapReport> for ReapSummary {
    fn from(r: ReapReport) -> Self {
        ReapSummary {
            servers_deleted: r.servers_deleted.len(),
            devices_deleted: r.devices_deleted.len(),
            errors: r.errors,
        }
    }
}

/// One verdict: its name, whether it held, and the figure behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl ChaosReport {
    pub fn checks(&self) -> Vec<Check> {
        let c = &self.cloud;
        let check = |name, ok, detail: String| Check { name, ok, detail };
        vec![
            check(
                "every job terminal",
                self.not_terminal == 0,
                format!("{} not terminal", self.not_terminal),
            ),
            check(
                "0 lost",
                self.missing == 0,
                format!("{} enqueued jobs missing", self.missing),
            ),
            check(
                "≤ 1 server per job",
                c.duplicate_servers == 0,
                format!("{} jobs with a duplicate server", c.duplicate_servers),
            ),
            check(
                "≤ 1 device per job",
                c.duplicate_devices == 0,
                format!("{} jobs with a duplicate device", c.duplicate_devices),
            ),
            check(
                "0 orphans after the reap",
                c.orphan_servers == 0 && c.orphan_devices == 0,
                format!("{} servers, {} devices", c.orphan_servers, c.orphan_devices),
            ),
            check(
                "0 valid unrevoked keys after the reap",
                c.valid_keys == 0,
                format!("{} valid keys", c.valid_keys),
            ),
            check(
                "instances consistent with the cloud",
                c.inconsistencies.is_empty(),
                match c.inconsistencies.first() {
                    None => "0 inconsistencies".into(),
                    Some(first) => format!("{}, e.g. {first}", c.inconsistencies.len()),
                },
            ),
            check(
                "no write by a stale lease",
                self.stale_writes.is_empty(),
                match self.stale_writes.first() {
                    None => "0 stale writes".into(),
                    Some(w) => format!(
                        "{}, e.g. {} on job {} ({:?} → {:?}): {}",
                        self.stale_writes.len(),
                        w.writer,
                        w.job_id,
                        w.old_status,
                        w.new_status,
                        w.rule
                    ),
                },
            ),
            check(
                "failed jobs within the allowance",
                self.failed <= self.max_failed,
                format!("{} failed, {} allowed", self.failed, self.max_failed),
            ),
        ]
    }

    pub fn passed(&self) -> bool {
        self.checks().iter().all(|c| c.ok)
    }

    /// The figures as a Markdown table, then one line per check.
    pub fn render(&self) -> String {
        let pct = |n: u64, of: u64| 100.0 * n as f64 / of.max(1) as f64;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line("| figure | value |".into());
        line("|---|---|".into());
        line(format!(
            "| jobs | {} enqueued: {} running, {} failed, {} not terminal, {} missing |",
            self.jobs, self.running, self.failed, self.not_terminal, self.missing
        ));
        line(format!(
            "| daemons | {} `serve` processes; {} `kill -9`, {} restarts, {} exits on their own |",
            self.daemons, self.kills, self.restarts, self.exits
        ));
        line(format!("| PostgreSQL restarts | {} |", self.pg_restarts));
        line(format!(
            "| cloud faults injected | {} of {} API requests ({:.1} %) |",
            self.faults_injected,
            self.api_requests,
            pct(self.faults_injected, self.api_requests)
        ));
        let r = &self.retries;
        line(format!(
            "| attempts that ended in a retry | {} after a lease expired, {} after a cloud error, {} other |",
            r.lease_expired, r.cloud_error, r.other
        ));
        line(format!(
            "| duplicates | {} servers, {} devices |",
            self.cloud.duplicate_servers, self.cloud.duplicate_devices
        ));
        line(format!(
            "| final reap | {} servers, {} devices deleted, {} errors |",
            self.reap.servers_deleted,
            self.reap.devices_deleted,
            self.reap.errors.len()
        ));
        line(format!(
            "| after the reap | {} orphan servers, {} orphan devices, {} valid keys |",
            self.cloud.orphan_servers, self.cloud.orphan_devices, self.cloud.valid_keys
        ));
        line(format!(
            "| inconsistent instances | {} |",
            self.cloud.inconsistencies.len()
        ));
        line(format!("| stale writes | {} |", self.stale_writes.len()));
        line(format!("| wall time | {:.0} s |", self.wall.as_secs_f64()));
        for (reason, n) in &self.failure_reasons {
            line(format!("failed ×{n}: {reason}"));
        }
        for c in self.checks() {
            line(format!(
                "{} {} ({})",
                if c.ok { "PASS" } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        if let Some(dir) = &self.logs {
            line(format!("daemon logs: {}", dir.display()));
        }
        out
    }
}

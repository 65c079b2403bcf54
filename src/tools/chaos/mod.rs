//! `provisiond chaos`: the reliability suite. Several real `provisiond serve` processes share a
//! private PostgreSQL cluster and the in-process cloud simulator; the suite `kill -9`s daemons
//! at random and restarts them, restarts PostgreSQL, injects transient cloud faults, then lets
//! every job end, runs a reap and checks the outcome (see [`ChaosReport::checks`]).
//!
//! Owns only the orchestration and its report. It never touches the machine's PostgreSQL (its
//! cluster has its own data directory and port), listens and connects on 127.0.0.1 only, stops by
//! itself (every loop is bounded), and on return or failure leaves no process or cluster behind
//! (the fleet and the cluster clean up when dropped).

pub mod checks;
pub mod cluster;
pub mod fleet;
mod report;

pub use report::{ChaosReport, Check, ReapSummary};

use crate::clients::hetzner::HetznerClient;
use crate::clients::tailscale::TailscaleClient;
use crate::db;
use crate::domain::Executor;
use crate::provision::reaper;
use crate::queue::{NewJob, Queue, QueueSettings};
use crate::secret::Secret;
use crate::sim::{FaultKind, FaultRule, Faults, LatencyProfile, SimConfig, SimHandle, Simulator};
use crate::tools::scratch::Scratch;
use crate::tools::sim_clients::SimClients;
use anyhow::Context;
use cluster::{PrivateCluster, StopMode};
use fleet::{DaemonSettings, Fleet};
use std::path::Path;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// `provisiond chaos` flags; unset ones come from the full run or, with `--short`, the short one.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ChaosArgs {
    /// The short version that `cargo test` runs (tens of jobs, a few kills, one restart).
    #[arg(long)]
    pub short: bool,
    /// Jobs to provision (distinct customers, every tenth one a repeat customer).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// `provisiond serve` processes.
    #[arg(long)]
    pub daemons: Option<usize>,
    /// `kill -9`s, spread over the run.
    #[arg(long)]
    pub kills: Option<u32>,
    /// PostgreSQL restarts (alternately fast and immediate, i.e. crash-like).
    #[arg(long)]
    pub pg_restarts: Option<u32>,
    /// Share of cloud API requests answered with a transient fault (5xx, 429, 409, timeout).
    #[arg(long)]
    pub fault_rate: Option<f64>,
    /// Keep the daemons' logs (they are kept anyway when a check fails).
    #[arg(long)]
    pub keep_logs: bool,
}

/// What one run does, with every value resolved.
#[derive(Debug, Clone)]
pub struct ChaosPlan {
    pub jobs: usize,
    pub daemons: usize,
    pub kills: u32,
    pub pg_restarts: u32,
    pub fault_rate: f64,
    /// Jobs each daemon runs at once.
    pub concurrency: usize,
    /// Gap between kills, drawn uniformly from this range.
    pub kill_every: (Duration, Duration),
    /// Retries a job may spend: every kill costs each job its daemon held an attempt.
    pub max_retries: i32,
    /// Failed jobs allowed (the goal is 0 at 20 % transient faults).
    pub max_failed: usize,
    /// How long jobs may take to end after the last kill.
    pub drain_timeout: Duration,
    pub keep_logs: bool,
}

impl ChaosPlan {
    /// ≥ 300 jobs, ≥ 50 kills, two PostgreSQL restarts, 20 % faults: the published run.
    pub fn full() -> ChaosPlan {
        ChaosPlan {
            jobs: 300,
            daemons: 3,
            kills: 50,
            pg_restarts: 2,
            fault_rate: 0.2,
            concurrency: 12,
            kill_every: (Duration::from_millis(1500), Duration::from_millis(4500)),
            max_retries: 10,
            max_failed: 0,
            drain_timeout: Duration::from_secs(600),
            keep_logs: false,
        }
    }

    /// Tens of jobs, a few kills, one PostgreSQL restart: what `cargo test` runs.
    pub fn short() -> ChaosPlan {
        ChaosPlan {
            jobs: 30,
            daemons: 2,
            kills: 5,
            pg_restarts: 1,
            kill_every: (Duration::from_millis(1000), Duration::from_millis(2500)),
            drain_timeout: Duration::from_secs(120),
            ..ChaosPlan::full()
        }
    }

    pub fn from_args(a: &ChaosArgs) -> anyhow::Result<ChaosPlan> {
        let base = if a.short {
            ChaosPlan::short()
        } else {
            ChaosPlan::full()
        };
        let plan = ChaosPlan {
            jobs: a.jobs.unwrap_or(base.jobs),
            daemons: a.daemons.unwrap_or(base.daemons),
            kills: a.kills.unwrap_or(base.kills),
            pg_restarts: a.pg_restarts.unwrap_or(base.pg_restarts),
            fault_rate: a.fault_rate.unwrap_or(base.fault_rate),
            keep_logs: a.keep_logs,
            ..base
        };
        anyhow::ensure!((1..=5000).contains(&plan.jobs), "--jobs must be 1..=5000");
        anyhow::ensure!((1..=10).contains(&plan.daemons), "--daemons must be 1..=10");
        anyhow::ensure!(plan.kills <= 1000, "--kills must be at most 1000");
        anyhow::ensure!(plan.pg_restarts <= 20, "--pg-restarts must be at most 20");
        anyhow::ensure!(
            (0.0..0.9).contains(&plan.fault_rate),
            "--fault-rate must be in [0, 0.9)"
        );
        Ok(plan)
    }
}

/// Runs the suite with `binary` as the daemon (`provisiond` itself, or the test's build).
pub async fn run(plan: &ChaosPlan, binary: &Path) -> anyhow::Result<ChaosReport> {
    let t0 = Instant::now();
    let logs = std::env::temp_dir().join(format!(
        "provisiond-chaos-logs-{}",
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&logs).context("create the log directory")?;
    let mut cluster = tokio::task::block_in_place(PrivateCluster::start)
        .context("start the private PostgreSQL cluster")?;
    eprintln!("chaos: private PostgreSQL on 127.0.0.1:{}", cluster.port());
    // The cluster is thrown away whole, so the scratch database is never dropped on its own.
    let scratch = Scratch::create(&Secret::new(cluster.url())).await?;
    let url = scratch.url.clone();
    db::migrate(&url, Duration::from_secs(10)).await?;
    checks::install_stale_write_detector(&url).await?;
    let queue = Queue::new(
        db::connect(&url, 4, Duration::from_secs(10)).await?,
        QueueSettings {
            default_max_retries: plan.max_retries,
            ..QueueSettings::default()
        },
    );
    let sim = Simulator::start(SimConfig {
        latency: LatencyProfile {
            create: Duration::from_secs(1),
            boot: Duration::from_secs(2),
            enroll: Duration::from_secs(1),
            delete: Duration::from_millis(500),
        },
        // High enough that only injected 429s happen: the budget is not what this suite tests.
        rate_limit_per_hour: 1_000_000,
        rate_limit_burst: 1_000_000,
        hang: Duration::from_secs(5),
        faults: fault_rules(plan.fault_rate),
        ..SimConfig::default()
    })
    .await?;
    let mut fleet = Fleet::new(
        binary,
        &url,
        &sim,
        &DaemonSettings {
            concurrency: plan.concurrency,
            lease_ttl: Duration::from_secs(4),
            heartbeat: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
        },
        plan.daemons,
        &logs,
    );
    let outcome = chaos_and_drain(plan, &mut cluster, &mut fleet, &queue).await;
    sim.set_faults(Faults::default());
    tokio::task::block_in_place(|| fleet.stop_all(Duration::from_secs(10)));
    let (ids, pg_restarts) =
        outcome.with_context(|| format!("daemon logs in {}", logs.display()))?;
    let mut report = verify(plan, &queue, &sim, &ids, &fleet).await?;
    if !report.passed() {
        write_diagnostics(&queue, &report, &logs).await;
    }
    report.pg_restarts = pg_restarts;
    report.wall = t0.elapsed();
    sim.shutdown().await;
    drop(fleet);
    drop(cluster);
    if report.passed() && !plan.keep_logs {
        let _ = std::fs::remove_dir_all(&logs);
    } else {
        report.logs = Some(logs);
    }
    Ok(report)
}

/// Enqueues the jobs in step with the kills, restarts PostgreSQL on schedule, then waits until
/// every job has ended (or the drain timeout). Returns the ids of the jobs enqueued and the
/// number of PostgreSQL restarts done.
async fn chaos_and_drain(
    plan: &ChaosPlan,
    cluster: &mut PrivateCluster,
    fleet: &mut Fleet,
    queue: &Queue,
) -> anyhow::Result<(Vec<Uuid>, u32)> {
    fleet.supervise()?;
    let mut ids = Vec::with_capacity(plan.jobs);
    let per_round = plan.jobs.div_ceil(plan.kills.max(1) as usize);
    let restart_at: Vec<u32> = (1..=plan.pg_restarts)
        .map(|i| i * plan.kills / (plan.pg_restarts + 1))
        .collect();
    let mut restarts_done = 0u32;
    for k in 0..plan.kills {
        enqueue_some(queue, &mut ids, per_round, plan.jobs).await?;
        let (lo, hi) = plan.kill_every;
        supervise_for(fleet, lo + (hi - lo).mul_f64(rand::random::<f64>())).await?;
        while (restarts_done as usize) < restart_at.len() && restart_at[restarts_done as usize] <= k
        {
            let mode = if restarts_done.is_multiple_of(2) {
                StopMode::Fast
            } else {
                StopMode::Immediate
            };
            eprintln!("chaos: restarting PostgreSQL ({mode:?})");
            tokio::task::block_in_place(|| cluster.restart(mode, Duration::from_secs(2)))?;
            restarts_done += 1;
        }
        let back_in = Duration::from_millis(rand::random_range(0..1500));
        if let Some(slot) = fleet.kill_random(back_in)? {
            eprintln!(
                "chaos: kill -9 {}/{}: daemon {slot} ({} of {} jobs enqueued)",
                k + 1,
                plan.kills,
                ids.len(),
                plan.jobs
            );
        }
    }
    enqueue_some(queue, &mut ids, plan.jobs, plan.jobs).await?;
    // Restarts scheduled for the end (e.g. with no kills) still happen.
    while (restarts_done as usize) < restart_at.len() {
        tokio::task::block_in_place(|| cluster.restart(StopMode::Fast, Duration::from_secs(2)))?;
        restarts_done += 1;
    }

    let deadline = Instant::now() + plan.drain_timeout;
    let mut last_note = Instant::now();
    while Instant::now() < deadline {
        supervise_for(fleet, Duration::from_millis(500)).await?;
        let Ok(jobs) = queue.get_many(&ids).await else {
            continue;
        };
        let done = jobs.iter().filter(|j| j.status().is_terminal()).count();
        if done == ids.len() {
            break;
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            eprintln!("chaos: {done}/{} jobs ended", ids.len());
            last_note = Instant::now();
        }
    }
    Ok((ids, restarts_done))
}

/// Keeps the fleet alive (restarting killed or exited daemons) for `d`.
async fn supervise_for(fleet: &mut Fleet, d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    loop {
        fleet.supervise()?;
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(100))).await;
    }
}

/// Enqueues up to `n` more jobs, until `total`. Each has a business key, so an enqueue retried
/// after an error (PostgreSQL restarting) returns the job it may already have made.
async fn enqueue_some(
    queue: &Queue,
    ids: &mut Vec<Uuid>,
    n: usize,
    total: usize,
) -> anyhow::Result<()> {
    let regions = ["eu-central", "us-east", "us-west", "ap-southeast"];
    let until = (ids.len() + n).min(total);
    while ids.len() < until {
        let i = ids.len();
        let job = NewJob {
            agent_id: Uuid::new_v4(),
            // Every tenth purchase is by the previous customer, so it waits for the first.
            user_id: Uuid::from_u128(if i % 10 == 9 { i - 1 } else { i } as u128 + 1),
            region: regions[i % regions.len()].into(),
            stripe_event_id: None,
            business_key: Some(format!("chaos-{i}")),
            executor: Executor::Daemon,
            max_retries: None,
        };
        let mut tries = 0;
        let id = loop {
            match queue.enqueue(&job).await {
                Ok(r) => break r.job().id,
                Err(e) if tries < 100 => {
                    tries += 1;
                    tracing::debug!(error = %e, "enqueue failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("enqueue kept failing"),
            }
        };
        ids.push(id);
    }
    Ok(())
}

/// Transient faults: `rate` of every API request fails with a 5xx, a 429 or a timeout (each
/// rule's probability is conditional on the earlier ones not firing, as they are checked in
/// order), and on top of that Hetzner's mutating calls meet a 409 `conflict` ("the resource has
/// changed during the request, please retry") at `rate` × 5 %. Tailscale documents no such
/// transient 409, so it gets none.
pub fn fault_rules(rate: f64) -> Faults {
    let conflict_on = [
        "POST /v1/servers",
        "DELETE /v1/servers/{id}",
        "POST /v1/servers/{id}/actions/poweron",
    ];
    let mut rules: Vec<FaultRule> = conflict_on
        .iter()
        .map(|route| FaultRule {
            route: (*route).into(),
            fault: FaultKind::Conflict,
            times: None,
            probability: Some((rate * 0.05).clamp(0.0, 1.0)),
        })
        .collect();
    let shares = [
        (FaultKind::ServerError, 0.3),
        (FaultKind::BadGateway, 0.2),
        (FaultKind::Unavailable, 0.2),
        (FaultKind::GatewayTimeout, 0.1),
        (FaultKind::Timeout, 0.1),
        (FaultKind::RateLimited, 0.1),
    ];
    let mut taken = 0.0_f64;
    for (kind, share) in shares {
        let p = rate * share / (1.0 - taken).max(f64::MIN_POSITIVE);
        taken += rate * share;
        rules.push(FaultRule {
            route: "*".into(),
            fault: kind,
            times: None,
            probability: Some(p.clamp(0.0, 1.0)),
        });
    }
    Faults {
        rules,
        ..Faults::default()
    }
}

/// For a failed run: every failed or inconsistent job with its event timeline, and the stale
/// writes, in `diagnostics.json` next to the daemons' logs (the database goes with its cluster).
async fn write_diagnostics(queue: &Queue, report: &ChaosReport, dir: &Path) {
    let suspects: Vec<Uuid> = report
        .failed_jobs
        .iter()
        .copied()
        .chain(report.cloud.inconsistencies.iter().filter_map(|line| {
            line.split_whitespace()
                .find_map(|w| Uuid::try_parse(w.trim_end_matches(':')).ok())
        }))
        .collect();
    let mut jobs = Vec::new();
    for id in suspects {
        let job = queue.get(id).await.ok().flatten();
        let events = queue.events(id).await.unwrap_or_default();
        jobs.push(serde_json::json!({ "job": job, "events": events }));
    }
    let doc = serde_json::json!({
        "inconsistencies": report.cloud.inconsistencies,
        "stale_writes": report.stale_writes,
        "jobs": jobs,
    });
    let _ = std::fs::write(
        dir.join("diagnostics.json"),
        serde_json::to_vec_pretty(&doc).unwrap_or_default(),
    );
}

/// The final reap (no grace: every job has ended) and the checks.
async fn verify(
    plan: &ChaosPlan,
    queue: &Queue,
    sim: &SimHandle,
    ids: &[Uuid],
    fleet: &Fleet,
) -> anyhow::Result<ChaosReport> {
    let tags = sim.config().tailscale_tags.clone();
    let reap = reaper::reap(
        queue,
        &HetznerClient::new(sim.hetzner_config()),
        &TailscaleClient::new(sim.tailscale_config()),
        &tags,
        Duration::ZERO,
    )
    .await;
    // Deletes take the simulated delete time; wait (bounded) until none is left in progress.
    for _ in 0..100 {
        let deleting = sim
            .state()
            .servers
            .iter()
            .any(|s| s.status == crate::sim::ServerStatus::Deleting);
        if !deleting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let jobs = queue.get_many(ids).await?;
    let instances = checks::instances(queue.pool(), ids).await?;
    let state = sim.state();
    let count = |s: crate::domain::JobStatus| jobs.iter().filter(|j| j.status() == s).count();
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for j in jobs
        .iter()
        .filter(|j| j.status() == crate::domain::JobStatus::Failed)
    {
        // Ids and counts make messages unique; group them with every digit masked.
        let key: String = j
            .error
            .as_deref()
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(120)
            .collect();
        *reasons.entry(key).or_default() += 1;
    }
    let mut failure_reasons: Vec<(String, usize)> = reasons.into_iter().collect();
    failure_reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    failure_reasons.truncate(5);
    let api_requests = state
        .requests
        .iter()
        .filter(|(route, _)| !route.contains("/_sim/"))
        .map(|(_, by)| by.values().sum::<u64>())
        .sum();
    Ok(ChaosReport {
        jobs: ids.len(),
        running: count(crate::domain::JobStatus::Running),
        failed: count(crate::domain::JobStatus::Failed),
        not_terminal: jobs.iter().filter(|j| !j.status().is_terminal()).count(),
        missing: ids.len() - jobs.len(),
        failure_reasons,
        failed_jobs: jobs
            .iter()
            .filter(|j| j.status() == crate::domain::JobStatus::Failed)
            .map(|j| j.id)
            .collect(),
        daemons: plan.daemons,
        kills: fleet.kills,
        restarts: fleet.restarts,
        exits: fleet.exits,
        pg_restarts: 0,
        api_requests,
        faults_injected: state.faults_injected(),
        retries: checks::retries(queue.pool()).await?,
        cloud: checks::cloud_findings(&state, &jobs, &instances),
        reap: reap.into(),
        stale_writes: checks::stale_writes(queue.pool()).await?,
        wall: Duration::ZERO,
        max_failed: plan.max_failed,
        logs: None,
    })
}

//! `provisiond bench fleet`: several real `provisiond serve` processes provisioning against one
//! simulated Hetzner project, to measure how they share its request budget (429s, requests per
//! VM, each daemon's share). Runs the same load twice, first with each daemon pacing itself
//! alone (`hetzner.share_budget = false`, the baseline), then with the budget shared in
//! PostgreSQL. Never run by tests; figures in BENCHMARKS.md.

use super::common::bench_job;
use crate::db;
use crate::queue::{Queue, QueueSettings};
use crate::secret::Secret;
use crate::sim::{LatencyProfile, SimConfig, Simulator};
use crate::tools::chaos::fleet::{DaemonSettings, Fleet};
use crate::tools::scratch::Scratch;
use anyhow::Context;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct FleetBenchArgs {
    /// `provisiond serve` processes.
    #[arg(long, default_value_t = 3)]
    pub daemons: usize,
    /// Jobs enqueued at once (distinct customers).
    #[arg(long, default_value_t = 300)]
    pub jobs: usize,
    /// The project's limit, requests per hour (refilled continuously).
    #[arg(long, default_value_t = 3600)]
    pub rate_limit: u32,
    /// Requests left in the project's bucket when the run starts (a project that other work
    /// has been using); the rest arrives at the refill rate.
    #[arg(long, default_value_t = 100)]
    pub burst: u32,
    /// Simulated create, boot and enrollment, each.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub create: Duration,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub boot: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub enroll: Duration,
    /// Give up a run after this long.
    #[arg(long, default_value = "40m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Only the shared-budget run (skip the baseline).
    #[arg(long)]
    pub shared_only: bool,
}

/// Both runs, the baseline first.
pub async fn fleet(server: &Secret, args: FleetBenchArgs) -> anyhow::Result<String> {
    let binary = std::env::current_exe().context("find the provisiond binary")?;
    let mut out = String::new();
    let runs: &[bool] = if args.shared_only {
        &[true]
    } else {
        &[false, true]
    };
    for &shared in runs {
        let args = args.clone();
        let binary = binary.clone();
        let report = Scratch::with(server, |url| async move {
            fleet_in(&url, &args, &binary, shared).await
        })
        .await?;
        out.push_str(&report);
    }
    Ok(out)
}

async fn fleet_in(
    url: &Secret,
    args: &FleetBenchArgs,
    binary: &std::path::Path,
    shared: bool,
) -> anyhow::Result<String> {
    db::migrate(url, Duration::from_secs(10)).await?;
    let queue = Queue::new(
        db::connect(url, 4, Duration::from_secs(10)).await?,
        QueueSettings::default(),
    );
    let tokens: Vec<Secret> = (0..args.daemons)
        .map(|d| Secret::new(format!("bench-fleet-{d}")))
        .collect();
    let sim = Simulator::start(SimConfig {
        hetzner_tokens: tokens.clone(),
        latency: LatencyProfile {
            create: args.create,
            boot: args.boot,
            enroll: args.enroll,
            delete: Duration::from_secs(5),
        },
        rate_limit_per_hour: args.rate_limit,
        rate_limit_burst: args.burst,
        ..SimConfig::default()
    })
    .await?;
    let logs = std::env::temp_dir().join(format!("provisiond-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    let mut fleet = Fleet::new(
        binary,
        url,
        &sim,
        &DaemonSettings {
            concurrency: args.jobs.div_ceil(args.daemons.max(1)),
            lease_ttl: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        },
        args.daemons,
        &logs,
    );
    fleet.set_tokens(tokens);
    fleet.set_env("PROVISIOND__HETZNER__SHARE_BUDGET", &shared.to_string());
    // The run measures the budget, not recovery: no sweep or reaper racing the daemons.
    fleet.set_env("PROVISIOND__SWEEP__SCHEDULE", "0 0 * * * *");
    fleet.set_env("PROVISIOND__PROVISION__REAPER_SCHEDULE", "0 0 0 1 1 *");
    fleet.set_env("PROVISIOND__QUEUE__BACKOFF_CAP", "30s");
    fleet.supervise()?;

    let mut ids = Vec::with_capacity(args.jobs);
    let t0 = Instant::now();
    for _ in 0..args.jobs {
        ids.push(queue.enqueue(&bench_job()).await?.job().id);
    }
    let mut last_note = Instant::now();
    let outcome = loop {
        fleet.supervise()?;
        let jobs = queue.get_many(&ids).await?;
        let done = jobs.iter().filter(|j| j.status().is_terminal()).count();
        if done == ids.len() {
            break Ok(jobs);
        }
        if t0.elapsed() > args.timeout {
            break Err(done);
        }
        if last_note.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "bench fleet ({}): {done}/{} jobs ended after {:.0} s",
                if shared { "shared" } else { "alone" },
                ids.len(),
                t0.elapsed().as_secs_f64()
            );
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let wall = t0.elapsed();
    tokio::task::block_in_place(|| fleet.stop_all(Duration::from_secs(10)));
    let state = sim.state();
    sim.shutdown().await;
    let jobs = match outcome {
        Ok(jobs) => jobs,
        Err(done) => queue.get_many(&ids).await.map_err(|e| {
            anyhow::anyhow!("{done} of {} ended before the timeout; {e}", ids.len())
        })?,
    };
    let running = jobs
        .iter()
        .filter(|j| j.status() == crate::domain::JobStatus::Running)
        .count();
    let hetzner: Vec<&str> = state
        .log
        .iter()
        .filter(|r| r.client.starts_with("hetzner#"))
        .map(|r| r.client.as_str())
        .collect();
    let shares: Vec<String> = (0..args.daemons)
        .map(|d| {
            let n = hetzner
                .iter()
                .filter(|c| **c == format!("hetzner#{d}"))
                .count();
            format!("{:.0} %", 100.0 * n as f64 / hetzner.len().max(1) as f64)
        })
        .collect();
    if let Some(first) = state.log.first() {
        let at: Vec<String> = state
            .rate_limited
            .iter()
            .map(|r| format!("{:.1}", (r.at_us - first.at_us) as f64 / 1e6))
            .collect();
        if !at.is_empty() {
            eprintln!(
                "bench fleet: 429s at {} s after the first request",
                at.join(", ")
            );
        }
    }
    let _ = std::fs::remove_dir_all(&logs);
    Ok(format!(
        "| {} | {} daemons, {} jobs, {}/h, {} left at start | {running} running after {:.0} s | **{}** × 429 | {:.2} Hetzner req/VM ({} in all) | shares {} |\n",
        if shared {
            "shared budget"
        } else {
            "each daemon alone"
        },
        args.daemons,
        ids.len(),
        args.rate_limit,
        args.burst,
        wall.as_secs_f64(),
        state.rate_limited.len(),
        hetzner.len() as f64 / ids.len().max(1) as f64,
        hetzner.len(),
        shares.join(" / "),
    ))
}

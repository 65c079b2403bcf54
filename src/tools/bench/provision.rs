//! `provisiond bench provision`: concurrent jobs through the real step machine against the
//! simulator with realistic latency, on a scratch database. Never run by tests; figures in
//! BENCHMARKS.md.

use super::common::bench_job;
use crate::db;
use crate::queue::{Queue, QueueSettings};
use crate::secret::Secret;
use crate::sim::{LatencyProfile, SimConfig, Simulator};
use crate::tools::scratch::Scratch;
use crate::tools::sim_clients::simulated_provisioner;
use crate::worker::{Worker, WorkerSettings};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct ProvisionBenchArgs {
    /// Jobs enqueued at once (distinct customers).
    #[arg(long, default_value_t = 200)]
    pub jobs: usize,
    /// Simulated `create_server` action.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub create: Duration,
    /// Simulated boot, from the end of the create action to `running`.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub boot: Duration,
    /// Simulated enrollment, from `running` to the device in the tailnet.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub enroll: Duration,
    /// The simulated project's Hetzner limit (requests per hour; the bucket holds as many).
    #[arg(long, default_value_t = 3600)]
    pub rate_limit: u32,
}

/// 200 concurrent jobs through the real step machine against the simulator.
pub async fn provision(server: &Secret, args: ProvisionBenchArgs) -> anyhow::Result<String> {
    Scratch::with(server, |url| async move { provision_in(&url, &args).await }).await
}

async fn provision_in(url: &Secret, args: &ProvisionBenchArgs) -> anyhow::Result<String> {
    db::migrate(url, Duration::from_secs(10)).await?;
    let pool = db::connect(url, 16, Duration::from_secs(10)).await?;
    let queue = Queue::new(pool.clone(), QueueSettings::default());
    let sim = Simulator::start(SimConfig {
        latency: LatencyProfile {
            create: args.create,
            boot: args.boot,
            enroll: args.enroll,
            delete: Duration::from_secs(5),
        },
        rate_limit_per_hour: args.rate_limit,
        rate_limit_burst: args.rate_limit,
        ..SimConfig::default()
    })
    .await?;
    // The daemon's production polling settings.
    let provisioner = simulated_provisioner(&sim);
    let stop = CancellationToken::new();
    let worker = Worker::new(
        queue.clone(),
        Arc::new(provisioner),
        WorkerSettings {
            owner: "bench".into(),
            concurrency: args.jobs.max(1),
            claim_batch: 64,
            poll_interval: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(5),
        },
        url.clone(),
    );
    let worker = tokio::spawn(worker.run(stop.clone()));
    let regions = ["eu-central", "us-east", "us-west", "ap-southeast"];
    let mut ids = Vec::with_capacity(args.jobs);
    let t0 = Instant::now();
    for i in 0..args.jobs {
        let mut job = bench_job();
        job.region = regions[i % regions.len()].into();
        ids.push(queue.enqueue(&job).await?.job().id);
    }
    let mut last_report = Instant::now();
    loop {
        let jobs = queue.get_many(&ids).await?;
        let done = jobs.iter().filter(|j| j.status().is_terminal()).count();
        if done == ids.len() {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{done}/{} jobs done after {:.0} s",
                ids.len(),
                t0.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "benchmark stalled at {done} of {}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = t0.elapsed();
    stop.cancel();
    worker.await?;

    let jobs = queue.get_many(&ids).await?;
    let running = jobs
        .iter()
        .filter(|j| j.status() == crate::domain::JobStatus::Running)
        .count();
    let critical = args.create + args.boot + args.enroll;
    let mut overhead: Vec<f64> = jobs
        .iter()
        .filter_map(|j| {
            j.completed_at
                .map(|c| (c - j.created_at).as_seconds_f64() - critical.as_secs_f64())
        })
        .collect();
    overhead.sort_by(f64::total_cmp);
    let pct = |p: f64| overhead[((overhead.len() as f64 - 1.0) * p).round() as usize];
    let state = sim.state();
    let count = |prefix: &str| -> u64 {
        state
            .requests
            .iter()
            .filter(|(route, _)| {
                route
                    .split_once(' ')
                    .is_some_and(|(_, path)| path.starts_with(prefix))
            })
            .map(|(_, by_status)| by_status.values().sum::<u64>())
            .sum()
    };
    let (hetzner, tailscale) = (count("/v1/"), count("/api/v2/"));
    let n = ids.len() as f64;
    let mut report = String::new();
    let mut line = |s: String| {
        eprintln!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    line(format!(
        "| jobs | {} enqueued at once; {running} running, {} failed; all done in {:.1} s |",
        ids.len(),
        ids.len() - running,
        wall.as_secs_f64()
    ));
    line(format!(
        "| simulated critical path per VM | {:.0} s (create {} s + boot {} s + enroll {} s), {} req/h limit |",
        critical.as_secs_f64(),
        args.create.as_secs(),
        args.boot.as_secs(),
        args.enroll.as_secs(),
        args.rate_limit
    ));
    line(format!(
        "| Hetzner requests per VM | **{:.2}** ({hetzner} in all) |",
        hetzner as f64 / n
    ));
    line(format!(
        "| Tailscale requests per VM | {:.2} ({tailscale} in all) |",
        tailscale as f64 / n
    ));
    line(format!(
        "| 429 responses | **{}** |",
        state.rate_limited.len()
    ));
    if !overhead.is_empty() {
        line(format!(
            "| daemon overhead (end-to-end − critical path) | p50 {:.3} s, **p99 {:.3} s**, max {:.3} s |",
            pct(0.5),
            pct(0.99),
            overhead[overhead.len() - 1]
        ));
    }
    sim.shutdown().await;
    Ok(report)
}

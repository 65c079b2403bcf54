//! `provisiond demo`: the whole pipeline on one machine with only PostgreSQL — a scratch
//! database, the built-in simulator standing in for Hetzner and Tailscale, a worker with the
//! real step machine — printing each job's steps as they happen.

use crate::db;
use crate::domain::Executor;
use crate::provision::server_name;
use crate::queue::{NewJob, Queue, QueueSettings};
use crate::secret::Secret;
use crate::sim::{LatencyProfile, SimConfig, Simulator};
use crate::tools::scratch::Scratch;
use crate::tools::sim_clients::simulated_provisioner;
use crate::worker::{Worker, WorkerSettings};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Purchases to provision (the last two belong to one customer, so they run one after the
    /// other).
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// Simulated cloud timings: `realistic` (create 10 s, boot 20 s, enroll 10 s) or `fast`.
    #[arg(long, default_value = "fast")]
    pub pace: Pace,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Pace {
    Fast,
    Realistic,
}

pub async fn run(server: &Secret, args: DemoArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        (1..=50).contains(&args.jobs),
        "--jobs must be between 1 and 50"
    );
    Scratch::with(server, |url| async move { run_in(&url, &args).await }).await
}

async fn run_in(url: &Secret, args: &DemoArgs) -> anyhow::Result<String> {
    db::migrate(url, Duration::from_secs(10)).await?;
    let queue = Queue::new(
        db::connect(url, 8, Duration::from_secs(10)).await?,
        QueueSettings::default(),
    );
    let latency = match args.pace {
        Pace::Realistic => LatencyProfile::realistic(),
        Pace::Fast => LatencyProfile {
            create: Duration::from_secs(2),
            boot: Duration::from_secs(3),
            enroll: Duration::from_secs(2),
            delete: Duration::from_secs(1),
        },
    };
    let sim = Simulator::start(SimConfig {
        latency,
        ..SimConfig::default()
    })
    .await?;
    println!(
        "simulator: Hetzner at {}  Tailscale at {}",
        sim.hetzner_base_url(),
        sim.tailscale_base_url()
    );
    let provisioner = simulated_provisioner(&sim);
    let stop = CancellationToken::new();
    let worker = Worker::new(
        queue.clone(),
        Arc::new(provisioner),
        WorkerSettings {
            owner: "demo".into(),
            concurrency: 16,
            claim_batch: 8,
            poll_interval: Duration::from_secs(2),
            heartbeat_interval: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        },
        url.clone(),
    );
    let worker = tokio::spawn(worker.run(stop.clone()));

    let regions = ["eu-central", "us-east", "us-west", "ap-southeast"];
    let repeat_customer = Uuid::new_v4();
    let mut ids = Vec::new();
    for i in 0..args.jobs {
        let user = if args.jobs >= 2 && i >= args.jobs - 2 {
            repeat_customer
        } else {
            Uuid::new_v4()
        };
        let job = queue
            .enqueue(&NewJob {
                agent_id: Uuid::new_v4(),
                user_id: user,
                region: regions[i % regions.len()].into(),
                stripe_event_id: Some(format!("evt_demo_{i}")),
                business_key: Some(format!("cs_demo_{i}")),
                executor: Executor::Daemon,
                max_retries: None,
            })
            .await?
            .into_job();
        println!(
            "enqueued job {} ({}) for customer {}",
            short(job.id),
            job.region,
            short(user)
        );
        ids.push(job.id);
    }

    // Follow the audit trail until every job is terminal.
    let mut seen = 0i64;
    let mut conn = db::establish(url, Duration::from_secs(5)).await?;
    loop {
        use crate::db::models::JobEvent;
        use crate::db::schema::job_events;
        let rows: Vec<JobEvent> = job_events::table
            .filter(job_events::id.gt(seen))
            .order(job_events::id)
            .select(JobEvent::as_select())
            .load(&mut conn)
            .await?;
        for e in rows {
            seen = e.id;
            println!(
                "{}  job {}  {:<18}  {}",
                e.at.format("%H:%M:%S%.3f"),
                short(e.job_id),
                e.step.unwrap_or_default(),
                e.message
            );
        }
        let jobs = queue.get_many(&ids).await?;
        if jobs.len() == ids.len() && jobs.iter().all(|j| j.status().is_terminal()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.cancel();
    worker.await?;

    let state = sim.state();
    let mut out = String::from(
        "\nJOB       STATUS   REGION        SERVER      PUBLIC IP        TAILNET IP\n",
    );
    for j in queue.get_many(&ids).await? {
        out.push_str(&format!(
            "{}  {:<7}  {:<12}  {:<10}  {:<15}  {}\n",
            short(j.id),
            j.status().as_str(),
            j.region,
            j.server_id.map(|s| s.to_string()).unwrap_or_default(),
            j.server_ip.unwrap_or_default(),
            j.tailscale_ip.unwrap_or_default()
        ));
        debug_assert!(
            state
                .servers
                .iter()
                .filter(|s| s.name == server_name(j.id))
                .count()
                <= 1
        );
    }
    let hetzner: u64 = state
        .requests
        .iter()
        .filter(|(route, _)| route.contains(" /v1/"))
        .map(|(_, by_status)| by_status.values().sum::<u64>())
        .sum();
    out.push_str(&format!(
        "\n{} servers, {} tailnet devices, {} Hetzner requests ({:.1} per VM), {} rate-limited\n",
        state.servers.len(),
        state.devices.len(),
        hetzner,
        hetzner as f64 / ids.len() as f64,
        state.rate_limited.len()
    ));
    sim.shutdown().await;
    Ok(out)
}

fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_owned()
}

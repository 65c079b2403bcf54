//! `provisiond bench …`: measurements reported in BENCHMARKS.md. Never run by tests.
//!
//! Each benchmark creates a scratch database on the configured server, so it never touches real
//! jobs, and drops it afterwards. The baseline (`pgbench -N`) runs in that same database in the
//! same run, so the ratio is comparable across machines.

use crate::db::{self, Pool};
use crate::domain::Executor;
use crate::queue::{NewJob, Queue, QueueSettings};
use crate::secret::Secret;
use crate::worker::{NoopHandler, Worker, WorkerSettings};
use anyhow::Context;
use diesel_async::RunQueryDsl;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone, clap::Args)]
pub struct QueueBenchArgs {
    /// Jobs for the throughput phase.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Worker loops (each like one daemon process) claiming and completing.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Jobs enqueued one at a time for the pickup-latency phase.
    #[arg(long, default_value_t = 1_000)]
    pub latency_jobs: usize,
    /// Seconds of `pgbench -N` for the baseline (0 skips it).
    #[arg(long, default_value_t = 15)]
    pub pgbench_seconds: u32,
    /// pgbench clients.
    #[arg(long, default_value_t = 8)]
    pub pgbench_clients: u32,
}

/// A scratch database on the configured server, dropped when the benchmark or demo ends.
pub(crate) struct Scratch {
    admin: Secret,
    name: String,
    pub(crate) url: Secret,
}

impl Scratch {
    pub(crate) async fn create(server: &Secret) -> anyhow::Result<Scratch> {
        let name = format!(
            "provisiond_bench_{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let mut conn = db::establish(server, Duration::from_secs(5)).await?;
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .context("create scratch database")?;
        let mut url = url::Url::parse(server.expose()).context("database URL")?;
        url.set_path(&format!("/{name}"));
        Ok(Scratch {
            admin: server.clone(),
            name,
            url: Secret::new(url.to_string()),
        })
    }

    /// Runs `f` on a fresh scratch database and drops it afterwards, whatever `f` returned.
    pub(crate) async fn with<T, F, Fut>(server: &Secret, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Secret) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let scratch = Scratch::create(server).await?;
        let result = f(scratch.url.clone()).await;
        scratch.drop_now().await;
        result
    }

    pub(crate) async fn drop_now(self) {
        if let Ok(mut conn) = db::establish(&self.admin, Duration::from_secs(5)).await {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}

pub async fn queue(server: &Secret, args: QueueBenchArgs) -> anyhow::Result<String> {
    Scratch::with(server, |url| async move { queue_in(&url, &args).await }).await
}

async fn queue_in(url: &Secret, args: &QueueBenchArgs) -> anyhow::Result<String> {
    let mut report = String::new();
    let line = |r: &mut String, s: String| {
        eprintln!("{s}");
        r.push_str(&s);
        r.push('\n');
    };
    let pgbench_tps = if args.pgbench_seconds > 0 {
        let tps = pgbench(url, args.pgbench_seconds, args.pgbench_clients)?;
        line(
            &mut report,
            format!(
                "| pgbench -N -c {} -j 2 -T {} (baseline, same database) | {tps:.0} TPS |",
                args.pgbench_clients, args.pgbench_seconds
            ),
        );
        Some(tps)
    } else {
        None
    };

    db::migrate(url, Duration::from_secs(10)).await?;
    let pool = db::connect(url, 32, Duration::from_secs(10)).await?;
    let settings = QueueSettings::default();
    let queue = Queue::new(pool.clone(), settings);

    // Enqueue, one job per call as the webhook path does, from 8 concurrent callers.
    let t0 = Instant::now();
    let per = args.jobs.div_ceil(8);
    let mut tasks = Vec::new();
    for c in 0..8 {
        let q = queue.clone();
        let n = per.min(args.jobs.saturating_sub(c * per));
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                q.enqueue(&bench_job()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let enqueue_rate = args.jobs as f64 / t0.elapsed().as_secs_f64();
    line(
        &mut report,
        format!(
            "| enqueue ({} jobs, 8 concurrent callers, one statement each) | {enqueue_rate:.0} jobs/s |",
            args.jobs
        ),
    );

    // Claim + complete with idle-free workers.
    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let workers = start_workers(&queue, url, args.workers, 512, 128, &stop);
    wait_until(
        &pool,
        "SELECT count(*) FROM provisioning_jobs WHERE status = 'running'",
        args.jobs as i64,
    )
    .await?;
    let elapsed = t0.elapsed();
    stop.cancel();
    for w in workers {
        w.await?;
    }
    let rate = args.jobs as f64 / elapsed.as_secs_f64();
    line(
        &mut report,
        format!(
            "| claim + complete ({} jobs, {} workers, noop handler) | {rate:.0} jobs/s ({:.2} s) |",
            args.jobs,
            args.workers,
            elapsed.as_secs_f64()
        ),
    );
    if let Some(tps) = pgbench_tps {
        line(
            &mut report,
            format!(
                "| ratio: claim + complete jobs/s ÷ pgbench TPS | **{:.2}×** |",
                rate / tps
            ),
        );
    }

    // Pickup latency: idle workers, jobs enqueued one at a time.
    let stop = CancellationToken::new();
    let workers = start_workers(&queue, url, args.workers, 64, 16, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ids = Vec::with_capacity(args.latency_jobs);
    for _ in 0..args.latency_jobs {
        ids.push(queue.enqueue(&bench_job()).await?.job().id);
        // Leave the workers idle again before the next one.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until(
        &pool,
        "SELECT count(*) FROM provisioning_jobs WHERE status = 'running'",
        (args.jobs + args.latency_jobs) as i64,
    )
    .await?;
    stop.cancel();
    for w in workers {
        w.await?;
    }
    let (p50, p99, max) = pickup_latency(&pool, &ids).await?;
    line(
        &mut report,
        format!(
            "| pickup latency, enqueue → claimed ({} jobs one at a time, idle workers) | p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms |",
            args.latency_jobs
        ),
    );
    Ok(report)
}

fn bench_job() -> NewJob {
    NewJob {
        agent_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        region: "eu-central".into(),
        stripe_event_id: None,
        business_key: None,
        executor: Executor::Daemon,
        max_retries: None,
    }
}

fn start_workers(
    queue: &Queue,
    url: &Secret,
    n: usize,
    concurrency: usize,
    batch: usize,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<crate::worker::WorkerReport>> {
    (0..n)
        .map(|i| {
            let w = Worker::new(
                queue.clone(),
                Arc::new(NoopHandler {
                    hold: Duration::ZERO,
                }),
                WorkerSettings {
                    owner: format!("bench-{i}"),
                    concurrency,
                    claim_batch: batch,
                    poll_interval: Duration::from_secs(5),
                    heartbeat_interval: Duration::from_secs(20),
                    shutdown_grace: Duration::from_secs(5),
                },
                url.clone(),
            );
            tokio::spawn(w.run(stop.clone()))
        })
        .collect()
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn wait_until(pool: &Pool, count_sql: &str, want: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut conn = pool.get().await.map_err(db::DbError::from)?;
        let c: Count = diesel::sql_query(count_sql.replace("count(*)", "count(*) AS n"))
            .get_result(&mut conn)
            .await?;
        if c.n >= want {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "benchmark stalled at {} of {want}",
            c.n
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(diesel::QueryableByName)]
struct Latency {
    #[diesel(sql_type = diesel::sql_types::Double)]
    p50: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    p99: f64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    max: f64,
}

/// From the enqueue statement's timestamp to the claim statement's, both on the database clock.
async fn pickup_latency(pool: &Pool, ids: &[Uuid]) -> anyhow::Result<(f64, f64, f64)> {
    let mut conn = pool.get().await.map_err(db::DbError::from)?;
    let l: Latency = diesel::sql_query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
                max(ms) AS max
         FROM (SELECT (extract(epoch FROM claimed_at - created_at) * 1000)::float8 AS ms
               FROM provisioning_jobs WHERE id = ANY($1)) s",
    )
    .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(ids)
    .get_result(&mut conn)
    .await?;
    Ok((l.p50, l.p99, l.max))
}

/// Runs `pgbench -i` then `pgbench -N` in the database at `url`; returns TPS.
pub(crate) fn pgbench(url: &Secret, seconds: u32, clients: u32) -> anyhow::Result<f64> {
    let u = url::Url::parse(url.expose()).context("database URL")?;
    let db = u.path().trim_start_matches('/').to_owned();
    let mut base = std::process::Command::new("pgbench");
    base.env("PGHOST", u.host_str().unwrap_or("127.0.0.1"))
        .env("PGPORT", u.port().unwrap_or(5432).to_string())
        .env(
            "PGUSER",
            if u.username().is_empty() {
                "postgres"
            } else {
                u.username()
            },
        );
    if let Some(p) = u.password() {
        base.env("PGPASSWORD", p);
    }
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let mut cmd = std::process::Command::new("pgbench");
        for (k, v) in base.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        let out = cmd
            .args(args)
            .arg(&db)
            .output()
            .context("run pgbench (install postgresql-contrib or postgresql client)")?;
        anyhow::ensure!(
            out.status.success(),
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(&["-i", "-s", "10", "-q"])?;
    let out = run(&[
        "-N",
        "-c",
        &clients.to_string(),
        "-j",
        "2",
        "-T",
        &seconds.to_string(),
    ])?;
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("could not read TPS from pgbench output")
}

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
    use crate::sim::{LatencyProfile, SimConfig, Simulator};

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
    let provisioner = crate::demo::simulated_provisioner(&sim);
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

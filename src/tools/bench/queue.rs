//! `provisiond bench queue`: claim + complete throughput and pickup latency of the queue, with a
//! no-op handler on a scratch database (so it never touches real jobs), against `pgbench -N` in
//! the same database and run, so the ratio is comparable across machines. Never run by tests;
//! figures in BENCHMARKS.md.

use super::common::{bench_job, pgbench};
use crate::db::{self, Pool};
use crate::queue::{Queue, QueueSettings};
use crate::secret::Secret;
use crate::tools::scratch::Scratch;
use crate::worker::{NoopHandler, Worker, WorkerSettings};
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

//! `provisiond bench http`: signed Stripe webhooks and runner heartbeats per second through the
//! real HTTP server, with p50/p99 latency, against `pgbench -N` in the same scratch database in
//! the same run. Never run by tests.
//!
//! The load generator is in-process (reqwest over 127.0.0.1), bounded by request count; no
//! worker runs, so the figures are the HTTP path alone: verify, parse, write, answer.

use super::common::pgbench;
use crate::config::{HttpConfig, Regions};
use crate::db;
use crate::domain::Executor;
use crate::http::{HttpSettings, HttpState, serve};
use crate::queue::{NewJob, Queue, QueueSettings};
use crate::secret::Secret;
use crate::tools::scratch::Scratch;
use anyhow::Context;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const STRIPE_SECRET: &str = "whsec_bench_secret";
const RUNNER_SECRET: &str = "bench-runner-secret";

#[derive(Debug, Clone, clap::Args)]
pub struct HttpBenchArgs {
    /// Stripe webhooks to send (each a new event for a new user).
    #[arg(long, default_value_t = 5_000)]
    pub webhooks: usize,
    /// Runner heartbeats to send.
    #[arg(long, default_value_t = 20_000)]
    pub heartbeats: usize,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds of `pgbench -N` for the baseline (0 skips it).
    #[arg(long, default_value_t = 15)]
    pub pgbench_seconds: u32,
    #[arg(long, default_value_t = 8)]
    pub pgbench_clients: u32,
}

pub async fn http(server: &Secret, args: HttpBenchArgs) -> anyhow::Result<String> {
    Scratch::with(server, |url| async move { http_in(&url, &args).await }).await
}

fn hmac_hex(key: &str, parts: &[&[u8]]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_bytes())
        .expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

fn stripe_request(n: usize) -> (String, String) {
    let body = serde_json::json!({
        "id": format!("evt_bench_{n}_{}", Uuid::new_v4().simple()),
        "object": "event",
        "type": "checkout.session.completed",
        "data": {"object": {
            "id": format!("cs_bench_{}", Uuid::new_v4().simple()),
            "object": "checkout.session", "payment_status": "paid",
            "metadata": {"agent_id": Uuid::new_v4(), "user_id": Uuid::new_v4(), "region": "eu-central"}
        }}
    })
    .to_string();
    let t = chrono::Utc::now().timestamp();
    let header = format!(
        "t={t},v1={}",
        hmac_hex(
            STRIPE_SECRET,
            &[t.to_string().as_bytes(), b".", body.as_bytes()]
        )
    );
    (body, header)
}

/// Sends `total` requests from `concurrency` connections; returns (req/s, p50 ms, p99 ms).
async fn load<F>(concurrency: usize, total: usize, make: F) -> anyhow::Result<(f64, f64, f64)>
where
    F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + Clone + 'static,
{
    crate::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let per = total.div_ceil(concurrency);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (client, make) = (client.clone(), make.clone());
        let range = c * per..((c + 1) * per).min(total);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(range.len());
            for n in range {
                let t = Instant::now();
                let r = make(&client, n).send().await?;
                anyhow::ensure!(r.status().is_success(), "request {n}: {}", r.status());
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await??);
    }
    let rate = total as f64 / t0.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok((rate, pct(0.50), pct(0.99)))
}

async fn http_in(url: &Secret, args: &HttpBenchArgs) -> anyhow::Result<String> {
    anyhow::ensure!(args.concurrency > 0 && args.webhooks > 0 && args.heartbeats > 0);
    let mut report = String::new();
    let mut line = |s: String| {
        eprintln!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    if args.pgbench_seconds > 0 {
        let tps = pgbench(url, args.pgbench_seconds, args.pgbench_clients)?;
        line(format!(
            "| pgbench -N -c {} -j 2 -T {} (baseline, same database) | {tps:.0} TPS |",
            args.pgbench_clients, args.pgbench_seconds
        ));
    }
    db::migrate(url, Duration::from_secs(10)).await?;
    let pool = db::connect(url, 32, Duration::from_secs(10)).await?;
    let queue = Queue::new(pool, QueueSettings::default());
    let settings = HttpSettings {
        stripe_secret: Some(Secret::new(STRIPE_SECRET)),
        runner_secret: Some(Secret::new(RUNNER_SECRET)),
        ..HttpSettings::from_config(&HttpConfig::default(), &Regions::default())?
    };
    let state = HttpState::new(
        queue.clone(),
        settings,
        Regions::default(),
        url.clone(),
        Duration::from_secs(5),
    );
    let stop = CancellationToken::new();
    let (addr, server) = serve(state, "127.0.0.1:0", stop.clone()).await?;

    let stripe_url = format!("http://{addr}/api/webhooks/stripe");
    let (rate, p50, p99) = load(args.concurrency, args.webhooks, move |c, n| {
        let (body, header) = stripe_request(n);
        c.post(&stripe_url)
            .header("Stripe-Signature", header)
            .body(body)
    })
    .await
    .context("stripe webhook load")?;
    line(format!(
        "| signed Stripe webhooks → enqueue ({} events, {} connections) | {rate:.0} req/s, p50 {p50:.2} ms, p99 {p99:.2} ms |",
        args.webhooks, args.concurrency
    ));

    // Heartbeats for 64 jobs an external runner drives.
    let mut jobs = Vec::new();
    for _ in 0..64 {
        let job = queue
            .enqueue(&NewJob {
                agent_id: Uuid::new_v4(),
                user_id: Uuid::new_v4(),
                region: "eu-central".into(),
                stripe_event_id: None,
                business_key: None,
                executor: Executor::External,
                max_retries: None,
            })
            .await?
            .into_job();
        queue.start_external(job.id, Some("bench")).await?;
        jobs.push(job.id);
    }
    let runner_url = format!("http://{addr}/api/webhooks/github");
    let (rate, p50, p99) = load(args.concurrency, args.heartbeats, move |c, n| {
        let body = format!(
            r#"{{"job_id":"{}","type":"heartbeat"}}"#,
            jobs[n % jobs.len()]
        );
        c.post(&runner_url)
            .header("X-Signature", hmac_hex(RUNNER_SECRET, &[body.as_bytes()]))
            .body(body)
    })
    .await
    .context("heartbeat load")?;
    line(format!(
        "| runner heartbeats ({} callbacks over 64 jobs, {} connections) | {rate:.0} req/s, p50 {p50:.2} ms, p99 {p99:.2} ms |",
        args.heartbeats, args.concurrency
    ));
    stop.cancel();
    server.await?;
    Ok(report)
}

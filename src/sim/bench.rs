//! A small load generator for measuring the simulator's sustained throughput.
//!
//! Owns only the measurement: N concurrent keep-alive clients issuing a fixed request mix
//! against one simulator until a request count or a time limit is reached. Must only ever be
//! pointed at a local simulator (it sends as fast as it can), and is bounded in both count and
//! time.

use crate::secret::Secret;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// `http://127.0.0.1:PORT` of a running simulator.
    pub base: url::Url,
    pub token: Secret,
    pub concurrency: usize,
    /// Stop after this many requests in total...
    pub max_requests: u64,
    /// ...or after this long, whichever comes first.
    pub max_duration: Duration,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BenchReport {
    pub requests: u64,
    /// Responses other than 2xx, plus transport errors.
    pub errors: u64,
    pub elapsed: Duration,
    pub requests_per_sec: f64,
}

/// The mix: what the daemon sends at steady state (server reads, batched action polls,
/// label-selector lists) plus the location catalogue.
const MIX: [&str; 5] = [
    "/v1/servers/{id}",
    "/v1/actions?id={a}&id={a2}",
    "/v1/servers?label_selector=managed-by%3Dprovisiond&per_page=50",
    "/v1/servers/{id}",
    "/v1/locations",
];

pub async fn run(cfg: BenchConfig) -> anyhow::Result<BenchReport> {
    crate::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.concurrency)
        .build()?;
    let base = cfg.base.as_str().trim_end_matches('/').to_owned();
    // One server to read, so the mix exercises real lookups.
    let created: serde_json::Value = http
        .post(format!("{base}/v1/servers"))
        .bearer_auth(cfg.token.expose())
        .json(&serde_json::json!({
            "name": format!("bench-{:x}", rand::random::<u32>()), "server_type": "cx23",
            "image": "ubuntu-24.04", "labels": {"managed-by": "provisiond"}, "ssh_keys": ["k"],
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["server"]["id"].as_i64().unwrap_or(0);
    let a = created["action"]["id"].as_i64().unwrap_or(0);
    let a2 = created["next_actions"][0]["id"].as_i64().unwrap_or(a);
    let paths: Arc<Vec<String>> = Arc::new(
        MIX.iter()
            .map(|p| {
                format!(
                    "{base}{}",
                    p.replace("{id}", &id.to_string())
                        .replace("{a2}", &a2.to_string())
                        .replace("{a}", &a.to_string())
                )
            })
            .collect(),
    );

    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + cfg.max_duration;
    let mut workers = Vec::with_capacity(cfg.concurrency);
    for _ in 0..cfg.concurrency {
        let (http, paths, sent, errors, token) = (
            http.clone(),
            paths.clone(),
            sent.clone(),
            errors.clone(),
            cfg.token.clone(),
        );
        let max = cfg.max_requests;
        workers.push(tokio::spawn(async move {
            loop {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if n >= max || Instant::now() >= deadline {
                    sent.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                let url = &paths[(n as usize) % paths.len()];
                let ok = match http.get(url).bearer_auth(token.expose()).send().await {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        // Read the body: a benchmark that skips it measures less than a client does.
                        ok && r.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let elapsed = start.elapsed();
    let requests = sent.load(Ordering::Relaxed);
    Ok(BenchReport {
        requests,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        requests_per_sec: requests as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
    })
}

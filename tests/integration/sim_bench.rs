//! Throughput of the simulator (ignored by default; run in release, see BENCHMARKS.md):
//!
//! `cargo test --release --test integration sim_bench:: -- --ignored --nocapture`
//!
//! Knobs: `SIM_BENCH_CONCURRENCY` (default 32), `SIM_BENCH_REQUESTS` (default 200000),
//! `SIM_BENCH_SECONDS` (default 20). The load generator runs in the same process, so the figure
//! is what the simulator sustains while sharing the machine with its client.

use provisiond::sim::bench::{BenchConfig, run};
use provisiond::sim::{SimConfig, Simulator};
use std::time::Duration;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run explicitly in release"]
async fn sustained_requests_per_second() {
    let h = Simulator::start(SimConfig {
        // The limit is not what is measured here.
        rate_limit_per_hour: u32::MAX,
        rate_limit_burst: u32::MAX,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let report = run(BenchConfig {
        base: h.tailscale_base_url(),
        token: h.hetzner_token(),
        concurrency: env_or("SIM_BENCH_CONCURRENCY", 32),
        max_requests: env_or("SIM_BENCH_REQUESTS", 200_000),
        max_duration: Duration::from_secs(env_or("SIM_BENCH_SECONDS", 20)),
    })
    .await
    .unwrap();
    println!(
        "sim bench: {} requests in {:.2}s = {:.0} req/s, {} errors",
        report.requests,
        report.elapsed.as_secs_f64(),
        report.requests_per_sec,
        report.errors
    );
    assert_eq!(report.errors, 0);
    assert!(report.requests > 0);
    h.shutdown().await;
}

/// Serves a simulator for an external load generator (wrk), since `provisiond sim` is wired in
/// `main.rs` elsewhere: `SIM_BENCH_LISTEN=127.0.0.1:8099 SIM_BENCH_SECONDS=30 cargo test --release
/// --test integration sim_bench::serve_for_external_load -- --ignored --nocapture`, then in another shell
/// `wrk -t2 -c32 -d10s -H 'Authorization: Bearer sim-hetzner-token' http://127.0.0.1:8099/v1/servers/100000001`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark helper: run explicitly in release"]
async fn serve_for_external_load() {
    let h = Simulator::start(SimConfig {
        listen: env_or("SIM_BENCH_LISTEN", "127.0.0.1:8099".parse().unwrap()),
        rate_limit_per_hour: u32::MAX,
        rate_limit_burst: u32::MAX,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let created = provisiond::tls::http_client()
        .post(format!("{}/servers", h.hetzner_base_url()))
        .bearer_auth(h.hetzner_token().expose())
        .json(
            &serde_json::json!({"name": "bench", "server_type": "cx23", "image": "ubuntu-24.04",
                                  "labels": {"managed-by": "provisiond"}, "ssh_keys": ["k"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    println!("serving on {} (server 100000001)", h.addr);
    tokio::time::sleep(Duration::from_secs(env_or("SIM_BENCH_SECONDS", 30))).await;
    println!("served {} requests", h.state().total_requests);
    h.shutdown().await;
}

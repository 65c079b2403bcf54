//! The process-wide Prometheus registry and the typed functions that record into it.
//!
//! Owns: every metric this daemon exports, their names, help texts and label sets, and the text
//! encoding `/metrics` serves. Must not: do I/O (the `/metrics` handler reads the database and
//! hands the numbers to [`set_jobs_by_status`] and [`set_oldest_queued_age`]), or take ids,
//! user input or free text as label values. Every label value is one of a small fixed set (a
//! step name, an API name, a templated endpoint such as `/servers/{id}`, a status code, an
//! outcome word), so the number of series stays bounded however many jobs run.
//!
//! Why `prometheus-client`: it is the Prometheus project's own Rust client (OpenMetrics text,
//! typed label sets, no global macros, no unsafe), maintained alongside the other official
//! clients. Recording is a hash lookup plus an atomic add; nothing here blocks.

use crate::domain::JobStatus;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

type Labels<const N: usize> = [(&'static str, String); N];
type Counters<const N: usize> = Family<Labels<N>, Counter>;
type Histograms<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;
type Gauges<const N: usize> = Family<Labels<N>, Gauge>;

struct Metrics {
    registry: Registry,
    claim_latency: Histogram,
    lease_lost: Counter,
    step_duration: Histograms<2>,
    api_calls: Counters<3>,
    rate_limit_remaining: Gauges<1>,
    rollbacks: Counters<1>,
    orphans_reaped: Counters<1>,
    webhooks: Counters<2>,
    jobs: Gauges<1>,
    oldest_queued_age: Gauge<f64, AtomicU64>,
    http_evictions: Counter,
    claim_loop_ran: Gauge<f64, AtomicU64>,
}

/// Seconds, 10 ms to ~80 min: claim latency is sub-second, a step waiting on a VM takes minutes.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 19))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("provisiond");
    let claim_latency = seconds_histogram();
    registry.register(
        "job_claim_latency_seconds",
        "Time from a job becoming claimable (created or run_after) to its claim",
        claim_latency.clone(),
    );
    let lease_lost = Counter::default();
    registry.register(
        "lease_lost",
        "Fenced writes that found their lease taken (job reclaimed or finished elsewhere)",
        lease_lost.clone(),
    );
    let step_duration: Histograms<2> = Family::new_with_constructor(seconds_histogram);
    registry.register(
        "step_duration_seconds",
        "Provisioning step durations by step and outcome (ok|error)",
        step_duration.clone(),
    );
    let api_calls = Counters::<3>::default();
    registry.register(
        "api_calls",
        "Calls to Hetzner and Tailscale by api, templated endpoint and response code",
        api_calls.clone(),
    );
    let rate_limit_remaining = Gauges::<1>::default();
    registry.register(
        "rate_limit_remaining",
        "Requests left in the current rate-limit window, as the API last reported",
        rate_limit_remaining.clone(),
    );
    // The words the callers pass (src/provision). Created at zero so that the first rollback left
    // to the reaper, or the first orphan, is an increase Prometheus can see: a series that is
    // born at 1 has no earlier sample, and `increase()` over it is 0.
    let rollbacks = Counters::<1>::default();
    for outcome in ["complete", "left_to_reaper"] {
        let _ = rollbacks.get_or_create(&[("outcome", outcome.to_owned())]);
    }
    registry.register(
        "rollbacks",
        "Rollbacks of partly provisioned jobs by outcome",
        rollbacks.clone(),
    );
    let orphans_reaped = Counters::<1>::default();
    for kind in ["server", "device"] {
        let _ = orphans_reaped.get_or_create(&[("kind", kind.to_owned())]);
    }
    registry.register(
        "orphans_reaped",
        "Cloud resources deleted because no job owns them, by kind",
        orphans_reaped.clone(),
    );
    let webhooks = Counters::<2>::default();
    registry.register(
        "webhooks",
        "Inbound webhooks and runner callbacks by source and outcome",
        webhooks.clone(),
    );
    let jobs = Gauges::<1>::default();
    registry.register(
        "jobs",
        "Jobs per status, read from the database at scrape time",
        jobs.clone(),
    );
    let oldest_queued_age = Gauge::<f64, AtomicU64>::default();
    registry.register(
        "oldest_queued_job_age_seconds",
        "Age of the oldest claimable queued job (0 when none), read at scrape time",
        oldest_queued_age.clone(),
    );
    let http_evictions = Counter::default();
    registry.register(
        "http_connections_evicted",
        "Idle or half-open HTTP connections closed to admit a new one at http.max_connections",
        http_evictions.clone(),
    );
    // Liveness of the claim loop itself, which the HTTP server answering scrapes cannot show: a
    // wedged loop with a live listener still passes `up`. 0 until a worker runs (worker.enabled
    // = false, or `serve` still starting), which the alert rule excludes.
    let claim_loop_ran = Gauge::<f64, AtomicU64>::default();
    registry.register(
        "worker_last_claim_loop_timestamp_seconds",
        "Unix time this process's claim loop last ran (every worker.poll_interval at least); 0 without a worker",
        claim_loop_ran.clone(),
    );
    // Constant 1 with the version as its label: which versions run during a rolling upgrade,
    // and one series per daemon that the dashboard's variables list instances from.
    let build_info = Gauges::<1>::default();
    build_info
        .get_or_create(&[("version", env!("CARGO_PKG_VERSION").to_owned())])
        .set(1);
    registry.register(
        "build_info",
        "Always 1; the version label says which provisiond is running",
        build_info,
    );
    Metrics {
        registry,
        claim_latency,
        lease_lost,
        step_duration,
        api_calls,
        rate_limit_remaining,
        rollbacks,
        orphans_reaped,
        webhooks,
        jobs,
        oldest_queued_age,
        http_evictions,
        claim_loop_ran,
    }
});

/// A worker claimed a job `latency` after it became claimable.
pub fn job_claimed(latency: Duration) {
    METRICS.claim_latency.observe(latency.as_secs_f64());
}

/// The worker's claim loop went round once (claimed, found nothing, or waited out a poll).
pub fn worker_claim_loop_ran() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    METRICS.claim_loop_ran.set(now.as_secs_f64());
}

/// A fenced write found its lease gone.
pub fn lease_lost() {
    METRICS.lease_lost.inc();
}

/// A provisioning step ended. `step` is one of the step machine's fixed names.
pub fn step_finished(step: &str, duration: Duration, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    METRICS
        .step_duration
        .get_or_create(&[("step", step.to_owned()), ("outcome", outcome.to_owned())])
        .observe(duration.as_secs_f64());
}

/// One call to an external API. `api` is `hetzner` or `tailscale`; `endpoint` is the request
/// path, templated or not (see [`endpoint_template`]); `code` is the HTTP status or a transport
/// error word (`timeout`, `connect`).
pub fn api_call(api: &str, endpoint: &str, code: &str) {
    METRICS
        .api_calls
        .get_or_create(&[
            ("api", api.to_owned()),
            ("endpoint", endpoint_template(endpoint)),
            ("code", code.to_owned()),
        ])
        .inc();
}

/// The path words of the Hetzner and Tailscale APIs we call: collections and action verbs.
/// Anything else in a path is a value (an id, a key id, a tailnet name).
const ENDPOINT_WORDS: &[&str] = &[
    "actions",
    "api",
    "device",
    "devices",
    "keys",
    "locations",
    "name",
    "oauth",
    "poweroff",
    "poweron",
    "reboot",
    "reset",
    "server_types",
    "servers",
    "shutdown",
    "tags",
    "tailnet",
    "token",
    "v1",
    "v2",
];

/// `endpoint` with every segment that is not a known API word (or already a `{placeholder}`)
/// replaced by `{id}` (`{tailnet}` after `tailnet`). An allow-list, not a guess at what an id
/// looks like: Tailscale key ids such as `kAbCDEFCNTRL` have no digit, and a label must never
/// carry one whatever its characters, or the series count grows with every key.
pub fn endpoint_template(endpoint: &str) -> String {
    let path = endpoint.split(['?', '#']).next().unwrap_or_default();
    let mut prev = "";
    let mut out = Vec::new();
    for seg in path.split('/') {
        let keep = seg.is_empty()
            || ENDPOINT_WORDS.contains(&seg)
            || (seg.starts_with('{') && seg.ends_with('}') && prev != "tailnet");
        out.push(if keep {
            seg
        } else if prev == "tailnet" {
            "{tailnet}"
        } else {
            "{id}"
        });
        prev = seg;
    }
    out.join("/")
}

/// An idle or half-open HTTP connection was closed to make room at `http.max_connections`.
pub fn http_connection_evicted() {
    METRICS.http_evictions.inc();
}

/// The rate-limit budget an API last reported.
pub fn rate_limit_remaining(api: &str, n: u64) {
    METRICS
        .rate_limit_remaining
        .get_or_create(&[("api", api.to_owned())])
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// A rollback ended with `outcome` (e.g. `done`, `partial`, `failed`).
pub fn rollback(outcome: &str) {
    METRICS
        .rollbacks
        .get_or_create(&[("outcome", outcome.to_owned())])
        .inc();
}

/// An orphaned resource of `kind` (`server`, `auth_key`, `device`) was deleted.
pub fn orphan_reaped(kind: &str) {
    METRICS
        .orphans_reaped
        .get_or_create(&[("kind", kind.to_owned())])
        .inc();
}

/// An inbound webhook from `source` (`stripe`, `runner`) ended with `outcome` (a fixed word
/// such as `enqueued`, `duplicate`, `ignored`, `bad_signature`).
pub fn webhook(source: &str, outcome: &str) {
    METRICS
        .webhooks
        .get_or_create(&[
            ("source", source.to_owned()),
            ("outcome", outcome.to_owned()),
        ])
        .inc();
}

/// Sets the jobs-per-status gauges; statuses missing from `counts` are set to 0.
pub fn set_jobs_by_status(counts: &[(JobStatus, i64)]) {
    for status in JobStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n);
        METRICS
            .jobs
            .get_or_create(&[("status", status.as_str().to_owned())])
            .set(n);
    }
}

/// Sets the age of the oldest claimable queued job (zero when there is none).
pub fn set_oldest_queued_age(age: Duration) {
    METRICS.oldest_queued_age.set(age.as_secs_f64());
}

/// The registry in Prometheus/OpenMetrics text format.
pub fn encode_text() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &METRICS.registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_values_appear_in_the_text() {
        webhook("stripe", "test_outcome");
        step_finished("test_step", Duration::from_millis(20), false);
        api_call("hetzner", "/servers/{id}", "429");
        rate_limit_remaining("hetzner", 3599);
        set_jobs_by_status(&[(JobStatus::Queued, 7)]);
        let text = encode_text();
        assert!(
            text.contains(r#"provisiond_webhooks_total{source="stripe",outcome="test_outcome"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"provisiond_step_duration_seconds_count{step="test_step",outcome="error"} 1"#
        ));
        assert!(text.contains(r#"endpoint="/servers/{id}",code="429"}"#));
        assert!(text.contains(r#"provisiond_rate_limit_remaining{api="hetzner"} 3599"#));
        assert!(text.contains(r#"provisiond_jobs{status="queued"} 7"#));
        assert!(text.contains(r#"provisiond_jobs{status="cancelled"} 0"#));
    }

    #[test]
    fn an_id_never_reaches_the_endpoint_label_whatever_its_characters() {
        for (path, want) in [
            // Tailscale key and node ids without a digit (the leak this guards against).
            (
                "/tailnet/{tailnet}/keys/kAbCDEFCNTRL",
                "/tailnet/{tailnet}/keys/{id}",
            ),
            ("/tailnet/-/keys/kXyZCNTRL", "/tailnet/{tailnet}/keys/{id}"),
            ("/tailnet/example.com/devices", "/tailnet/{tailnet}/devices"),
            ("/device/nodeABCDEF", "/device/{id}"),
            (
                "/servers/42/actions/poweron",
                "/servers/{id}/actions/poweron",
            ),
            ("/servers/{id}", "/servers/{id}"),
            ("/actions?id=1&id=2", "/actions"),
            ("/server_types", "/server_types"),
            ("/tailnet/{id}/keys", "/tailnet/{tailnet}/keys"),
        ] {
            assert_eq!(endpoint_template(path), want, "{path}");
        }
        api_call("tailscale", "/tailnet/{tailnet}/keys/kSecretCNTRL", "200");
        let text = encode_text();
        assert!(!text.contains("kSecretCNTRL"), "{text}");
        assert!(text.contains(r#"api="tailscale",endpoint="/tailnet/{tailnet}/keys/{id}""#));
    }
}

//! Keeps the monitoring that ships in `ops/` true: the alert rules pass `promtool check rules`,
//! `promtool test rules` passes with a firing case for every alert, the dashboard's queries parse
//! as PromQL, and every metric the dashboard or the rules name is one the daemon exposes (read
//! from `provisiond::metrics::encode_text()`, not from a list kept here).
//!
//! promtool is a hard requirement, never a silent skip: CI (`.ci/run`) installs Debian's
//! `prometheus` package, which ships it.

use provisiond::domain::JobStatus;
use provisiond::metrics;
use provisiond::queue::{Queue, QueueSettings};
use provisiond::worker::{NoopHandler, Worker, WorkerSettings};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

const RULES: &str = "ops/prometheus/provisiond.rules.yml";
const RULE_TESTS: &str = "ops/prometheus/provisiond.rules.test.yml";
const DASHBOARD: &str = "ops/grafana/provisiond.json";
/// Series the queries may use that Prometheus itself makes, not the daemon.
const PROMETHEUS_OWN: [&str; 2] = ["up", "ALERTS"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Runs promtool, failing the test (not skipping it) when promtool is not installed.
fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo(""))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it (Debian: `apt-get install prometheus`; \
                 .ci/run does this) — these checks must not be skipped"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// --- the rules file, read line by line (it is written in one style: see its header) ---------

fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Every `expr:`, inline or as a `>-` block of more-indented lines.
fn rule_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value != ">-" && value != ">" && value != "|" {
            exprs.push(value.to_owned());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .map(|l| l.trim())
            .collect();
        exprs.push(block.join(" "));
    }
    exprs
}

/// Alerts that some `alert_rule_test` expects to fire (a non-empty `exp_alerts`).
fn alerts_tested_firing(tests: &str) -> BTreeSet<String> {
    let mut firing = BTreeSet::new();
    let mut current: Option<String> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let rest = rest.split('#').next().unwrap_or("").trim();
            if let (Some(name), false) = (current.take(), rest == "[]") {
                firing.insert(name);
            }
        }
    }
    firing
}

// --- the dashboard ---------------------------------------------------------------------------

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON")
}

fn panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        // Panels inside a collapsed row.
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (panel title, expr) for every query target.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            out.push((
                p["title"].as_str().unwrap_or("?").to_owned(),
                expr.to_owned(),
            ));
        }
    }
    out
}

/// The selector of each `label_values(selector, label)` variable query.
fn variable_selectors(dash: &serde_json::Value) -> Vec<String> {
    let vars = dash["templating"]["list"].as_array().expect("templating");
    vars.iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            let q = q.expect("a query variable has a query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .unwrap_or_else(|| {
                    panic!("variable query {q:?} is not label_values(selector, label)")
                });
            inner.0.to_owned()
        })
        .collect()
}

/// Grafana's variables replaced by values Prometheus accepts, for checking syntax and names.
fn without_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
        .replace("$job", "provisiond")
}

// --- metric names in PromQL ------------------------------------------------------------------

const KEYWORDS: [&str; 22] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
];

/// Keywords followed by a list of label names, not of expressions.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names an expression selects: identifiers that are not a keyword, an aggregation,
/// a function (followed by `(`) or a label (inside `{}`, `by (…)` and the like). Strings,
/// label matchers and `[…]` ranges are skipped whole.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_until(&chars, i, '}'),
            '[' => i = skip_until(&chars, i, ']'),
            '(' if skip_label_list => {
                i = skip_until(&chars, i, ')');
                skip_label_list = false;
            }
            '$' | '0'..='9' | '.' => {
                i += 1;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i]))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if GROUPING.contains(&word.as_str()) {
                    // `group_left` may come without a label list.
                    skip_label_list = next == Some(&'(');
                } else if !KEYWORDS.contains(&word.as_str()) && next != Some(&'(') {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// Index just past the `close` that ends the group opened at `start`, skipping strings in it.
fn skip_until(chars: &[char], start: usize, close: char) -> usize {
    let mut i = start + 1;
    while i < chars.len() && chars[i] != close {
        i = if "\"'`".contains(chars[i]) {
            skip_string(chars, i)
        } else {
            i + 1
        };
    }
    i + 1
}

// --- what the daemon exposes -------------------------------------------------------------------

/// Records once through every public recorder, so labelled families have samples too.
fn record_one_of_each() {
    metrics::job_claimed(Duration::from_millis(30));
    metrics::lease_lost();
    metrics::step_finished("server_created", Duration::from_secs(3), true);
    metrics::api_call("hetzner", "/servers", "201");
    metrics::rate_limit_remaining("hetzner", 3599);
    metrics::rollback("complete");
    metrics::orphan_reaped("server");
    metrics::webhook("stripe", "enqueued");
    metrics::set_jobs_by_status(&[(JobStatus::Queued, 1)]);
    metrics::set_oldest_queued_age(Duration::from_secs(2));
    metrics::worker_claim_loop_ran();
}

/// (family name, type) from the `# TYPE` lines, which list a family even before any sample.
fn exposed_families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE <name> <type>");
            (name.to_owned(), kind.trim().to_owned())
        })
        .collect()
}

/// The series names a query can select for a family, by the exposition format's suffix rules.
fn sample_names(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{name}_total"), format!("{name}_created")],
        "histogram" => ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect(),
        "info" => vec![format!("{name}_info")],
        _ => vec![name.to_owned()],
    }
}

/// The names queries may select, checked against the samples really printed.
fn exposed_names() -> BTreeSet<String> {
    record_one_of_each();
    let text = metrics::encode_text();
    let families = exposed_families(&text);
    assert!(families.len() >= 10, "too few families in:\n{text}");
    let allowed: BTreeSet<String> = families
        .iter()
        .flat_map(|(n, k)| sample_names(n, k))
        .collect();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        assert!(
            allowed.contains(name),
            "sample {name} is not derived from a # TYPE line"
        );
    }
    for (family, kind) in &families {
        let sampled = text.lines().any(|l| {
            sample_names(family, kind)
                .iter()
                .any(|s| l.starts_with(s.as_str()))
        });
        assert!(
            sampled,
            "{family} has no sample: record through its recorder in record_one_of_each"
        );
    }
    allowed
}

// --- tests -----------------------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check_rules() {
    let (ok, out) = promtool(&["check", "rules", RULES]);
    assert!(ok, "promtool check rules {RULES}:\n{out}");
}

#[test]
fn scrape_example_passes_promtool_check_config() {
    let (ok, out) = promtool(&["check", "config", "ops/prometheus/scrape.example.yml"]);
    assert!(ok, "promtool check config:\n{out}");
}

#[test]
fn alert_rule_tests_pass_and_every_alert_has_a_firing_case() {
    let (ok, out) = promtool(&["test", "rules", RULE_TESTS]);
    assert!(ok, "promtool test rules {RULE_TESTS}:\n{out}");
    let alerts = alert_names(&read(RULES));
    assert!(alerts.len() >= 8, "alerts found: {alerts:?}");
    let firing = alerts_tested_firing(&read(RULE_TESTS));
    let untested: Vec<&String> = alerts.iter().filter(|a| !firing.contains(*a)).collect();
    assert!(
        untested.is_empty(),
        "no firing case in {RULE_TESTS} for {untested:?}"
    );
    let unknown: Vec<&String> = firing.iter().filter(|a| !alerts.contains(a)).collect();
    assert!(
        unknown.is_empty(),
        "{RULE_TESTS} tests alerts not in {RULES}: {unknown:?}"
    );
}

#[test]
fn every_rule_has_a_summary_and_a_description_saying_what_to_do() {
    let rules = read(RULES);
    let alerts = alert_names(&rules);
    let summaries = rules.matches("summary:").count();
    let descriptions = rules.matches("description:").count();
    assert_eq!(summaries, alerts.len(), "one summary per alert");
    assert_eq!(descriptions, alerts.len(), "one description per alert");
}

#[test]
fn dashboard_queries_parse_as_promql() {
    let dash = dashboard();
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 20, "queries found: {}", exprs.len());
    // promtool has no "check expression"; a recording rule per query gets the same parser.
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in exprs.iter().enumerate() {
        assert!(
            !expr.trim().is_empty(),
            "panel {title:?} has a target without expr"
        );
        let expr = serde_json::to_string(&without_grafana_variables(expr)).unwrap();
        file.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {expr}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-queries.yml");
    std::fs::write(&path, &file).unwrap();
    let (ok, out) = promtool(&["check", "rules", path.to_str().unwrap()]);
    assert!(ok, "a dashboard query is not valid PromQL:\n{out}\n{file}");
}

#[test]
fn dashboard_is_importable_with_a_prometheus_datasource_variable() {
    let dash = dashboard();
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 30);
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "datasource"
            && v["query"] == "prometheus"),
        "no datasource variable of type prometheus"
    );
    let ids: Vec<u64> = panels(&dash)
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let unique: BTreeSet<&u64> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "panel ids are unique");
    for p in panels(&dash).into_iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}");
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "a target of {title:?}"
            );
        }
    }
}

#[test]
fn every_alert_has_a_dashboard_panel() {
    let dash = dashboard();
    let titles: BTreeSet<&str> = panels(&dash)
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for alert in alert_names(&read(RULES)) {
        assert!(titles.contains(alert.as_str()), "no panel titled {alert}");
    }
}

#[test]
fn metric_names_are_read_from_promql_not_from_labels_functions_or_strings() {
    let expr = r#"sum by (api, code) (rate(provisiond_api_calls_total{code="429", x=~"a{b}"}[5m]))
        / on (api) group_left max without (instance) (provisiond_rate_limit_remaining offset 5m)
        > 0.2 and (time() - up{job=~"$job"} > 1e3) or vector(0)"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "provisiond_api_calls_total",
            "provisiond_rate_limit_remaining",
            "up"
        ]
    );
}

#[test]
fn dashboard_and_rules_use_only_metrics_the_daemon_exposes() {
    let exposed = exposed_names();
    let dash = dashboard();
    let mut used: Vec<(String, String)> = Vec::new();
    for (title, expr) in dashboard_exprs(&dash) {
        let expr = without_grafana_variables(&expr);
        used.extend(
            metric_names(&expr)
                .into_iter()
                .map(|n| (format!("panel {title:?}"), n)),
        );
    }
    for selector in variable_selectors(&dash) {
        let names = metric_names(&without_grafana_variables(&selector));
        used.extend(
            names
                .into_iter()
                .map(|n| ("a dashboard variable".to_owned(), n)),
        );
    }
    let rule_exprs = rule_exprs(&read(RULES));
    assert_eq!(
        rule_exprs.len(),
        alert_names(&read(RULES)).len(),
        "one expr per alert"
    );
    for expr in rule_exprs {
        used.extend(
            metric_names(&expr)
                .into_iter()
                .map(|n| (RULES.to_owned(), n)),
        );
    }
    let unknown: Vec<&(String, String)> = used
        .iter()
        .filter(|(_, n)| !exposed.contains(n) && !PROMETHEUS_OWN.contains(&n.as_str()))
        .collect();
    assert!(unknown.is_empty(), "not exposed by the daemon: {unknown:?}");
    // And the other way round: the dashboard shows every family the daemon exports.
    let text = metrics::encode_text();
    for (family, kind) in exposed_families(&text) {
        let shown = used
            .iter()
            .any(|(w, n)| w.starts_with("panel") && sample_names(&family, &kind).contains(n));
        assert!(
            shown,
            "{family} is exported but no dashboard panel queries it"
        );
    }
}

#[test]
fn counters_the_rules_alert_on_exist_at_zero_before_their_first_event() {
    // Nothing in this binary rolls back to the reaper or reaps a device: these series can only
    // come from being created at registration. `increase()` misses a series born at 1.
    let text = metrics::encode_text();
    for series in [
        r#"provisiond_rollbacks_total{outcome="left_to_reaper"} "#,
        r#"provisiond_orphans_reaped_total{kind="device"} "#,
        "provisiond_lease_lost_total ",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(series)),
            "no {series}in\n{text}"
        );
    }
}

// --- the liveness gauge ProvisiondClaimLoopStalled reads ----------------------------------------

fn claim_loop_stamp() -> f64 {
    let text = metrics::encode_text();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("provisiond_worker_last_claim_loop_timestamp_seconds "))
        .expect("the claim-loop gauge is exported");
    line.trim().parse().expect("a number")
}

/// Waits for the gauge to move past `t`; a stalled loop never does, hence the bound.
async fn stamp_after(t: f64) -> f64 {
    for _ in 0..2000 {
        let v = claim_loop_stamp();
        if v > t {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the claim-loop gauge stayed at or below {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_keeps_stamping_its_claim_loop_gauge() {
    let db = crate::support::TestDb::new().await;
    let queue = Queue::new(db.pool().await, QueueSettings::default());
    let settings = WorkerSettings {
        owner: "observability-test".to_owned(),
        concurrency: 2,
        claim_batch: 2,
        // Short, so an idle loop goes round many times while we watch.
        poll_interval: Duration::from_millis(20),
        heartbeat_interval: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
    };
    let handler = Arc::new(NoopHandler {
        hold: Duration::ZERO,
    });
    let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let stop = CancellationToken::new();
    let worker = Worker::new(queue, handler, settings, db.url.clone());
    let task = tokio::spawn(worker.run(stop.clone()));
    // Not only at start: with no job at all, every poll stamps it again.
    let first = stamp_after(started.as_secs_f64()).await;
    stamp_after(first).await;
    stop.cancel();
    task.await.unwrap();
}

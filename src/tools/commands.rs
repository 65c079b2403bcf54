//! The bodies of `provisiond`'s subcommands. Each returns the text to print on stdout (JSON
//! with `--json`); an error becomes one line on stderr and a non-zero exit (`main.rs`). Must
//! not: print a secret, or parse arguments (that is `cli`).

use super::cli::{BenchCommand, EnqueueArgs};
use crate::app;
use crate::config::Config;
use crate::domain::{Executor, JobStatus};
use crate::queue::NewJob;
use crate::secret::Secret;
use anyhow::Context;
use uuid::Uuid;

/// Appends a line to the command's output. Writing to a String cannot fail.
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

/// `provisiond migrate [--dry-run]`: all pending migrations in one transaction after the
/// preflight, or the plan of what they would add (docs/MIGRATIONS.md).
pub async fn migrate(
    config: &Config,
    dry_run: bool,
    lock_timeout: std::time::Duration,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let url = config.database_url()?;
    let opts = crate::db::MigrateOptions {
        dry_run,
        lock_timeout,
    };
    match crate::db::migrate_with(url, config.database.connect_timeout, opts).await? {
        crate::db::Outcome::Planned(plan) => w!(out, "{plan}"),
        crate::db::Outcome::Applied(applied) if applied.is_empty() => {
            w!(out, "migrations: up to date")
        }
        crate::db::Outcome::Applied(applied) => {
            w!(out, "applied migrations: {}", applied.join(", "))
        }
    }
    Ok(out)
}

/// `provisiond serve`: until SIGTERM or ctrl-c, or until one of its tasks dies (an error).
pub async fn serve(config: Config) -> anyhow::Result<String> {
    app::serve(config, app::shutdown_on_signals()).await?;
    Ok(String::new())
}

/// `provisiond enqueue`.
pub async fn enqueue(config: &Config, args: EnqueueArgs) -> anyhow::Result<String> {
    let EnqueueArgs {
        agent,
        user,
        region,
        key,
        external,
    } = args;
    if !config.regions.contains(&region) {
        anyhow::bail!(
            "unknown region {region:?}; configured regions: {}",
            config.regions.names().join(", ")
        );
    }
    if let Some(k) = &key
        && !crate::domain::valid_business_key(k)
    {
        anyhow::bail!("--key must be 1-255 characters of letters, digits, _ - . :");
    }
    let queue = app::open_queue(config, false).await?;
    let new = NewJob {
        agent_id: agent,
        user_id: user,
        region,
        stripe_event_id: None,
        business_key: key,
        executor: if external {
            Executor::External
        } else {
            Executor::Daemon
        },
        max_retries: None,
    };
    let result = queue.enqueue(&new).await?;
    let json = serde_json::json!({ "created": result.created(), "job": result.job() });
    Ok(format!("{}\n", serde_json::to_string_pretty(&json)?))
}

/// `provisiond jobs list`.
pub async fn jobs_list(
    config: &Config,
    status: Option<JobStatus>,
    limit: i64,
    json: bool,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let queue = app::open_queue(config, false).await?;
    if !(1..=10_000).contains(&limit) {
        anyhow::bail!("--limit must be between 1 and 10000");
    }
    let jobs = queue.list(status, limit).await?;
    if json {
        w!(out, "{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(out);
    }
    w!(
        out,
        "{:<36}  {:<12}  {:<12}  {:>5}  {:<18}  CREATED",
        "ID",
        "STATUS",
        "REGION",
        "TRIES",
        "STEP"
    );
    for j in jobs {
        w!(
            out,
            "{:<36}  {:<12}  {:<12}  {:>5}  {:<18}  {}",
            j.id,
            j.status().as_str(),
            j.region,
            j.retry_count + 1,
            j.current_step.as_deref().unwrap_or("-"),
            j.created_at.format("%Y-%m-%d %H:%M:%S"),
        );
    }
    Ok(out)
}

/// `provisiond jobs show`.
pub async fn jobs_show(config: &Config, id: Uuid, json: bool) -> anyhow::Result<String> {
    let mut out = String::new();
    let queue = app::open_queue(config, false).await?;
    let job = queue
        .get(id)
        .await?
        .with_context(|| format!("no job {id}"))?;
    let events = queue.events(id).await?;
    if json {
        let json = serde_json::json!({ "job": job, "events": events });
        w!(out, "{}", serde_json::to_string_pretty(&json)?);
        return Ok(out);
    }
    w!(out, "job       {}", job.id);
    w!(out, "status    {}", job.status());
    w!(out, "executor  {}", job.executor());
    w!(out, "agent     {}   user {}", job.agent_id, job.user_id);
    w!(out, "region    {}", job.region);
    w!(
        out,
        "attempt   {} of {}",
        job.retry_count + 1,
        job.max_retries + 1
    );
    if let Some(e) = &job.error {
        w!(
            out,
            "error     {e} (step {})",
            job.failed_step.as_deref().unwrap_or("-")
        );
    }
    // The last attempt's error: why a queued job is waiting for its retry, or why a failed
    // job's last try (or its rollback) ended.
    if let Some(e) = &job.last_error {
        w!(out, "last err  {e}");
    }
    if let (Some(at), None) = (job.rollback_started_at, &job.error) {
        w!(
            out,
            "rollback  since {}: {} (step {})",
            at.format("%Y-%m-%d %H:%M:%S"),
            job.rollback_error.as_deref().unwrap_or("-"),
            job.rollback_step.as_deref().unwrap_or("-")
        );
    }
    w!(out, "events:");
    for e in events {
        w!(
            out,
            "  {}  {:<18}  {}  {}",
            e.at.format("%H:%M:%S%.3f"),
            e.step.as_deref().unwrap_or("-"),
            e.message,
            e.data
        );
    }
    Ok(out)
}

/// `provisiond reap`.
pub async fn reap(config: &Config) -> anyhow::Result<String> {
    let queue = app::open_queue(config, false).await?;
    let p = app::provisioner(config, &app::CLI_PATIENCE, Some(&queue)).await?;
    let report = crate::provision::reaper::reap(
        &queue,
        p.hetzner(),
        p.tailscale(),
        &p.settings().tags,
        config.provision.reaper_grace,
    )
    .await;
    Ok(format!("{}\n", serde_json::to_string_pretty(&report)?))
}

/// `provisiond sweep`.
pub async fn sweep(config: &Config) -> anyhow::Result<String> {
    let queue = app::open_queue(config, false).await?;
    let report = queue.sweep().await?;
    Ok(format!("{}\n", serde_json::to_string_pretty(&report)?))
}

/// `provisiond demo`: on a scratch database of the configured server (else the local one).
pub async fn demo(config: &Config, args: super::demo::DemoArgs) -> anyhow::Result<String> {
    let server = config
        .database
        .url
        .clone()
        .unwrap_or_else(|| Secret::new("postgres://postgres@127.0.0.1:5432/postgres"));
    super::demo::run(&server, args).await
}

/// `provisiond check-config`: the config, the database, and (with a worker) both clouds.
pub async fn check_config(config: &Config) -> anyhow::Result<String> {
    let mut out = String::new();
    w!(out, "config: ok");
    w!(
        out,
        "  worker: enabled={} concurrency={}",
        config.worker.enabled,
        config.worker.concurrency
    );
    w!(out, "  regions: {}", config.regions.names().join(", "));
    let url = config.database_url()?;
    let timeout = config.database.connect_timeout;
    let state = crate::db::schema_state(url, timeout).await?;
    w!(out, "database: reachable; migrations {}", state.describe());
    let mut conn = crate::db::establish(url, timeout).await?;
    let mode = crate::db::mode::resolve(&mut conn, config.database.mode).await?;
    w!(out, "  mode: {} ({})", mode.mode, mode.reason);
    if !config.worker.enabled {
        w!(
            out,
            "clouds: not checked (no provisioning worker configured)"
        );
        return Ok(out);
    }
    // What `serve` checks before it says READY, so that a wrong credential is found here
    // rather than by the first job.
    let (hetzner, tailscale) = app::clients(config)?;
    let settings = crate::provision::ProvisionSettings::from_config(config);
    let regions = app::check_clouds(&hetzner, &tailscale, &settings, &app::CLI_PATIENCE).await?;
    w!(
        out,
        "hetzner: token accepted; server type {} usable in {}",
        settings.server_type,
        regions
            .0
            .iter()
            .map(|(r, l)| format!("{r} ({})", l.join(", ")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    w!(out, "tailscale: OAuth client accepted");
    Ok(out)
}

/// `provisiond bench …`, on a scratch database of the configured server.
pub async fn bench(config: &Config, command: BenchCommand) -> anyhow::Result<String> {
    let server = config.database_url()?;
    match command {
        BenchCommand::Queue(args) => super::bench::queue::queue(server, args).await,
        BenchCommand::Provision(args) => super::bench::provision::provision(server, args).await,
        BenchCommand::Http(args) => super::bench::http::http(server, args).await,
        BenchCommand::Fleet(args) => super::bench::fleet::fleet(server, args).await,
    }
}

/// `provisiond sim`: the simulator as a process, until it is stopped.
pub async fn sim(args: crate::sim::SimArgs) -> anyhow::Result<String> {
    crate::sim::run(args).await?;
    Ok(String::new())
}

/// `provisiond chaos`: needs no config (it builds its own cluster and simulator). On SIGTERM or
/// ctrl-c the run is dropped, which stops its daemons and its cluster.
pub async fn chaos(args: &super::chaos::ChaosArgs) -> anyhow::Result<String> {
    let plan = super::chaos::ChaosPlan::from_args(args)?;
    let exe = std::env::current_exe().context("find the provisiond binary")?;
    let stop = app::shutdown_on_signals();
    let report = tokio::select! {
        r = super::chaos::run(&plan, &exe) => r?,
        _ = stop.cancelled() => anyhow::bail!("interrupted; its daemons and cluster were stopped"),
    };
    let text = report.render();
    if !report.passed() {
        print!("{text}");
        let failed: Vec<&str> = report
            .checks()
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect();
        anyhow::bail!(
            "chaos: {} checks failed: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(text)
}

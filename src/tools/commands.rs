//! `provisiond`: thin subcommands over the library. Errors are one line on stderr and a non-zero
//! exit; results go to stdout (JSON with `--json`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use provisiond::config::{Config, HandlerKind};
use provisiond::domain::{Executor, JobStatus};
use provisiond::queue::NewJob;
use provisiond::{app, telemetry};
use std::path::PathBuf;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "provisiond",
    version,
    about = "Turns a paid order into a running, tailnet-joined Hetzner VM"
)]
struct Cli {
    /// TOML config file (see config/provisiond.example.toml). DATABASE_URL and
    /// PROVISIOND__SECTION__KEY environment variables override it.
    #[arg(long, global = true, env = "PROVISIOND_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending database migrations.
    Migrate,
    /// Run the daemon: migrations, worker, scheduled sweep.
    Serve,
    /// Enqueue a provisioning job and print it as JSON (an existing job for the same key is
    /// returned, not duplicated).
    Enqueue {
        #[arg(long)]
        agent: Uuid,
        #[arg(long)]
        user: Uuid,
        #[arg(long, default_value = "us-east")]
        region: String,
        /// Business idempotency key (e.g. a Checkout Session id).
        #[arg(long)]
        key: Option<String>,
        /// Run by an external runner that posts callbacks, instead of this daemon.
        #[arg(long)]
        external: bool,
    },
    /// Inspect jobs.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Retry or fail stale jobs now (the scheduled sweep, on demand).
    Sweep,
    /// Delete servers and tailnet devices that no live job owns (the scheduled reaper, now).
    Reap,
    /// Run the whole pipeline against the built-in simulator in a scratch database, showing
    /// each job's steps as they happen.
    Demo(provisiond::demo::DemoArgs),
    /// Load and validate the configuration, and check the database.
    CheckConfig,
    /// Run the Hetzner Cloud + Tailscale API simulator.
    Sim(Box<provisiond::sim::SimArgs>),
    /// The reliability suite: several `serve` processes against the simulator and a private
    /// PostgreSQL cluster, `kill -9`s, PostgreSQL restarts and cloud faults, then a reap and
    /// checks (see BENCHMARKS.md). Exits non-zero when a check fails.
    Chaos(provisiond::chaos::ChaosArgs),
    /// Measure (see BENCHMARKS.md). Uses a scratch database on the configured server.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Queue throughput and pickup latency, against `pgbench -N` on the same database.
    Queue(provisiond::bench::QueueBenchArgs),
    /// Concurrent jobs through the step machine against the simulator with realistic latency.
    Provision(provisiond::bench::ProvisionBenchArgs),
    /// Signed Stripe webhooks and runner heartbeats per second through the HTTP server.
    Http(provisiond::bench_http::HttpBenchArgs),
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Newest first.
    List {
        #[arg(long)]
        status: Option<JobStatus>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One job and its events.
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
}

/// Appends a line to the command's output. Writing to a String cannot fail.
macro_rules! w {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Chaos(_)) {
        // The in-process simulator's server logs every connection a killed daemon cut.
        telemetry::init_with_default("info,warp::server=off");
    } else {
        telemetry::init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("provisiond: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(text) => {
            use std::io::Write as _;
            // A closed pipe (`provisiond jobs list | head`) is not an error worth a panic.
            match std::io::stdout().lock().write_all(text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("provisiond: error: cannot write output: {e}");
                    std::process::ExitCode::FAILURE
                }
                _ => std::process::ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            // One line: the error and its causes.
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("provisiond: error: {}", chain.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let mut out = String::new();
    if let Command::Sim(args) = cli.command {
        provisiond::sim::run(*args).await?;
        return Ok(out);
    }
    if let Command::Chaos(args) = &cli.command {
        return chaos(args).await;
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Migrate => {
            let url = config.database_url()?;
            let applied = provisiond::db::migrate(url, config.database.connect_timeout).await?;
            if applied.is_empty() {
                w!(out, "migrations: up to date");
            } else {
                w!(out, "applied migrations: {}", applied.join(", "));
            }
        }
        Command::Serve => app::serve(config, app::shutdown_on_signals()).await?,
        Command::Enqueue {
            agent,
            user,
            region,
            key,
            external,
        } => {
            if !config.regions.contains(&region) {
                anyhow::bail!(
                    "unknown region {region:?}; configured regions: {}",
                    config.regions.names().join(", ")
                );
            }
            if let Some(k) = &key
                && !provisiond::domain::valid_business_key(k)
            {
                anyhow::bail!("--key must be 1-255 characters of letters, digits, _ - . :");
            }
            let queue = app::open_queue(&config, false).await?;
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
            w!(out, "{}", serde_json::to_string_pretty(&json)?);
        }
        Command::Jobs { command } => {
            let queue = app::open_queue(&config, false).await?;
            match command {
                JobsCommand::List {
                    status,
                    limit,
                    json,
                } => {
                    if !(1..=10_000).contains(&limit) {
                        anyhow::bail!("--limit must be between 1 and 10000");
                    }
                    let jobs = queue.list(status, limit).await?;
                    if json {
                        w!(out, "{}", serde_json::to_string_pretty(&jobs)?);
                    } else {
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
                    }
                }
                JobsCommand::Show { id, json } => {
                    let job = queue
                        .get(id)
                        .await?
                        .with_context(|| format!("no job {id}"))?;
                    let events = queue.events(id).await?;
                    if json {
                        let json = serde_json::json!({ "job": job, "events": events });
                        w!(out, "{}", serde_json::to_string_pretty(&json)?);
                    } else {
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
                        // The last attempt's error: why a queued job is waiting for its retry,
                        // or why a failed job's last try (or its rollback) ended.
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
                    }
                }
            }
        }
        Command::Reap => {
            let queue = app::open_queue(&config, false).await?;
            let p = app::provisioner(&config, &app::CLI_PATIENCE).await?;
            let report = provisiond::provision::reaper::reap(
                &queue,
                p.hetzner(),
                p.tailscale(),
                &p.settings().tags,
                config.provision.reaper_grace,
            )
            .await;
            w!(out, "{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Demo(args) => {
            let server = config.database.url.clone().unwrap_or_else(|| {
                provisiond::secret::Secret::new("postgres://postgres@127.0.0.1:5432/postgres")
            });
            out = provisiond::demo::run(&server, args).await?;
        }
        Command::Sweep => {
            let queue = app::open_queue(&config, false).await?;
            let report = queue.sweep().await?;
            w!(out, "{}", serde_json::to_string_pretty(&report)?);
        }
        Command::CheckConfig => {
            w!(out, "config: ok");
            w!(
                out,
                "  worker: enabled={} handler={:?} concurrency={}",
                config.worker.enabled,
                config.worker.handler,
                config.worker.concurrency
            );
            w!(out, "  regions: {}", config.regions.names().join(", "));
            let url = config.database_url()?;
            let pending =
                provisiond::db::pending_migrations(url, config.database.connect_timeout).await?;
            w!(
                out,
                "database: reachable; migrations {}",
                if pending {
                    "pending (run `provisiond migrate`)"
                } else {
                    "up to date"
                }
            );
            if config.worker.enabled && config.worker.handler == HandlerKind::Provision {
                // What `serve` checks before it says READY, so that a wrong credential is found
                // here rather than by the first job.
                let (hetzner, tailscale) = app::clients(&config)?;
                let settings = provisiond::provision::ProvisionSettings::from_config(&config);
                let regions =
                    app::check_clouds(&hetzner, &tailscale, &settings, &app::CLI_PATIENCE).await?;
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
            } else {
                w!(
                    out,
                    "clouds: not checked (no provisioning worker configured)"
                );
            }
        }
        Command::Bench { command } => match command {
            BenchCommand::Queue(args) => {
                out = provisiond::bench::queue(config.database_url()?, args).await?;
            }
            BenchCommand::Provision(args) => {
                out = provisiond::bench::provision(config.database_url()?, args).await?;
            }
            BenchCommand::Http(args) => {
                out = provisiond::bench_http::http(config.database_url()?, args).await?;
            }
        },
        Command::Sim(_) | Command::Chaos(_) => unreachable!("handled above"),
    }
    Ok(out)
}

/// `provisiond chaos`: needs no config (it builds its own cluster and simulator). On SIGTERM or
/// ctrl-c the run is dropped, which stops its daemons and its cluster.
async fn chaos(args: &provisiond::chaos::ChaosArgs) -> anyhow::Result<String> {
    let plan = provisiond::chaos::ChaosPlan::from_args(args)?;
    let exe = std::env::current_exe().context("find the provisiond binary")?;
    let stop = app::shutdown_on_signals();
    let report = tokio::select! {
        r = provisiond::chaos::run(&plan, &exe) => r?,
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

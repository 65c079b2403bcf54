//! The command line: every subcommand and its arguments (clap). Parsing only; the bodies are in
//! `commands`, the dispatch in `main.rs`.

use crate::domain::JobStatus;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "provisiond",
    version,
    about = "Turns a paid order into a running, tailnet-joined Hetzner VM"
)]
pub struct Cli {
    /// TOML config file (see config/provisiond.example.toml). DATABASE_URL and
    /// PROVISIOND__SECTION__KEY environment variables override it.
    #[arg(long, global = true, env = "PROVISIOND_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply pending database migrations (all in one transaction, after a preflight). Adopts the
    /// web app's tables when they exist; refuses, changing nothing, when rows would violate a
    /// new constraint or a newer release migrated the database.
    Migrate {
        /// Print what would be added, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Give up (changing nothing) when a table lock is not granted within this long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        lock_timeout: std::time::Duration,
    },
    /// Run the daemon: migrations, worker, scheduled sweep.
    Serve,
    /// Enqueue a provisioning job and print it as JSON (an existing job for the same key is
    /// returned, not duplicated).
    Enqueue(EnqueueArgs),
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
    Demo(crate::tools::demo::DemoArgs),
    /// Load and validate the configuration, and check the database.
    CheckConfig,
    /// Run the Hetzner Cloud + Tailscale API simulator.
    Sim(Box<crate::sim::SimArgs>),
    /// The reliability suite: several `serve` processes against the simulator and a private
    /// PostgreSQL cluster, `kill -9`s, PostgreSQL restarts and cloud faults, then a reap and
    /// checks (see BENCHMARKS.md). Exits non-zero when a check fails.
    Chaos(crate::tools::chaos::ChaosArgs),
    /// Measure (see BENCHMARKS.md). Uses a scratch database on the configured server.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Queue throughput and pickup latency, against `pgbench -N` on the same database.
    Queue(crate::tools::bench::queue::QueueBenchArgs),
    /// Concurrent jobs through the step machine against the simulator with realistic latency.
    Provision(crate::tools::bench::provision::ProvisionBenchArgs),
    /// Signed Stripe webhooks and runner heartbeats per second through the HTTP server.
    Http(crate::tools::bench::http::HttpBenchArgs),
    /// Several `serve` processes sharing one simulated project's request budget.
    Fleet(crate::tools::bench::fleet::FleetBenchArgs),
}

#[derive(Subcommand)]
pub enum JobsCommand {
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

#[derive(Debug, Clone, clap::Args)]
pub struct EnqueueArgs {
    #[arg(long)]
    pub agent: Uuid,
    #[arg(long)]
    pub user: Uuid,
    #[arg(long, default_value = "us-east")]
    pub region: String,
    /// Business idempotency key (e.g. a Checkout Session id).
    #[arg(long)]
    pub key: Option<String>,
    /// Run by an external runner that posts callbacks, instead of this daemon.
    #[arg(long)]
    pub external: bool,
}

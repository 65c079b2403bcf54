//! `provisiond`: parses the command line and dispatches to a command (`tools::commands`).
//! Errors are one line on stderr and a non-zero exit; results go to stdout.

use clap::Parser;
use provisiond::config::Config;
use provisiond::telemetry;
use provisiond::tools::cli::{Cli, Command, JobsCommand};
use provisiond::tools::commands as run;

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
    match runtime.block_on(dispatch(cli)) {
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

/// The simulator and the chaos suite need no config; every other command loads it first.
async fn dispatch(cli: Cli) -> anyhow::Result<String> {
    let config = || Config::load(cli.config.as_deref());
    match cli.command {
        Command::Sim(args) => run::sim(*args).await,
        Command::Chaos(args) => run::chaos(&args).await,
        Command::Migrate {
            dry_run,
            lock_timeout,
        } => run::migrate(&config()?, dry_run, lock_timeout).await,
        Command::Serve => run::serve(config()?).await,
        Command::Enqueue(args) => run::enqueue(&config()?, args).await,
        Command::Jobs { command } => match command {
            JobsCommand::List {
                status,
                limit,
                json,
            } => run::jobs_list(&config()?, status, limit, json).await,
            JobsCommand::Show { id, json } => run::jobs_show(&config()?, id, json).await,
        },
        Command::Sweep => run::sweep(&config()?).await,
        Command::Reap => run::reap(&config()?).await,
        Command::Demo(args) => run::demo(&config()?, args).await,
        Command::CheckConfig => run::check_config(&config()?).await,
        Command::Bench { command } => run::bench(&config()?, command).await,
    }
}

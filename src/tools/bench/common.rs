//! What the benchmarks share: the `pgbench -N` baseline run in the same scratch database, and
//! a job of the benchmarks' shape (a new customer each).

use crate::domain::Executor;
use crate::queue::NewJob;
use crate::secret::Secret;
use anyhow::Context;
use uuid::Uuid;

pub(super) fn bench_job() -> NewJob {
    NewJob {
        agent_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        region: "eu-central".into(),
        stripe_event_id: None,
        business_key: None,
        executor: Executor::Daemon,
        max_retries: None,
    }
}

/// Runs `pgbench -i` then `pgbench -N` in the database at `url`; returns TPS.
pub(super) fn pgbench(url: &Secret, seconds: u32, clients: u32) -> anyhow::Result<f64> {
    let u = url::Url::parse(url.expose()).context("database URL")?;
    let db = u.path().trim_start_matches('/').to_owned();
    let mut base = std::process::Command::new("pgbench");
    base.env("PGHOST", u.host_str().unwrap_or("127.0.0.1"))
        .env("PGPORT", u.port().unwrap_or(5432).to_string())
        .env(
            "PGUSER",
            if u.username().is_empty() {
                "postgres"
            } else {
                u.username()
            },
        );
    if let Some(p) = u.password() {
        base.env("PGPASSWORD", p);
    }
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let mut cmd = std::process::Command::new("pgbench");
        for (k, v) in base.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        let out = cmd
            .args(args)
            .arg(&db)
            .output()
            .context("run pgbench (install postgresql-contrib or postgresql client)")?;
        anyhow::ensure!(
            out.status.success(),
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(&["-i", "-s", "10", "-q"])?;
    let out = run(&[
        "-N",
        "-c",
        &clients.to_string(),
        "-j",
        "2",
        "-T",
        &seconds.to_string(),
    ])?;
    out.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("could not read TPS from pgbench output")
}

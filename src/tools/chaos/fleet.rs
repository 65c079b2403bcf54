//! The chaos suite's daemons: real `provisiond serve` processes, configured only by environment,
//! that the suite kills with SIGKILL and starts again.
//!
//! Each process incarnation connects with its own `application_name` (`chaos-d<slot>g<gen>`), so
//! the stale-write detector can tell who wrote what. Owns the child processes: dropping the fleet
//! kills every one still running. Must not send a signal to anything it did not start.

use crate::secret::Secret;
use crate::sim::SimHandle;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Daemon settings tuned so that a killed process's jobs come back within seconds.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub concurrency: usize,
    pub lease_ttl: Duration,
    pub heartbeat: Duration,
    pub request_timeout: Duration,
}

struct Slot {
    generation: u32,
    child: Option<Child>,
    /// When a killed or exited process is started again.
    restart_at: Option<Instant>,
}

pub struct Fleet {
    binary: PathBuf,
    env: Vec<(String, String)>,
    database_url: Secret,
    logs: PathBuf,
    slots: Vec<Slot>,
    /// Per-slot Hetzner tokens (several tokens of one project), when set: lets the simulator
    /// tell the daemons' requests apart.
    tokens: Vec<Secret>,
    pub kills: u32,
    pub restarts: u32,
    /// Processes that ended without being killed by us (e.g. a startup check that met a fault).
    pub exits: u32,
}

impl Fleet {
    pub fn new(
        binary: &Path,
        database_url: &Secret,
        sim: &SimHandle,
        settings: &DaemonSettings,
        daemons: usize,
        logs: &Path,
    ) -> Fleet {
        let cfg = sim.config();
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let env: Vec<(String, String)> = [
            (
                "PROVISIOND__WORKER__CONCURRENCY",
                settings.concurrency.to_string(),
            ),
            ("PROVISIOND__WORKER__CLAIM_BATCH", "8".into()),
            ("PROVISIOND__WORKER__POLL_INTERVAL", "500ms".into()),
            (
                "PROVISIOND__WORKER__HEARTBEAT_INTERVAL",
                ms(settings.heartbeat),
            ),
            ("PROVISIOND__WORKER__SHUTDOWN_GRACE", "2s".into()),
            ("PROVISIOND__QUEUE__LEASE_TTL", ms(settings.lease_ttl)),
            ("PROVISIOND__QUEUE__BACKOFF_BASE", "250ms".into()),
            ("PROVISIOND__QUEUE__BACKOFF_CAP", "3s".into()),
            ("PROVISIOND__SWEEP__SCHEDULE", "* * * * * *".into()),
            (
                "PROVISIOND__PROVISION__REAPER_SCHEDULE",
                "*/20 * * * * *".into(),
            ),
            ("PROVISIOND__PROVISION__REAPER_GRACE", "60s".into()),
            ("PROVISIOND__PROVISION__ROLLBACK_TIMEOUT", "30s".into()),
            ("PROVISIOND__DATABASE__POOL_SIZE", "8".into()),
            ("PROVISIOND__HTTP__LISTEN", String::new()),
            (
                "PROVISIOND__HETZNER__BASE_URL",
                sim.hetzner_base_url().to_string(),
            ),
            (
                "PROVISIOND__HETZNER__TOKEN",
                sim.hetzner_token().expose().to_owned(),
            ),
            (
                "PROVISIOND__HETZNER__REQUEST_TIMEOUT",
                ms(settings.request_timeout),
            ),
            (
                "PROVISIOND__TAILSCALE__BASE_URL",
                sim.tailscale_base_url().to_string(),
            ),
            (
                "PROVISIOND__TAILSCALE__CLIENT_ID",
                cfg.tailscale_client_id.clone(),
            ),
            (
                "PROVISIOND__TAILSCALE__CLIENT_SECRET",
                cfg.tailscale_client_secret.expose().to_owned(),
            ),
            (
                "PROVISIOND__TAILSCALE__REQUEST_TIMEOUT",
                ms(settings.request_timeout),
            ),
            ("PROVISIOND_LOG_FORMAT", "json".into()),
            ("RUST_LOG", "warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Fleet {
            binary: binary.to_owned(),
            env,
            database_url: database_url.clone(),
            logs: logs.to_owned(),
            slots: (0..daemons)
                .map(|_| Slot {
                    generation: 0,
                    child: None,
                    restart_at: Some(Instant::now()),
                })
                .collect(),
            tokens: Vec::new(),
            kills: 0,
            restarts: 0,
            exits: 0,
        }
    }

    /// Sets (or overrides) one environment variable of every daemon started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Daemon `i` uses `tokens[i % len]` as its Hetzner token.
    pub fn set_tokens(&mut self, tokens: Vec<Secret>) {
        self.tokens = tokens;
    }

    /// The `application_name` prefix of every daemon connection.
    pub const APPLICATION_PREFIX: &'static str = "chaos-d";

    fn spawn(&mut self, slot: usize) -> anyhow::Result<()> {
        let s = &mut self.slots[slot];
        s.generation += 1;
        let app = format!("{}{slot}g{}", Self::APPLICATION_PREFIX, s.generation);
        let mut url = url::Url::parse(self.database_url.expose()).context("database URL")?;
        url.query_pairs_mut().append_pair("application_name", &app);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("daemon-{slot}.log")))
            .context("open daemon log")?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve")
            .env_remove("PROVISIOND_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if !self.tokens.is_empty() {
            let token = &self.tokens[slot % self.tokens.len()];
            cmd.env("PROVISIOND__HETZNER__TOKEN", token.expose());
        }
        let child = cmd
            .env("DATABASE_URL", url.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {} serve", self.binary.display()))?;
        s.child = Some(child);
        s.restart_at = None;
        Ok(())
    }

    /// Starts processes that are due, and notices processes that ended on their own.
    pub fn supervise(&mut self) -> anyhow::Result<()> {
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            if let Some(child) = &mut s.child
                && child.try_wait().context("wait for daemon")?.is_some()
            {
                s.child = None;
                // A startup that failed (say, PostgreSQL is down) is retried, as systemd would.
                s.restart_at = Some(Instant::now() + Duration::from_millis(500));
                self.exits += 1;
            }
            let s = &self.slots[slot];
            if s.child.is_none() && s.restart_at.is_some_and(|t| t <= Instant::now()) {
                if s.generation > 0 {
                    self.restarts += 1;
                }
                self.spawn(slot)?;
            }
        }
        Ok(())
    }

    /// SIGKILLs one running daemon chosen at random; it is started again after `restart_after`.
    /// Returns the slot, or `None` when none is running.
    pub fn kill_random(&mut self, restart_after: Duration) -> anyhow::Result<Option<usize>> {
        let running: Vec<usize> = (0..self.slots.len())
            .filter(|i| self.slots[*i].child.is_some())
            .collect();
        if running.is_empty() {
            return Ok(None);
        }
        let slot = running[rand::random_range(0..running.len())];
        let s = &mut self.slots[slot];
        if let Some(mut child) = s.child.take() {
            if matches!(child.try_wait(), Ok(Some(_))) {
                // It ended on its own just now: not our kill.
                self.exits += 1;
            } else {
                // Child::kill is SIGKILL: no shutdown path runs, as in a crash or an OOM kill.
                child.kill().context("kill -9 a daemon")?;
                child.wait().context("reap a killed daemon")?;
                self.kills += 1;
            }
        }
        s.restart_at = Some(Instant::now() + restart_after);
        Ok(Some(slot))
    }

    /// SIGTERMs every daemon and waits for it (SIGKILL after `grace`); none is restarted.
    pub fn stop_all(&mut self, grace: Duration) {
        for s in &mut self.slots {
            s.restart_at = None;
            if let Some(child) = &s.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        let deadline = Instant::now() + grace;
        for s in &mut self.slots {
            if let Some(mut child) = s.child.take() {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(mut child) = s.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

//! A private PostgreSQL cluster for the chaos suite: `initdb` and `pg_ctl` from the system's
//! binaries (`/usr/lib/postgresql/*/bin`), its own data directory and a free port on 127.0.0.1,
//! so that the suite can stop and restart it at will.
//!
//! Must never touch any other server (the machine's on 5432 above all): everything it runs is
//! pointed at its own data directory. Dropping it stops the cluster and deletes its directory,
//! also when the suite failed.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How a restart stops the server first.
#[derive(Debug, Clone, Copy)]
pub enum StopMode {
    /// Disconnects clients and checkpoints (`pg_ctl -m fast`).
    Fast,
    /// Kills the server processes without a checkpoint; the start replays the WAL, as after a
    /// crash (`pg_ctl -m immediate`).
    Immediate,
}

impl StopMode {
    fn flag(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

pub struct PrivateCluster {
    bindir: PathBuf,
    base: PathBuf,
    port: u16,
    as_root: bool,
    running: bool,
}

impl PrivateCluster {
    /// `initdb` a new cluster under a fresh directory in `$TMPDIR` and start it.
    pub fn start() -> anyhow::Result<PrivateCluster> {
        let bindir = postgres_bindir()?;
        let as_root = running_as_root();
        let base = std::env::temp_dir().join(format!(
            "provisiond-chaos-pg-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
        let mut cluster = PrivateCluster {
            bindir,
            base,
            port: free_port()?,
            as_root,
            running: false,
        };
        if as_root {
            // initdb refuses to run as root; the postgres user must own the directory.
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.base)
                .status()
                .context("chown the cluster directory")?;
            anyhow::ensure!(ok.success(), "chown of {} failed", cluster.base.display());
        }
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (clients see their connections cut), then starts it again.
    pub fn restart(&mut self, mode: StopMode, down_for: std::time::Duration) -> anyhow::Result<()> {
        self.stop(mode)?;
        std::thread::sleep(down_for);
        self.start_server()
    }

    pub fn stop(&mut self, mode: StopMode) -> anyhow::Result<()> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", mode.flag(), "-w", "stop"],
        )?;
        self.running = false;
        Ok(())
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        let (data, log) = (self.data(), self.base.join("server.log"));
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
            self.port,
            self.base.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-o",
                &opts,
                "-w",
                "start",
            ],
        )?;
        self.running = true;
        Ok(())
    }

    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = postgres_command(&self.bindir.join(program), self.as_root)
            .args(args)
            .output()
            .with_context(|| format!("run {program}"))?;
        anyhow::ensure!(
            out.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop(StopMode::Immediate);
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// A command that runs a PostgreSQL server binary, as the `postgres` user when we are root
/// (initdb and postgres refuse root).
pub fn postgres_command(exe: &Path, as_root: bool) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb` (Debian's `postgresql`).
pub fn postgres_bindir() -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.retain(|d| d.join("initdb").exists());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().context(
        "no PostgreSQL server binaries under /usr/lib/postgresql (install the `postgresql` package)",
    )
}

pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A port nobody listens on right now (the kernel's pick, never 5432 in practice; checked).
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..10 {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .context("find a free port")?
            .local_addr()?
            .port();
        if port != 5432 {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port")
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

//! Rolling upgrades: the previous release's binary keeps working on the schema this release
//! migrates to (every migration is additive), and a database the previous release migrated
//! becomes, after this release's `migrate`, exactly what a fresh database becomes.
//!
//! The previous release is built from git history (`PREVIOUS_RELEASE`, the last commit before
//! this round's first new migration) into the current target directory, so that the
//! dependencies are shared and only its own crate compiles. Its package and binary are renamed
//! (`provisiond-prev`) so that its artifacts never replace this build's `provisiond`. A clone
//! without that history fails with instructions; it never skips.

use crate::support::TestDb;
use provisiond::queue::{NewJob, Queue, QueueSettings};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The last commit before the first migration of this round (2026-12-04-000001): main as the
/// previous release was cut. `git log --oneline -- migrations` shows it as the parent of the
/// first commit that added one.
const PREVIOUS_RELEASE: &str = "4c8ce38e2a75b5ff3584ef61bcd43d15ab5ff293";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn git(args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("git is needed by this test: {e}"))
}

/// This build's target directory (`…/target`), from where cargo put our own binary.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_provisiond"))
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Builds the previous release's binary once per test process; returns its path.
fn previous_release() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let present = git(&["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")]);
        assert!(
            present.status.success(),
            "commit {PREVIOUS_RELEASE} (the previous release) is not in this clone: the upgrade \
             test builds it from history. In a shallow clone run `git fetch --unshallow` (or \
             clone without --depth)."
        );
        let ancestor = git(&["merge-base", "--is-ancestor", PREVIOUS_RELEASE, "HEAD"]);
        assert!(
            ancestor.status.success(),
            "{PREVIOUS_RELEASE} is not an ancestor of HEAD: PREVIOUS_RELEASE must name a \
             commit of this branch's history"
        );
        let target = target_dir();
        let src = target.join("prev-release").join(&PREVIOUS_RELEASE[..12]);
        if !src.join("Cargo.toml").exists() {
            let tar = target.join("prev-release").join("source.tar");
            std::fs::create_dir_all(&src).unwrap();
            let out = git(&[
                "archive",
                "--format=tar",
                "-o",
                tar.to_str().unwrap(),
                PREVIOUS_RELEASE,
            ]);
            assert!(
                out.status.success(),
                "git archive: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let ok = Command::new("tar")
                .arg("-xf")
                .arg(&tar)
                .arg("-C")
                .arg(&src)
                .status()
                .expect("tar");
            assert!(ok.success(), "tar -x of the previous release failed");
            // Its own package and binary names: nothing it builds lands on this build's files.
            let manifest = std::fs::read_to_string(src.join("Cargo.toml")).unwrap();
            let manifest = manifest
                .replacen("name = \"provisiond\"\n", "name = \"provisiond-prev\"\n", 1)
                .replacen("[lib]\n", "[lib]\nname = \"provisiond\"\n", 1)
                .replacen(
                    "[[bin]]\nname = \"provisiond\"",
                    "[[bin]]\nname = \"provisiond-prev\"",
                    1,
                )
                + "\n[workspace]\n";
            std::fs::write(src.join("Cargo.toml"), manifest).unwrap();
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let t0 = Instant::now();
        let out = Command::new(cargo)
            .args(["build", "--bin", "provisiond-prev"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &target)
            .stdout(Stdio::null())
            .output()
            .expect("cargo build of the previous release");
        assert!(
            out.status.success(),
            "building the previous release failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "built the previous release ({}) in {:.1} s",
            &PREVIOUS_RELEASE[..7],
            t0.elapsed().as_secs_f64()
        );
        target.join("debug").join("provisiond-prev")
    })
}

fn previous(db: &TestDb) -> Command {
    let mut cmd = Command::new(previous_release());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.url.expose())
        .env("PROVISIOND_LOG_FORMAT", "json");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_provisions_on_the_fully_migrated_schema() {
    let bin = tokio::task::spawn_blocking(previous_release).await.unwrap();
    assert!(bin.exists());
    // Migrated by this release: every migration, this round's included.
    let db = TestDb::new().await;
    let sim = provisiond::sim::Simulator::start(provisiond::sim::SimConfig::default())
        .await
        .unwrap();
    let cfg = sim.config();
    let mut daemon = previous(&db)
        .arg("serve")
        .env("PROVISIOND__WORKER__HANDLER", "provision")
        .env("PROVISIOND__WORKER__POLL_INTERVAL", "200ms")
        .env("PROVISIOND__HTTP__LISTEN", "")
        .env(
            "PROVISIOND__HETZNER__BASE_URL",
            sim.hetzner_base_url().as_str(),
        )
        .env("PROVISIOND__HETZNER__TOKEN", sim.hetzner_token().expose())
        .env(
            "PROVISIOND__TAILSCALE__BASE_URL",
            sim.tailscale_base_url().as_str(),
        )
        .env("PROVISIOND__TAILSCALE__CLIENT_ID", &cfg.tailscale_client_id)
        .env(
            "PROVISIOND__TAILSCALE__CLIENT_SECRET",
            cfg.tailscale_client_secret.expose(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the previous release");

    // Orders from the previous release's own CLI and from this release's queue.
    let out = previous(&db)
        .args([
            "enqueue",
            "--agent",
            &uuid::Uuid::new_v4().to_string(),
            "--user",
            &uuid::Uuid::new_v4().to_string(),
            "--key",
            "cs_prev_1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queue = Queue::new(db.pool().await, QueueSettings::default());
    for i in 0..3 {
        queue
            .enqueue(&NewJob {
                agent_id: uuid::Uuid::new_v4(),
                user_id: uuid::Uuid::new_v4(),
                region: "eu-central".into(),
                stripe_event_id: None,
                business_key: Some(format!("cs_new_{i}")),
                executor: provisiond::domain::Executor::Daemon,
                max_retries: None,
            })
            .await
            .unwrap();
    }
    let t0 = Instant::now();
    while db
        .count("SELECT count(*) FROM provisioning_jobs WHERE status = 'running'")
        .await
        < 4
    {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the previous release exited"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the previous release did not provision: {:?}",
            db.lines(
                "SELECT status::text || ' ' || coalesce(last_error, '') FROM provisioning_jobs"
            )
            .await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().unwrap().success());
    assert_eq!(sim.state().servers.len(), 4, "one server per job");
    // This release reads what the previous one wrote.
    for job in queue.list(None, 10).await.unwrap() {
        assert_eq!(job.status(), provisiond::domain::JobStatus::Running);
        assert!(job.server_id.is_some());
    }
}

#[tokio::test]
async fn a_database_the_previous_release_migrated_upgrades_to_what_a_fresh_one_is() {
    let bin = tokio::task::spawn_blocking(previous_release).await.unwrap();
    let old = TestDb::empty().await;
    let out = Command::new(bin)
        .env_clear()
        .env("DATABASE_URL", old.url.expose())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = provisiond::db::migrate(&old.url, Duration::from_secs(10))
        .await
        .unwrap();
    // Only the migrations added since the previous release run (its last was 2026-12-02).
    assert!(
        applied.contains(&"20261204000001".to_owned()),
        "{applied:?}"
    );
    assert!(
        applied.iter().all(|v| v.as_str() > "20261202000001"),
        "{applied:?}"
    );
    let fresh = TestDb::new().await;
    let (upgraded, fresh) = (old.catalog().await, fresh.catalog().await);
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|l| !b.contains(l)).cloned().collect()
    };
    assert!(
        upgraded == fresh,
        "upgraded and fresh schemas differ\nonly upgraded:\n{}\nonly fresh:\n{}",
        only(&upgraded, &fresh).join("\n"),
        only(&fresh, &upgraded).join("\n")
    );
}

//! The web app's own queue module keeps working next to a serving daemon: the seed's functions
//! (seed 003: enqueueProvisioningJob, updateJobStatus, recordHeartbeat, checkJobTimeout,
//! getJobByAgentId; seed 000: completeProvisioningWithMetadata; seed 004:
//! updateProvisioningStep) run as TypeScript through Drizzle and postgres.js (tests/webapp),
//! against the web app's database adopted by `migrate`, while a real `provisiond serve` provisions
//! through the simulator.
//!
//! Needs Node.js and npm (`.ci/run` installs them); fails, never skips, without them.

use crate::support::TestDb;
use provisiond::queue::{Queue, QueueSettings};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WORDS: [&str; 4] = ["queued", "provisioning", "running", "failed"];
const BOB: &str = "10000000-0000-0000-0000-000000000002";
const DAVE: &str = "10000000-0000-0000-0000-000000000004";
const ALICE_QUEUED_JOB: &str = "b0000000-0000-0000-0000-000000000002";
const BOB_ARCHIVED: &str = "a0000000-0000-0000-0000-000000000006";
const CAROL_STALE_JOB: &str = "b0000000-0000-0000-0000-000000000004";

fn webapp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webapp")
}

/// `npm ci` when the dependencies are missing, then `tsc` (which also type-checks the seed's
/// code against Drizzle's types). Once per test process.
fn build_webapp() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = webapp_dir();
        let run = |program: &str, args: &[&str]| {
            let out = Command::new(program)
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "{program} is needed by this test (Node.js 18+ and npm; .ci/run installs \
                         them with apt-get install nodejs npm): {e}"
                    )
                });
            assert!(
                out.status.success(),
                "{program} {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if !dir.join("node_modules/drizzle-orm").exists() {
            run("npm", &["ci", "--no-audit", "--no-fund"]);
        }
        run(
            "node",
            &["node_modules/typescript/bin/tsc", "-p", "tsconfig.json"],
        );
    });
}

/// The web app's functions, called one JSON line at a time (tests/webapp/src/driver.ts).
struct WebApp {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    next: u64,
}

impl WebApp {
    fn start(db: &TestDb) -> WebApp {
        build_webapp();
        let mut child = tokio::process::Command::new("node")
            .arg(webapp_dir().join("dist/driver.js"))
            .env("DATABASE_URL", db.url.expose())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start node");
        WebApp {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            child,
            next: 0,
        }
    }

    /// Calls `function(args…)`: its result, or the error (message, SQLSTATE) it threw.
    async fn call(&mut self, function: &str, args: Value) -> Result<Value, (String, Value)> {
        self.next += 1;
        let line = json!({"id": self.next, "fn": function, "args": args}).to_string() + "\n";
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(30), self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("{function}: no answer within 30 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("{function}: the driver exited"));
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["id"], self.next);
        if answer["ok"] == true {
            Ok(answer["result"].clone())
        } else {
            Err((
                answer["error"].as_str().unwrap_or_default().to_owned(),
                answer["code"].clone(),
            ))
        }
    }

    /// Calls a function the seed says must succeed here.
    async fn ok(&mut self, function: &str, args: Value) -> Value {
        self.call(function, args.clone())
            .await
            .unwrap_or_else(|e| panic!("{function}({args}) failed: {e:?}"))
    }
}

impl Drop for WebApp {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `provisiond serve` against the simulator: the worker and the sweep, no HTTP. Its log goes to
/// `log` (printed when the test fails).
fn serve(db: &TestDb, sim: &provisiond::sim::SimHandle, log: &Path) -> Child {
    let cfg = sim.config();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_provisiond"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.url.expose())
        .env("PROVISIOND_LOG_FORMAT", "json")
        .env("PROVISIOND__WORKER__POLL_INTERVAL", "200ms")
        .env("PROVISIOND__HTTP__LISTEN", "")
        // The test decides when a stale job is seen (the web app's on-read check, not the sweep).
        .env("PROVISIOND__SWEEP__SCHEDULE", "0 0 0 1 1 *")
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
        .stderr(log)
        .spawn()
        .expect("spawn serve")
}

async fn wait_for(db: &TestDb, log: &Path, what: &str, sql: &str) {
    let t0 = Instant::now();
    while db.count(sql).await == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}; the daemon's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status(job: &Value) -> &str {
    job["status"]
        .as_str()
        .unwrap_or_else(|| panic!("no status in {job}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_apps_queue_functions_work_next_to_a_serving_daemon() {
    let db = TestDb::web_app().await;
    provisiond::db::migrate(&db.url, Duration::from_secs(10))
        .await
        .unwrap();
    // A boot that takes a while, so that a job can be caught while a daemon holds it.
    let sim = provisiond::sim::Simulator::start(provisiond::sim::SimConfig {
        latency: provisiond::sim::LatencyProfile {
            boot: Duration::from_secs(3),
            ..provisiond::sim::LatencyProfile::instant()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let log = std::env::temp_dir().join(format!("provisiond-webapp-{}.log", db.name));
    let mut daemon = serve(&db, &sim, &log);
    let mut web = WebApp::start(&db);

    // The web app reads its own rows as before.
    let job = web
        .ok(
            "getJobByAgentId",
            json!(["a0000000-0000-0000-0000-000000000001"]),
        )
        .await;
    assert_eq!(status(&job), "running");

    // 1. The web app enqueues a purchase (its own insert); the daemon provisions it.
    let dave_agent = db
        .lines(&format!(
            "INSERT INTO agents (user_id, name) VALUES ('{DAVE}', 'Dave agent') RETURNING id"
        ))
        .await
        .remove(0);
    let job = web
        .ok(
            "enqueueProvisioningJob",
            json!([{"agentId": dave_agent, "userId": DAVE, "stripeEventId": "evt_dave_1", "region": "eu-central"}]),
        )
        .await;
    assert_eq!(status(&job), "queued");
    let dave_job = job["id"].as_str().unwrap().to_owned();
    // A second purchase while one is in progress: the seed's own check refuses it.
    let (message, _) = web
        .call(
            "enqueueProvisioningJob",
            json!([{"agentId": dave_agent, "userId": DAVE, "stripeEventId": "evt_dave_2"}]),
        )
        .await
        .unwrap_err();
    assert!(message.contains("already in progress"), "{message}");
    wait_for(
        &db,
        &log,
        "the daemon to provision the web app's job",
        &format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{dave_job}' AND status = 'running'"
        ),
    )
    .await;
    let job = web.ok("getJobByAgentId", json!([dave_agent])).await;
    assert_eq!(status(&job), "running");
    assert!(
        !web.ok("checkJobTimeout", json!([dave_job]))
            .await
            .as_bool()
            .unwrap()
    );
    assert_eq!(
        db.lines(&format!(
            "SELECT a.status::text || ' ' || i.status::text || ' ' || (i.server_id IS NOT NULL)
             FROM agents a JOIN agent_instances i ON i.agent_id = a.id WHERE a.id = '{dave_agent}'"
        ))
        .await,
        ["active running true"]
    );

    // 2. A late updateJobStatus on a finished job: harmless (the seed expected it to be), the
    //    terminal row kept, the attempt recorded.
    let late = web
        .ok(
            "updateJobStatus",
            json!([{"jobId": dave_job, "status": "failed", "error": "late runner callback"}]),
        )
        .await;
    assert_eq!(status(&late), "running", "the terminal row is kept");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM job_events WHERE job_id = '{dave_job}' AND message = 'late update ignored' AND data->>'writer' = 'webapp'"
        ))
        .await,
        1
    );

    // 3. The web app's own runner pipeline on its adopted jobs: a queued job its runner takes,
    //    heartbeats, steps, and completes with metadata; the daemon leaves it alone.
    let j = web
        .ok(
            "updateJobStatus",
            json!([{"jobId": ALICE_QUEUED_JOB, "status": "provisioning", "workflowRunId": "9002"}]),
        )
        .await;
    assert_eq!(status(&j), "provisioning");
    web.ok("recordHeartbeat", json!([ALICE_QUEUED_JOB])).await;
    web.ok(
        "updateProvisioningStep",
        json!([{"jobId": ALICE_QUEUED_JOB, "step": "vm_created"}]),
    )
    .await;
    web.ok(
        "completeProvisioningWithMetadata",
        json!([{"jobId": ALICE_QUEUED_JOB, "metadata": {"serverId": "42", "serverIp": "203.0.113.42", "tailscaleIp": "100.64.0.42"}}]),
    )
    .await;
    let j = web
        .ok(
            "getJobByAgentId",
            json!(["a0000000-0000-0000-0000-000000000002"]),
        )
        .await;
    assert_eq!(status(&j), "running");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM job_events WHERE job_id = '{ALICE_QUEUED_JOB}' AND message = 'claimed'"
        ))
        .await,
        0,
        "the daemon never claimed the web app's runner job"
    );
    // Carol's runner went silent 20 minutes ago: the web app's on-read check fails it.
    assert!(
        web.ok("checkJobTimeout", json!([CAROL_STALE_JOB]))
            .await
            .as_bool()
            .unwrap()
    );

    // 4. Every daemon down for 15 minutes while one holds a job: the web app's on-read
    //    checkJobTimeout fails the job (it used to fail on lease_only_while_provisioning).
    let eve = db
        .lines("INSERT INTO users (email) VALUES ('eve@example.com') RETURNING id")
        .await
        .remove(0);
    let eve_agent = db
        .lines(&format!(
            "INSERT INTO agents (user_id, name) VALUES ('{eve}', 'Eve agent') RETURNING id"
        ))
        .await
        .remove(0);
    let job = web
        .ok(
            "enqueueProvisioningJob",
            json!([{"agentId": eve_agent, "userId": eve, "stripeEventId": "evt_eve_1"}]),
        )
        .await;
    let eve_job = job["id"].as_str().unwrap().to_owned();
    wait_for(
        &db,
        &log,
        "the daemon to hold Eve's job while the server boots",
        &format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{eve_job}' AND lease_token IS NOT NULL AND current_step = 'vm_created'"
        ),
    )
    .await;
    // The web app's step callback and heartbeat on a daemon-held job: harmless.
    web.ok(
        "updateProvisioningStep",
        json!([{"jobId": eve_job, "step": "vm_created"}]),
    )
    .await;
    web.ok("recordHeartbeat", json!([eve_job])).await;
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    db.exec(&format!(
        "UPDATE provisioning_jobs SET last_heartbeat_at = now() - interval '16 minutes',
                claimed_at = now() - interval '17 minutes' WHERE id = '{eve_job}'"
    ))
    .await;
    assert!(
        web.ok("checkJobTimeout", json!([eve_job]))
            .await
            .as_bool()
            .unwrap(),
        "the web app fails the stale job"
    );
    let j = web.ok("getJobByAgentId", json!([eve_agent])).await;
    assert_eq!(status(&j), "failed");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .starts_with("Timeout: No heartbeat for")
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{eve_job}' AND lease_token IS NULL AND lease_owner IS NULL"
        ))
        .await,
        1,
        "the lease ended with the job"
    );

    // 5. While no daemon runs, the web app's runner takes a purchase the daemon never claimed:
    //    it becomes the runner's (external), and the daemon, back, leaves it alone.
    let frank = db
        .lines("INSERT INTO users (email) VALUES ('frank@example.com') RETURNING id")
        .await
        .remove(0);
    let frank_agent = db
        .lines(&format!(
            "INSERT INTO agents (user_id, name) VALUES ('{frank}', 'Frank agent') RETURNING id"
        ))
        .await
        .remove(0);
    let job = web
        .ok(
            "enqueueProvisioningJob",
            json!([{"agentId": frank_agent, "userId": frank, "stripeEventId": "evt_frank_1"}]),
        )
        .await;
    let frank_job = job["id"].as_str().unwrap().to_owned();
    web.ok(
        "updateJobStatus",
        json!([{"jobId": frank_job, "status": "provisioning", "workflowRunId": "9100"}]),
    )
    .await;
    assert_eq!(
        db.lines(&format!(
            "SELECT executor::text FROM provisioning_jobs WHERE id = '{frank_job}'"
        ))
        .await,
        ["external"]
    );
    let mut daemon = serve(&db, &sim, &log);

    // 6. An operator cancels a queued purchase: the web app reads `failed`, a word it knows.
    let queue = Queue::new(
        db.pool().await,
        QueueSettings {
            mode: provisiond::db::DatabaseMode::Adopted { users_table: true },
            ..QueueSettings::default()
        },
    );
    // Bob's runner job is provisioning, so his next purchase waits in `queued`.
    let waiting = queue
        .enqueue(&provisiond::queue::NewJob {
            agent_id: BOB_ARCHIVED.parse().unwrap(),
            user_id: BOB.parse().unwrap(),
            region: "us-east".into(),
            stripe_event_id: None,
            business_key: Some("cs_bob_again".into()),
            executor: provisiond::domain::Executor::Daemon,
            max_retries: None,
        })
        .await
        .unwrap()
        .into_job();
    queue.cancel(waiting.id).await.unwrap();
    let j = web.ok("getJobByAgentId", json!([BOB_ARCHIVED])).await;
    assert_eq!(status(&j), "failed");
    assert!(j["error"].as_str().unwrap().contains("cancelled"), "{j}");
    web.ok(
        "completeProvisioningWithMetadata",
        json!([{"jobId": frank_job, "metadata": {"serverId": "43", "serverIp": "203.0.113.43", "tailscaleIp": "100.64.0.43"}}]),
    )
    .await;

    // Whatever the web app reads is in its own words, for every agent.
    for agent in db.lines("SELECT id::text FROM agents").await {
        let j = web.ok("getJobByAgentId", json!([agent])).await;
        if !j.is_null() {
            assert!(WORDS.contains(&status(&j)), "agent {agent}: {j}");
        }
    }
    assert_eq!(
        db.count("SELECT count(*) FROM provisioning_jobs WHERE status::text NOT IN ('queued', 'provisioning', 'running', 'failed')")
            .await,
        0
    );
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon kept serving"
    );
    Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().unwrap().success());
    let _ = std::fs::remove_file(&log);
}

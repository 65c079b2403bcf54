//! Deploying onto the web app's own database: `migrate` adopts the schema its Drizzle migrations
//! made (tests/fixtures/webapp_*.sql, rows in every state), adds only what the daemon needs, and
//! the daemon works there; a dry run, a refused run and a repeated run change nothing; orders for
//! agents or users the web app does not have are refused, not invented.

use crate::support::TestDb;
use provisiond::db::{DatabaseMode, DbError, MigrateOptions, Outcome};
use provisiond::domain::{Executor, JobStatus};
use provisiond::queue::{Fence, NewJob, Queue, QueueError, QueueSettings, StepFields, VmMetadata};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use uuid::Uuid;

const T: Duration = Duration::from_secs(10);
const ALICE: &str = "10000000-0000-0000-0000-000000000001";
const BOB: &str = "10000000-0000-0000-0000-000000000002";
const DAVE: &str = "10000000-0000-0000-0000-000000000004";
const ALICE_SECOND: &str = "a0000000-0000-0000-0000-000000000002";
const BOB_ARCHIVED: &str = "a0000000-0000-0000-0000-000000000006";
const ALICE_RESEARCH: &str = "a0000000-0000-0000-0000-000000000001";

fn uuid(s: &str) -> Uuid {
    s.parse().unwrap()
}

/// Every row of the web app's four tables as JSON objects, by id.
async fn web_app_rows(db: &TestDb) -> BTreeMap<String, serde_json::Value> {
    let mut rows = BTreeMap::new();
    for table in ["users", "agents", "agent_instances", "provisioning_jobs"] {
        for line in db
            .lines(&format!("SELECT to_jsonb(t)::text FROM {table} t"))
            .await
        {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            rows.insert(format!("{table} {}", v["id"].as_str().unwrap()), v);
        }
    }
    rows
}

async fn adopted_queue(db: &TestDb) -> Queue {
    let pool = db.pool().await;
    let mut conn = pool.get().await.unwrap();
    let resolved = provisiond::db::mode::resolve(&mut conn, Default::default())
        .await
        .unwrap();
    drop(conn);
    assert_eq!(
        resolved.mode,
        DatabaseMode::Adopted { users_table: true },
        "{}",
        resolved.reason
    );
    Queue::new(
        pool,
        QueueSettings {
            mode: resolved.mode,
            ..QueueSettings::default()
        },
    )
}

fn order(agent: &str, user: &str, key: &str) -> NewJob {
    NewJob {
        agent_id: uuid(agent),
        user_id: uuid(user),
        region: "eu-central".into(),
        stripe_event_id: None,
        business_key: Some(key.into()),
        executor: Executor::Daemon,
        max_retries: None,
    }
}

#[tokio::test]
async fn migrate_adopts_the_web_apps_schema_and_keeps_every_row() {
    let db = TestDb::web_app().await;
    let before = web_app_rows(&db).await;
    let applied = provisiond::db::migrate(&db.url, T).await.unwrap();
    let embedded = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(applied.len(), embedded, "every migration ran: {applied:?}");

    // Every row is still there with every column the web app wrote, unchanged.
    let after = web_app_rows(&db).await;
    assert_eq!(before.len(), after.len());
    for (id, old) in &before {
        let new = &after[id];
        for (column, value) in old.as_object().unwrap() {
            assert_eq!(&new[column], value, "{id}.{column} changed");
        }
    }
    // The web app's own types and columns stay as they were.
    assert_eq!(
        db.lines("SELECT enumlabel FROM pg_enum WHERE enumtypid = 'job_status'::regtype ORDER BY enumsortorder").await,
        ["queued", "provisioning", "running", "failed"],
        "the web app's job_status keeps its four words"
    );
    assert_eq!(
        db.lines("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'agents'::regclass AND attname = 'status'").await,
        ["agent_status"]
    );
    // The web app's jobs were its runners': the daemon leaves them to them.
    assert_eq!(
        db.count("SELECT count(*) FROM provisioning_jobs WHERE executor <> 'external'")
            .await,
        0
    );
    assert_eq!(
        db.lines("SELECT object FROM provisiond_adopted ORDER BY object")
            .await,
        [
            "agent_instances",
            "agents",
            "job_status",
            "provisioning_jobs",
            "users"
        ]
    );
    // The web app's migration log is untouched.
    assert_eq!(
        db.count("SELECT count(*) FROM drizzle.__drizzle_migrations")
            .await,
        1
    );
}

#[tokio::test]
async fn the_adopted_schema_has_everything_a_fresh_one_has() {
    let fresh = TestDb::new().await;
    let adopted = TestDb::web_app().await;
    provisiond::db::migrate(&adopted.url, T).await.unwrap();
    let have = adopted.catalog().await;
    // The web app's status columns keep their enums, and its job_status has no `cancelled`:
    // documented differences (docs/MIGRATIONS.md). Constraints are compared by definition
    // (the web app's Drizzle names its unique and foreign keys its own way).
    let allowed = [
        "type job_status",
        "column agents.status",
        "column agent_instances.status",
    ];
    let constraint = |line: &str| -> Option<(String, String)> {
        let rest = line.strip_prefix("constraint ")?;
        let (name, def) = rest.split_once(' ')?;
        Some((name.split('.').next()?.to_owned(), def.to_owned()))
    };
    let have_constraints: Vec<(String, String)> =
        have.iter().filter_map(|l| constraint(l)).collect();
    let mut missing = Vec::new();
    for line in fresh.catalog().await {
        let key = provisiond::db::catalog::key(&line);
        let ok = if let Some(c) = constraint(&line) {
            have_constraints.contains(&c)
        } else if allowed.contains(&key) {
            have.iter().any(|l| provisiond::db::catalog::key(l) == key)
        } else {
            have.contains(&line)
        };
        if !ok {
            missing.push(line);
        }
    }
    assert!(
        missing.is_empty(),
        "an adopted database lacks what a fresh one has:\n{}",
        missing.join("\n")
    );
}

#[tokio::test]
async fn the_daemon_works_on_the_adopted_database() {
    let db = TestDb::web_app().await;
    provisiond::db::migrate(&db.url, T).await.unwrap();
    let queue = adopted_queue(&db).await;

    // An order for the web app's agent: no agents row is written, the job is the daemon's.
    let agents_before = db.count("SELECT count(*) FROM agents").await;
    let job = queue
        .enqueue(&order(ALICE_SECOND, ALICE, "cs_adopt_1"))
        .await
        .unwrap()
        .into_job();
    assert_eq!(job.executor(), Executor::Daemon);
    assert_eq!(db.count("SELECT count(*) FROM agents").await, agents_before);

    // Claim, checkpoint (the instance row, enum-typed status), complete (instance `running`,
    // agent `active`, both enums in the web app's schema).
    let claimed = queue.claim("test-worker", 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![job.id],
        "only the daemon's job is claimed; the web app's queued job stays its runner's"
    );
    let lease = claimed[0].lease().unwrap();
    queue
        .checkpoint_step(
            job.id,
            Fence::Lease(lease),
            "vm_created",
            "server created",
            serde_json::json!({}),
            StepFields {
                server_id: Some(Some(77)),
                ..StepFields::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        db.lines(&format!(
            "SELECT status::text || ' ' || current_step FROM agent_instances WHERE job_id = '{}'",
            job.id
        ))
        .await,
        ["provisioning vm_created"]
    );
    let meta = VmMetadata {
        server_id: "77".into(),
        server_ip: "203.0.113.77".into(),
        tailscale_ip: "100.64.0.77".into(),
    };
    let done = queue
        .complete_with_metadata(job.id, Fence::Lease(lease), &meta)
        .await
        .unwrap();
    assert_eq!(done.status(), JobStatus::Running);
    assert_eq!(
        db.lines(&format!(
            "SELECT status::text FROM agents WHERE id = '{ALICE_SECOND}'"
        ))
        .await,
        ["active"]
    );
    assert_eq!(
        db.lines(&format!(
            "SELECT status::text FROM agent_instances WHERE job_id = '{}'",
            job.id
        ))
        .await,
        ["running"]
    );

    // A job that fails for good marks its instance `failed` (a literal into the enum).
    let second = queue
        .enqueue(&order(BOB_ARCHIVED, BOB, "cs_adopt_2"))
        .await
        .unwrap()
        .into_job();
    // Bob's own job (from the web app) is provisioning: Bob's second waits, per user.
    assert!(queue.claim("test-worker", 10).await.unwrap().is_empty());
    db.exec(
        "UPDATE provisioning_jobs SET status = 'running', completed_at = now()
         WHERE id = 'b0000000-0000-0000-0000-000000000003'",
    )
    .await;
    let claimed = queue.claim("test-worker", 10).await.unwrap();
    assert_eq!(claimed[0].id, second.id);
    let lease = claimed[0].lease().unwrap();
    queue
        .record_step(
            second.id,
            Fence::Lease(lease),
            "key_minted",
            "key",
            serde_json::json!({}),
        )
        .await
        .unwrap();
    let failure = provisiond::queue::Failure {
        error: "quota exceeded".into(),
        step: Some("vm_created".into()),
        retryable: false,
    };
    queue.fail(&lease, &failure).await.unwrap();
    queue.finish_rollback(&lease, "rolled back").await.unwrap();
    assert_eq!(
        db.lines(&format!(
            "SELECT status::text FROM agent_instances WHERE job_id = '{}'",
            second.id
        ))
        .await,
        ["failed"]
    );
    // Cancelling writes words the web app knows.
    let third = queue
        .enqueue(&order(ALICE_RESEARCH, ALICE, "cs_adopt_3"))
        .await
        .unwrap()
        .into_job();
    let cancelled = queue.cancel(third.id).await.unwrap();
    assert_eq!(cancelled.status(), JobStatus::Failed);
    assert!(cancelled.cancelled_at.is_some());
    assert_eq!(
        queue
            .list(Some(JobStatus::Cancelled), 10)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect::<Vec<_>>(),
        vec![third.id]
    );
    // The status reads and the sweep run on the adopted enums too.
    queue.sweep().await.unwrap();
    assert!(
        queue
            .latest_job_for_agent(uuid(ALICE_RESEARCH))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        queue
            .instance_for_agent(uuid(ALICE_RESEARCH), None)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn orders_for_agents_or_users_the_web_app_lacks_are_refused_not_invented() {
    let db = TestDb::web_app().await;
    provisiond::db::migrate(&db.url, T).await.unwrap();
    let queue = adopted_queue(&db).await;
    let before = db.checksum().await;

    let stranger = Uuid::new_v4().to_string();
    let err = queue
        .enqueue(&order(&stranger, ALICE, "k1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::UnknownAgent { agent } if agent.to_string() == stranger),
        "{err}"
    );
    let err = queue
        .enqueue(&order(ALICE_SECOND, &stranger, "k2"))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::UnknownUser { .. }), "{err}");
    // Dave exists, but the agent is Alice's.
    let err = queue
        .enqueue(&order(ALICE_SECOND, DAVE, "k3"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::AgentOfAnotherUser { .. }),
        "{err}"
    );
    assert_eq!(
        db.checksum().await,
        before,
        "a refused order writes nothing"
    );

    // The CLI says why, in one line, and exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_provisiond"))
        .env_clear()
        .env("DATABASE_URL", db.url.expose())
        .args(["enqueue", "--agent", &stranger, "--user", ALICE])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("agent {stranger} does not exist")),
        "{stderr}"
    );
    assert_eq!(db.checksum().await, before);
}

#[tokio::test]
async fn a_dry_run_prints_the_plan_and_changes_nothing() {
    let db = TestDb::web_app().await;
    let before = db.checksum().await;
    let outcome = provisiond::db::migrate_with(
        &db.url,
        T,
        MigrateOptions {
            dry_run: true,
            ..MigrateOptions::default()
        },
    )
    .await
    .unwrap();
    let Outcome::Planned(plan) = outcome else {
        panic!("a dry run plans")
    };
    assert_eq!(db.checksum().await, before, "the dry run changed something");
    let text = plan.to_string();
    for expected in [
        "nothing was changed",
        "2026-11-22-000001_provisioning_queue",
        "2026-12-04-000001_web_app_writers",
        "adopting the web app's type job_status, table users, table agents",
        "+ column provisioning_jobs.lease_token uuid",
        "+ index provisioning_jobs.provisioning_jobs_one_provisioning_per_user",
        "+ trigger provisioning_jobs.provisioning_jobs_other_writer",
        "+ table job_events",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert!(!text.contains("WOULD REMOVE"), "{text}");
    // Nothing of the web app's would change: only additions.
    assert!(plan.diff.changed.is_empty(), "{:?}", plan.diff.changed);

    // The same through the binary.
    let out = Command::new(env!("CARGO_BIN_EXE_provisiond"))
        .env_clear()
        .env("DATABASE_URL", db.url.expose())
        .args(["migrate", "--dry-run"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("would add"));
    assert_eq!(db.checksum().await, before);
}

#[tokio::test]
async fn rows_that_violate_new_constraints_stop_migrate_with_their_ids_and_change_nothing() {
    let db = TestDb::web_app().await;
    // Two provisioning jobs for Bob, and a job whose agent is Alice's but names Bob.
    db.batch(
        "INSERT INTO provisioning_jobs (id, agent_id, user_id, status, claimed_at)
         VALUES ('b0000000-0000-0000-0000-0000000000aa', 'a0000000-0000-0000-0000-000000000006',
                 '10000000-0000-0000-0000-000000000002', 'provisioning', now());
         INSERT INTO provisioning_jobs (id, agent_id, user_id, status)
         VALUES ('b0000000-0000-0000-0000-0000000000bb', 'a0000000-0000-0000-0000-000000000001',
                 '10000000-0000-0000-0000-000000000002', 'failed');",
    )
    .await;
    let before = db.checksum().await;
    let err = provisiond::db::migrate(&db.url, T).await.unwrap_err();
    let DbError::Refused(report) = &err else {
        panic!("expected a refusal, got {err}")
    };
    assert_eq!(report.violations.len(), 2, "{report}");
    let text = err.to_string();
    for expected in [
        "nothing was changed",
        "provisioning_jobs_one_provisioning_per_user",
        &format!(
            "user {BOB} has 2 provisioning jobs: b0000000-0000-0000-0000-000000000003, b0000000-0000-0000-0000-0000000000aa"
        ),
        "provisioning_jobs_agent_of_user",
        &format!(
            "job b0000000-0000-0000-0000-0000000000bb: agent {ALICE_RESEARCH} belongs to user {ALICE}, the job names user {BOB}"
        ),
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert_eq!(
        db.checksum().await,
        before,
        "a refused migrate changed something"
    );

    // The binary: non-zero exit, the report on stderr, still nothing changed.
    let out = Command::new(env!("CARGO_BIN_EXE_provisiond"))
        .env_clear()
        .env("DATABASE_URL", db.url.expose())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("b0000000-0000-0000-0000-0000000000bb"),
        "{stderr}"
    );
    assert_eq!(db.checksum().await, before);

    // Fixed by the web app's owners, it goes through.
    db.exec("DELETE FROM provisioning_jobs WHERE id IN ('b0000000-0000-0000-0000-0000000000aa', 'b0000000-0000-0000-0000-0000000000bb')").await;
    provisiond::db::migrate(&db.url, T).await.unwrap();
}

#[tokio::test]
async fn a_schema_that_does_not_fit_is_refused_and_nothing_changes() {
    let db = TestDb::web_app().await;
    db.batch(
        "ALTER TABLE provisioning_jobs ALTER COLUMN region DROP NOT NULL;
         CREATE TABLE job_events (id serial PRIMARY KEY, what text);",
    )
    .await;
    let before = db.checksum().await;
    let err = provisiond::db::migrate(&db.url, T).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("provisioning_jobs.region allows NULL"),
        "{text}"
    );
    assert!(
        text.contains("table job_events exists but provisiond did not create it"),
        "{text}"
    );
    assert_eq!(db.checksum().await, before);
}

#[tokio::test]
async fn migrating_again_is_a_no_op_and_reverting_an_adopted_database_is_refused() {
    let db = TestDb::web_app().await;
    provisiond::db::migrate(&db.url, T).await.unwrap();
    let migrated = db.checksum().await;
    assert!(
        provisiond::db::migrate(&db.url, T)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.checksum().await, migrated);

    let err = provisiond::db::revert_all(&db.url, T).await.unwrap_err();
    assert!(
        err.to_string().contains("existed before provisiond"),
        "{err}"
    );
    assert_eq!(
        db.checksum().await,
        migrated,
        "a refused revert reverted something"
    );
}

#[tokio::test]
async fn a_database_a_newer_release_migrated_is_not_migrated_but_served() {
    let db = TestDb::new().await;
    db.exec("INSERT INTO __diesel_schema_migrations (version) VALUES ('29990101000001')")
        .await;
    let before = db.checksum().await;
    let err = provisiond::db::migrate(&db.url, T).await.unwrap_err();
    assert!(matches!(err, DbError::SchemaAhead(_)), "{err}");
    assert!(err.to_string().contains("29990101000001"), "{err}");
    assert_eq!(db.checksum().await, before);
    let state = provisiond::db::schema_state(&db.url, T).await.unwrap();
    assert!(state.ahead() && state.pending.is_empty());
    // Readiness counts nothing pending: an older daemon keeps serving a rolling upgrade.
    assert!(
        !provisiond::db::pending_migrations(&db.url, T)
            .await
            .unwrap()
    );

    // `serve`'s startup (migrate = true) warns and goes on; `check-config` says so.
    let mut config = provisiond::config::Config::load_with_env(None, Vec::new()).unwrap();
    config.database.url = Some(db.url.clone());
    provisiond::app::open_queue(&config, true).await.unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_provisiond"))
        .env_clear()
        .env("DATABASE_URL", db.url.expose())
        .env("PROVISIOND__WORKER__ENABLED", "false")
        .arg("check-config")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("migrated past this binary by a newer release"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(db.checksum().await, before);
}

#[tokio::test]
async fn check_config_says_which_database_mode_is_in_force() {
    let adopted = TestDb::web_app().await;
    let fresh = TestDb::new().await;
    let run = |db: &TestDb, mode: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_provisiond"));
        cmd.env_clear()
            .env("DATABASE_URL", db.url.expose())
            .env("PROVISIOND__WORKER__ENABLED", "false")
            .arg("check-config");
        if let Some(m) = mode {
            cmd.env("PROVISIOND__DATABASE__MODE", m);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(&adopted, None);
    assert!(ok, "{text}");
    assert!(
        text.contains("mode: adopted (database.mode = \"auto\": a users table exists"),
        "{text}"
    );
    let (ok, text) = run(&fresh, None);
    assert!(
        ok && text.contains("mode: standalone (database.mode = \"auto\""),
        "{text}"
    );
    let (ok, text) = run(&adopted, Some("standalone"));
    assert!(
        !ok,
        "standalone on the web app's database is refused: {text}"
    );
    assert!(text.contains("belong to the web app"), "{text}");
    let (ok, text) = run(&fresh, Some("adopted"));
    assert!(
        ok && text.contains("mode: adopted (database.mode = \"adopted\")"),
        "{text}"
    );
}

#[tokio::test]
async fn refused_orders_are_acknowledged_to_stripe_and_a_4xx_for_the_admin_api() {
    use crate::http_support::{Server, paid_session_event, settings, stripe_header};
    let db = TestDb::web_app().await;
    provisiond::db::migrate(&db.url, T).await.unwrap();
    let s = Server::over(
        db,
        settings(),
        QueueSettings {
            mode: DatabaseMode::Adopted { users_table: true },
            ..QueueSettings::default()
        },
    )
    .await;
    let before = s.checksum().await;
    let stranger = Uuid::new_v4();

    // Admin API: 422 with the reason, nothing written.
    let (code, body) = s
        .post_json(
            "/api/jobs",
            &serde_json::json!({"agent_id": stranger, "user_id": ALICE}),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"], format!("agent {stranger} does not exist"));
    let (code, body) = s
        .post_json(
            "/api/jobs",
            &serde_json::json!({"agent_id": ALICE_SECOND, "user_id": stranger}),
        )
        .await;
    assert_eq!(
        (code, body["error"].clone()),
        (
            422,
            serde_json::json!(format!("user {stranger} does not exist"))
        )
    );
    let (code, _) = s
        .post_json(
            "/api/jobs",
            &serde_json::json!({"agent_id": ALICE_SECOND, "user_id": DAVE}),
        )
        .await;
    assert_eq!(code, 409, "an agent of another user stays a conflict");
    assert_eq!(s.checksum().await, before);

    // Stripe: a paid order for an agent the web app does not have is acknowledged (2xx, so that
    // Stripe does not retry it for days) and kept with its reason for an operator.
    let event = paid_session_event(
        "evt_unknown_agent",
        "cs_unknown_agent",
        stranger,
        uuid(ALICE),
    );
    let (code, body) = s.stripe(&event, &stripe_header(&event)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["outcome"], "not_actionable");
    assert_eq!(
        s.db.lines("SELECT outcome || ': ' || reason FROM stripe_events WHERE event_id = 'evt_unknown_agent'")
            .await,
        [format!("not_actionable: metadata.agent_id {stranger} does not exist")]
    );
    assert_eq!(
        s.db.count(
            "SELECT count(*) FROM provisioning_jobs WHERE business_key = 'cs_unknown_agent'"
        )
        .await,
        0
    );
    // A paid order for the web app's agent goes through.
    let event = paid_session_event("evt_known", "cs_known", uuid(ALICE_SECOND), uuid(ALICE));
    let (code, body) = s.stripe(&event, &stripe_header(&event)).await;
    assert_eq!(
        (code, body["outcome"].as_str()),
        (200, Some("enqueued")),
        "{body}"
    );
}

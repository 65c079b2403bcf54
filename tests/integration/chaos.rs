//! The reliability suite's short version, and its stale-write detector proved on its own: two
//! connections interleaved on purpose, a stale write blocked behind the new owner's transaction.

use crate::support::TestDb;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use provisiond::queue::{Fence, NewJob, Queue, QueueError, QueueSettings, StepFields};
use provisiond::secret::Secret;
use provisiond::tools::chaos::{ChaosPlan, checks};
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_chaos_suite_passes_every_check() {
    let plan = ChaosPlan::short();
    let report = provisiond::tools::chaos::run(&plan, Path::new(env!("CARGO_BIN_EXE_provisiond")))
        .await
        .expect("the suite ran");
    let text = report.render();
    println!("{text}");
    assert_eq!(report.jobs, plan.jobs, "{text}");
    assert_eq!(
        report.kills, plan.kills,
        "every planned kill -9 happened\n{text}"
    );
    assert!(report.pg_restarts >= 1, "{text}");
    assert!(
        report.faults_injected * 10 >= report.api_requests,
        "faults were injected\n{text}"
    );
    let failed: Vec<_> = report.checks().into_iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "failed checks: {failed:?}\n{text}");
}

/// The database with the detector installed, a job claimed by `chaos-d0g1` (lease returned),
/// and a URL for each role.
struct Scene {
    db: TestDb,
    job: Uuid,
    stale_token: Uuid,
}

fn as_app(url: &Secret, app: &str) -> Secret {
    let mut u = url::Url::parse(url.expose()).unwrap();
    u.query_pairs_mut().append_pair("application_name", app);
    Secret::new(u.to_string())
}

async fn queue_as(db: &TestDb, app: &str) -> Queue {
    let pool = provisiond::db::connect(&as_app(&db.url, app), 4, Duration::from_secs(10))
        .await
        .unwrap();
    Queue::new(pool, QueueSettings::default())
}

async fn conn_as(db: &TestDb, app: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(as_app(&db.url, app).expose())
        .await
        .unwrap()
}

async fn scene() -> Scene {
    let db = TestDb::new().await;
    checks::install_stale_write_detector(&db.url).await.unwrap();
    let a = queue_as(&db, "chaos-d0g1").await;
    a.enqueue(&NewJob {
        agent_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        region: "us-east".into(),
        stripe_event_id: None,
        business_key: None,
        executor: provisiond::domain::Executor::Daemon,
        max_retries: None,
    })
    .await
    .unwrap();
    let claimed = a.claim("a", 1).await.unwrap();
    let lease = claimed[0].lease().unwrap();
    Scene {
        db,
        job: lease.job_id,
        stale_token: lease.token,
    }
}

/// Process B (`chaos-d1g1`) sweeps the expired lease and re-claims the job in one open
/// transaction; process A (`chaos-d0g1`) runs `stale_sql` meanwhile, which blocks on the row;
/// then B commits. Returns the rows A's statement wrote.
async fn stale_write_behind_a_reclaim(s: &Scene, stale_sql: &str) -> usize {
    // The lease ran out (A paused); nobody but the sweep may take it now.
    s.db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
        .await;
    let mut b = conn_as(&s.db, "chaos-d1g1").await;
    b.batch_execute(
        "BEGIN;
         UPDATE provisioning_jobs SET status = 'queued', lease_token = NULL, lease_owner = NULL,
             lease_expires_at = NULL, retry_count = retry_count + 1;
         UPDATE provisioning_jobs SET status = 'provisioning', lease_token = gen_random_uuid(),
             lease_owner = 'b', lease_expires_at = now() + interval '1 minute';",
    )
    .await
    .unwrap();
    let mut a = conn_as(&s.db, "chaos-d0g1").await;
    let sql = stale_sql
        .replace("$JOB", &s.job.to_string())
        .replace("$TOKEN", &s.stale_token.to_string());
    let stale = tokio::spawn(async move { diesel::sql_query(sql).execute(&mut a).await });
    // Wait for the event "A waits on B's row lock", not for time.
    let mut waiting = false;
    for _ in 0..2_000 {
        if s.db
            .count(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'chaos-d0g1' AND wait_event_type = 'Lock'",
            )
            .await
            == 1
        {
            waiting = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        waiting,
        "A's statement never blocked behind B's transaction"
    );
    b.batch_execute("COMMIT").await.unwrap();
    stale.await.unwrap().unwrap()
}

async fn recorded(db: &TestDb, rule: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM chaos_stale_writes WHERE rule = '{rule}'"
    ))
    .await
}

/// The shape of the fail statement issue 9 found: the token is checked in a CTE, and the UPDATE
/// joins on the id alone, so it is not re-checked after the row lock wait.
const FENCED_IN_CTE_ONLY: &str = "\
WITH decided AS (
    SELECT id FROM provisioning_jobs
    WHERE id = '$JOB' AND lease_token = '$TOKEN' AND status = 'provisioning'
)
UPDATE provisioning_jobs j SET status = 'failed', error = 'stale', completed_at = now(),
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL
FROM decided d WHERE j.id = d.id";

const FENCED_IN_UPDATE: &str = "\
UPDATE provisioning_jobs SET status = 'failed', error = 'stale', completed_at = now(),
    lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL
WHERE id = '$JOB' AND lease_token = '$TOKEN' AND status = 'provisioning'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_detector_records_a_write_decided_on_a_lease_that_changed_hands_while_it_waited() {
    let s = scene().await;
    let written = stale_write_behind_a_reclaim(&s, FENCED_IN_CTE_ONLY).await;
    assert_eq!(
        written, 1,
        "the stale write landed (the bug the detector must see)"
    );
    assert_eq!(
        recorded(&s.db, "decided on a lease the row no longer has").await,
        1
    );
    assert_eq!(
        s.db.count("SELECT count(*) FROM chaos_stale_writes").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_detector_records_nothing_when_the_stale_write_is_fenced_in_its_update() {
    let s = scene().await;
    let written = stale_write_behind_a_reclaim(&s, FENCED_IN_UPDATE).await;
    assert_eq!(written, 0);
    assert_eq!(
        s.db.count("SELECT count(*) FROM chaos_stale_writes").await,
        0
    );
    assert_eq!(
        s.db.count("SELECT count(*) FROM provisioning_jobs WHERE status = 'provisioning' AND lease_owner = 'b'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_detector_records_a_write_without_a_token_to_a_lease_another_process_holds() {
    let s = scene().await;
    s.db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
        .await;
    let b = queue_as(&s.db, "chaos-d1g1").await;
    assert_eq!(b.sweep().await.unwrap().retried, vec![s.job]);
    s.db.exec("UPDATE provisioning_jobs SET run_after = now()")
        .await;
    assert_eq!(b.claim("b", 1).await.unwrap().len(), 1);
    let mut a = conn_as(&s.db, "chaos-d0g1").await;
    diesel::sql_query(format!(
        "UPDATE provisioning_jobs SET current_step = 'vm_created' WHERE id = '{}'",
        s.job
    ))
    .execute(&mut a)
    .await
    .unwrap();
    assert_eq!(
        recorded(&s.db, "wrote a lease another process holds").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_detector_is_silent_for_the_queue_own_writes_by_old_and_new_owners() {
    let s = scene().await;
    let a = queue_as(&s.db, "chaos-d0g1").await;
    let stale = provisiond::db::models::Lease {
        job_id: s.job,
        token: s.stale_token,
    };
    a.checkpoint(&stale, "key_minted", "minted", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(a.extend_leases(&[stale]).await.unwrap(), vec![s.job]);
    // A pauses; its lease runs out; B sweeps and re-claims.
    s.db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
        .await;
    let b = queue_as(&s.db, "chaos-d1g1").await;
    assert_eq!(b.sweep().await.unwrap().retried, vec![s.job]);
    s.db.exec("UPDATE provisioning_jobs SET run_after = now()")
        .await;
    let fresh = b.claim("b", 1).await.unwrap()[0].lease().unwrap();
    // A wakes up: every fenced write it tries is refused, and none is recorded.
    assert!(matches!(
        a.checkpoint(&stale, "vm_created", "late", serde_json::json!({}))
            .await,
        Err(QueueError::LeaseLost(_))
    ));
    assert!(a.extend_leases(&[stale]).await.unwrap().is_empty());
    assert_eq!(a.hand_back(&[stale]).await.unwrap(), vec![false]);
    let failure = provisiond::queue::Failure {
        error: "late".into(),
        step: None,
        retryable: false,
    };
    assert!(matches!(
        a.fail(&stale, &failure).await,
        Err(QueueError::LeaseLost(_))
    ));
    // B finishes the job the way the step machine does.
    b.checkpoint_step(
        s.job,
        Fence::Lease(fresh),
        "vm_created",
        "created",
        serde_json::json!({}),
        StepFields {
            server_id: Some(Some(100_000_001)),
            ..StepFields::default()
        },
    )
    .await
    .unwrap();
    b.complete(&fresh).await.unwrap();
    assert_eq!(
        s.db.count("SELECT count(*) FROM chaos_stale_writes").await,
        0,
        "no false positive from correct fenced writes"
    );
    assert_eq!(
        s.db.count("SELECT count(*) FROM chaos_claims").await,
        2,
        "both claims recorded"
    );
}

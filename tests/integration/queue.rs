//! The queue against real PostgreSQL: concurrency, fencing, retries, sweep, terminal states.

use crate::support::TestDb;
use provisiond::db::models::{Job, Lease};
use provisiond::domain::{Executor, JobStatus};
use provisiond::queue::{Enqueued, FailOutcome, Failure, NewJob, Queue, QueueError, QueueSettings};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;

fn settings() -> QueueSettings {
    QueueSettings {
        lease_ttl: Duration::from_secs(30),
        ..QueueSettings::default()
    }
}

async fn queue(db: &TestDb) -> Queue {
    Queue::new(db.pool().await, settings())
}

fn new_job(user: Uuid) -> NewJob {
    NewJob {
        agent_id: Uuid::new_v4(),
        user_id: user,
        region: "eu-central".into(),
        stripe_event_id: None,
        business_key: None,
        executor: Executor::Daemon,
        max_retries: None,
    }
}

/// Inserts `n` queued daemon jobs in one statement; `users` distinct users, round robin.
async fn bulk_enqueue(db: &TestDb, n: usize, users: usize) {
    db.exec(&format!(
        "WITH u AS (SELECT g, ('00000000-0000-0000-0000-' || lpad(to_hex(g % {users}), 12, '0'))::uuid AS user_id
                    FROM generate_series(1, {n}) g),
              a AS (INSERT INTO agents (id, user_id) SELECT gen_random_uuid(), user_id FROM u RETURNING id, user_id)
         INSERT INTO provisioning_jobs (agent_id, user_id, created_at)
         SELECT id, user_id, now() + row_number() OVER () * interval '1 microsecond' FROM a"
    ))
    .await;
}

async fn status_of(q: &Queue, id: Uuid) -> JobStatus {
    q.get(id).await.unwrap().unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_claimers_claim_every_job_exactly_once() {
    let db = TestDb::new().await;
    bulk_enqueue(&db, 2000, 2000).await;
    let q = queue(&db).await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("claimer-{w}");
            let mut mine = Vec::new();
            loop {
                let jobs = q.claim(&owner, 16).await.unwrap();
                if jobs.is_empty() {
                    break;
                }
                let leases: Vec<Lease> = jobs.iter().map(|j| j.lease().unwrap()).collect();
                assert!(q.complete_many(&leases).await.unwrap().iter().all(|ok| *ok));
                mine.extend(jobs.into_iter().map(|j| j.id));
            }
            mine
        }));
    }
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for t in tasks {
        for id in t.await.unwrap() {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 2000, "every job claimed");
    assert!(seen.values().all(|n| *n == 1), "no job claimed twice");
    assert_eq!(
        db.count("SELECT count(*) FROM provisioning_jobs WHERE status = 'running'")
            .await,
        2000
    );
    // Each claim and completion left its audit row.
    assert_eq!(
        db.count("SELECT count(*) FROM job_events WHERE message IN ('claimed', 'completed')")
            .await,
        4000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_never_has_two_jobs_provisioning_and_all_get_claimed() {
    let db = TestDb::new().await;
    bulk_enqueue(&db, 50, 1).await;
    let q = queue(&db).await;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (q, in_flight, max_seen) = (q.clone(), in_flight.clone(), max_seen.clone());
        tasks.push(tokio::spawn(async move {
            let owner = format!("claimer-{w}");
            let mut claimed = 0;
            let mut idle_rounds = 0;
            while idle_rounds < 200 {
                let jobs = q.claim(&owner, 10).await.unwrap();
                if jobs.is_empty() {
                    idle_rounds += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                idle_rounds = 0;
                assert_eq!(jobs.len(), 1, "one statement took two jobs of one user");
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_seen.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                q.complete(&jobs[0].lease().unwrap()).await.unwrap();
                claimed += 1;
            }
            claimed
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 50, "all of the user's jobs were claimed");
    assert_eq!(max_seen.load(Ordering::SeqCst), 1, "never two in flight");
}

#[tokio::test]
async fn the_database_refuses_a_second_provisioning_job_for_a_user() {
    let db = TestDb::new().await;
    bulk_enqueue(&db, 2, 1).await;
    let q = queue(&db).await;
    assert_eq!(q.claim("a", 10).await.unwrap().len(), 1);
    // Even a writer that bypasses the claim SQL cannot break the rule.
    let mut conn = db.conn().await;
    let err = diesel_async::RunQueryDsl::execute(
        diesel::sql_query(
            "UPDATE provisioning_jobs SET status = 'provisioning', lease_token = gen_random_uuid() \
             WHERE status = 'queued'",
        ),
        &mut conn,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("one_provisioning_per_user"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_enqueues_of_one_purchase_create_one_row() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let agent = Uuid::new_v4();
    let user = Uuid::new_v4();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let q = q.clone();
        // Half repeat the same event; the other half are other events for the same session.
        let event = if i % 2 == 0 {
            "evt_same".to_owned()
        } else {
            format!("evt_other_{i}")
        };
        tasks.push(tokio::spawn(async move {
            let mut job = new_job(user);
            job.agent_id = agent;
            job.stripe_event_id = Some(event);
            job.business_key = Some("cs_test_session_1".into());
            q.enqueue(&job).await.unwrap()
        }));
    }
    let mut ids = Vec::new();
    let mut created = 0;
    for t in tasks {
        let r = t.await.unwrap();
        created += r.created() as usize;
        ids.push(r.job().id);
    }
    assert_eq!(created, 1);
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "every caller got the same job"
    );
    assert_eq!(db.count("SELECT count(*) FROM provisioning_jobs").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM agents").await, 1);
}

#[tokio::test]
async fn duplicate_event_returns_existing_job_and_wrong_owner_is_refused() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let mut job = new_job(Uuid::new_v4());
    job.stripe_event_id = Some("evt_1".into());
    let first = q.enqueue(&job).await.unwrap();
    assert!(first.created());
    let again = q.enqueue(&job).await.unwrap();
    assert!(matches!(again, Enqueued::Existing(ref j) if j.id == first.job().id));

    // The same agent for another user: refused, nothing written.
    let mut other = new_job(Uuid::new_v4());
    other.agent_id = job.agent_id;
    let err = q.enqueue(&other).await.unwrap_err();
    assert!(
        matches!(err, QueueError::AgentOfAnotherUser { .. }),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) FROM provisioning_jobs").await, 1);
}

async fn next_notification(listener: &mut diesel_async::AsyncPgConnection) -> String {
    use futures::StreamExt;
    let mut stream = std::pin::pin!(listener.notifications_stream());
    let n = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a notification within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(n.channel, provisiond::queue::NOTIFY_CHANNEL);
    n.payload
}

#[tokio::test]
async fn enqueue_wakes_listeners_after_commit_and_foreign_writers_notify_too() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let mut listener = db.conn().await;
    diesel_async::RunQueryDsl::execute(diesel::sql_query("LISTEN provisiond_jobs"), &mut listener)
        .await
        .unwrap();
    // Our queue: one coalesced NOTIFY after the commit.
    q.enqueue(&new_job(Uuid::new_v4())).await.unwrap();
    assert_eq!(next_notification(&mut listener).await, "poke");
    // Anyone else writing the table (the web app, psql) notifies inside its own transaction.
    db.exec("WITH a AS (INSERT INTO agents (id, user_id) VALUES (gen_random_uuid(), gen_random_uuid()) RETURNING id, user_id)
             INSERT INTO provisioning_jobs (agent_id, user_id) SELECT id, user_id FROM a")
        .await;
    assert_eq!(next_notification(&mut listener).await, "enqueued");
}

async fn claim_one(q: &Queue, owner: &str) -> Job {
    let mut jobs = q.claim(owner, 1).await.unwrap();
    assert_eq!(jobs.len(), 1, "{owner} claims a job");
    jobs.remove(0)
}

#[tokio::test]
async fn stale_worker_cannot_write_after_its_job_is_reclaimed() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    q.enqueue(&new_job(Uuid::new_v4())).await.unwrap();
    let stale = claim_one(&q, "worker-a").await;
    let stale_lease = stale.lease().unwrap();

    // Worker A stalls: its lease runs out, the sweep puts the job back, worker B takes it.
    db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
        .await;
    let report = q.sweep().await.unwrap();
    assert_eq!(report.retried, vec![stale.id]);
    db.exec("UPDATE provisioning_jobs SET run_after = now()")
        .await;
    let fresh = claim_one(&q, "worker-b").await;
    assert_eq!(fresh.id, stale.id);
    q.checkpoint(
        &fresh.lease().unwrap(),
        "key_minted",
        "minted",
        serde_json::json!({}),
    )
    .await
    .unwrap();
    let before = q.get(stale.id).await.unwrap().unwrap();

    let lost =
        |r: Result<(), QueueError>| matches!(r, Err(QueueError::LeaseLost(id)) if id == stale.id);
    assert!(lost(
        q.checkpoint(&stale_lease, "vm_created", "stale", serde_json::json!({}))
            .await
    ));
    assert!(lost(q.complete(&stale_lease).await));
    let fail = q
        .fail(
            &stale_lease,
            &Failure {
                error: "stale".into(),
                step: None,
                retryable: false,
            },
        )
        .await;
    assert!(matches!(fail, Err(QueueError::LeaseLost(_))));
    assert!(q.extend_leases(&[stale_lease]).await.unwrap().is_empty());
    assert_eq!(q.hand_back(&[stale_lease]).await.unwrap(), vec![false]);

    let after = q.get(stale.id).await.unwrap().unwrap();
    assert_eq!(before, after, "the stale worker changed nothing");
    assert_eq!(after.lease_owner.as_deref(), Some("worker-b"));
    assert_eq!(after.current_step.as_deref(), Some("key_minted"));
}

#[tokio::test]
async fn expired_leases_retry_with_backoff_until_max_retries_then_roll_back_and_fail() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let mut job = new_job(Uuid::new_v4());
    job.max_retries = Some(2);
    let id = q.enqueue(&job).await.unwrap().job().id;

    for expected_retries in 1..=2 {
        let claimed = claim_one(&q, "w").await;
        q.checkpoint(
            &claimed.lease().unwrap(),
            "vm_created",
            "created",
            serde_json::json!({}),
        )
        .await
        .unwrap();
        db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
            .await;
        let report = q.sweep().await.unwrap();
        assert_eq!(report.retried, vec![id]);
        let j = q.get(id).await.unwrap().unwrap();
        assert_eq!(j.status(), JobStatus::Queued);
        assert_eq!(j.retry_count, expected_retries);
        assert!(j.lease_token.is_none());
        assert!(j.last_error.as_deref().unwrap().contains("lease expired"));
        // Backoff: base 10 s doubled per retry, at least half of it guaranteed.
        let min_delay = chrono::Duration::seconds(5 << (expected_retries - 1));
        assert!(j.run_after > chrono::Utc::now() + min_delay - chrono::Duration::seconds(1));
        assert!(
            q.claim("w", 1).await.unwrap().is_empty(),
            "not claimable during backoff"
        );
        db.exec("UPDATE provisioning_jobs SET run_after = now()")
            .await;
    }
    claim_one(&q, "w").await;
    db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
        .await;
    // No retry left: not failed yet, but requeued at once for the next claimer to roll back.
    let report = q.sweep().await.unwrap();
    assert_eq!(report.rolling_back, vec![id]);
    assert!(report.failed.is_empty() && report.retried.is_empty());
    let j = q.get(id).await.unwrap().unwrap();
    assert_eq!((j.status(), j.retry_count), (JobStatus::Queued, 2));
    assert!(j.rolling_back() && j.run_after <= chrono::Utc::now());
    assert!(
        j.rollback_error
            .as_deref()
            .unwrap()
            .contains("lease expired")
    );
    assert_eq!(
        j.error, None,
        "the web app sees an error only once the job failed"
    );
    let claimed = claim_one(&q, "w").await;
    assert!(claimed.rolling_back(), "the claimer is told to roll back");
    q.finish_rollback(&claimed.lease().unwrap(), "rolled back")
        .await
        .unwrap();
    let j = q.get(id).await.unwrap().unwrap();
    assert_eq!(j.status(), JobStatus::Failed);
    assert_eq!(j.retry_count, 2);
    assert!(j.error.as_deref().unwrap().contains("lease expired"));
    assert_eq!(j.failed_step.as_deref(), Some("vm_created"));
    assert!(j.completed_at.is_some() && j.lease_token.is_none());
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM job_events WHERE job_id = '{id}' AND message = 'rolling back' \
             AND data->>'error' LIKE 'lease expired%'"
        ))
        .await,
        1
    );
}

#[tokio::test]
async fn a_rollback_whose_worker_keeps_dying_is_resumed_then_failed_by_the_sweep() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let mut job = new_job(Uuid::new_v4());
    job.max_retries = Some(1);
    let id = q.enqueue(&job).await.unwrap().job().id;
    let lease = claim_one(&q, "w").await.lease().unwrap();
    let fatal = Failure {
        error: "invalid_input".into(),
        step: Some("vm_created".into()),
        retryable: false,
    };
    assert!(matches!(
        q.fail(&lease, &fatal).await.unwrap(),
        FailOutcome::RollingBack(_)
    ));
    // Each worker that takes the rollback up dies; the rollback is resumed without spending a
    // provisioning attempt, a bounded number of times, then the sweep gives the job up.
    for resumes in 1..=provisiond::queue::MAX_ROLLBACK_RESUMES + 1 {
        db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
            .await;
        let report = q.sweep().await.unwrap();
        let j = q.get(id).await.unwrap().unwrap();
        assert_eq!(j.retry_count, 0, "no provisioning attempt spent");
        if resumes <= provisiond::queue::MAX_ROLLBACK_RESUMES {
            assert_eq!(report.rolling_back, vec![id]);
            assert_eq!(j.rollback_resumes, resumes);
            assert!(
                j.rolling_back() && j.run_after <= chrono::Utc::now(),
                "resumed at once"
            );
            assert!(claim_one(&q, "w2").await.rolling_back());
        } else {
            assert_eq!(report.failed, vec![id]);
            assert_eq!(j.status(), JobStatus::Failed);
            // The error the job gave up with, not the death of its rollback.
            assert_eq!(j.error.as_deref(), Some("invalid_input"));
            assert_eq!(j.failed_step.as_deref(), Some("vm_created"));
            assert!(j.last_error.as_deref().unwrap().contains("lease expired"));
        }
    }
}

#[tokio::test]
async fn worker_failures_retry_with_backoff_or_fail_for_good() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let id = q.enqueue(&new_job(Uuid::new_v4())).await.unwrap().job().id;
    let lease = claim_one(&q, "w").await.lease().unwrap();
    let retry = Failure {
        error: "hetzner 503".into(),
        step: Some("vm_created".into()),
        retryable: true,
    };
    match q.fail(&lease, &retry).await.unwrap() {
        FailOutcome::RetryScheduled { run_after } => {
            assert!(run_after > chrono::Utc::now() + chrono::Duration::seconds(4))
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    let j = q.get(id).await.unwrap().unwrap();
    assert_eq!(
        (j.status(), j.retry_count, j.error.as_deref()),
        (JobStatus::Queued, 1, None)
    );

    db.exec("UPDATE provisioning_jobs SET run_after = now()")
        .await;
    let lease = claim_one(&q, "w").await.lease().unwrap();
    let fatal = Failure {
        error: "invalid_input".into(),
        step: Some("vm_created".into()),
        retryable: false,
    };
    // Failing for good first records the decision, keeping the lease for the rollback.
    let FailOutcome::RollingBack(j) = q.fail(&lease, &fatal).await.unwrap() else {
        panic!("a fatal failure rolls back");
    };
    assert_eq!(j.status(), JobStatus::Provisioning);
    assert_eq!(j.lease_token, Some(lease.token));
    assert_eq!(j.rollback_error.as_deref(), Some("invalid_input"));
    assert_eq!(j.last_error.as_deref(), Some("invalid_input"));
    assert_eq!(j.error, None);
    assert!(q.confirm_lease(&lease).await.unwrap(), "still held");
    assert!(
        matches!(q.complete(&lease).await, Err(QueueError::LeaseLost(_))),
        "a job rolling back never becomes running"
    );
    q.finish_rollback(&lease, "rolled back").await.unwrap();
    let j = q.get(id).await.unwrap().unwrap();
    assert_eq!(j.status(), JobStatus::Failed);
    assert!(j.lease_token.is_none());
    assert_eq!(j.error.as_deref(), Some("invalid_input"));
    assert_eq!(j.failed_step.as_deref(), Some("vm_created"));
    assert_eq!(j.retry_count, 1, "a fatal failure spends no retry");
}

#[tokio::test]
async fn silent_external_runner_is_failed_by_the_sweep_and_by_the_status_check() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut j = new_job(Uuid::new_v4());
        j.executor = Executor::External;
        ids.push(q.enqueue(&j).await.unwrap().job().id);
    }
    // A runner reported `provisioning` for all three; two went silent 1000 s ago.
    db.exec("UPDATE provisioning_jobs SET status = 'provisioning', claimed_at = now(), last_heartbeat_at = now()")
        .await;
    db.exec(&format!(
        "UPDATE provisioning_jobs SET last_heartbeat_at = now() - interval '1000 seconds' WHERE id IN ('{}', '{}')",
        ids[0], ids[1]
    ))
    .await;
    // The daemon never claims external jobs.
    assert!(q.claim("w", 10).await.unwrap().is_empty());

    assert!(q.check_job_timeout(ids[0]).await.unwrap());
    assert!(
        !q.check_job_timeout(ids[2]).await.unwrap(),
        "a live runner is left alone"
    );
    let report = q.sweep().await.unwrap();
    assert_eq!(report.failed, vec![ids[1]]);
    for id in &ids[..2] {
        let j = q.get(*id).await.unwrap().unwrap();
        assert_eq!(j.status(), JobStatus::Failed);
        let err = j.error.unwrap();
        assert!(err.starts_with("Timeout: No heartbeat for 100"), "{err}");
    }
    assert_eq!(status_of(&q, ids[2]).await, JobStatus::Provisioning);
}

#[tokio::test]
async fn running_and_failed_jobs_never_go_back() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let done = q.enqueue(&new_job(Uuid::new_v4())).await.unwrap().job().id;
    let failed = q.enqueue(&new_job(Uuid::new_v4())).await.unwrap().job().id;
    let jobs = q.claim("w", 10).await.unwrap();
    let lease_of = |id| jobs.iter().find(|j| j.id == id).unwrap().lease().unwrap();
    q.complete(&lease_of(done)).await.unwrap();
    let fatal = Failure {
        error: "boom".into(),
        step: None,
        retryable: false,
    };
    q.fail(&lease_of(failed), &fatal).await.unwrap();
    q.finish_rollback(&lease_of(failed), "rolled back")
        .await
        .unwrap();

    // Late writes through the queue are refused by the fence...
    assert!(q.complete(&lease_of(failed)).await.is_err());
    assert!(q.fail(&lease_of(done), &fatal).await.is_err());
    assert!(q.finish_rollback(&lease_of(failed), "again").await.is_err());
    assert!(q.sweep().await.unwrap() == Default::default());
    // ...a daemon session that bypasses it is refused by the database (PV001)...
    let mut daemon = db.conn().await;
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query("SET provisiond.defer_notify = on"),
        &mut daemon,
    )
    .await
    .unwrap();
    // ...and another writer's late update (the web app's `updateJobStatus` after the end) is
    // ignored: the statement succeeds, the row stays terminal, the attempt is recorded.
    let mut other = db.conn().await;
    let updates = [
        (done, "queued"),
        (done, "failed"),
        (failed, "running"),
        (failed, "provisioning"),
    ];
    for (id, to) in updates {
        let sql = format!("UPDATE provisioning_jobs SET status = '{to}' WHERE id = '{id}'");
        let err = diesel_async::RunQueryDsl::execute(diesel::sql_query(&sql), &mut daemon)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot become"), "{err}");
        diesel_async::RunQueryDsl::execute(diesel::sql_query(&sql), &mut other)
            .await
            .unwrap();
    }
    assert_eq!(
        db.count("SELECT count(*) FROM job_events WHERE message = 'late update ignored'")
            .await,
        updates.len() as i64
    );
    assert_eq!(status_of(&q, done).await, JobStatus::Running);
    assert_eq!(status_of(&q, failed).await, JobStatus::Failed);
    // The one way out of `failed` is a recorded operator retry.
    db.exec(&format!(
        "UPDATE provisioning_jobs SET status = 'queued', operator_retries = operator_retries + 1 WHERE id = '{failed}'"
    ))
    .await;
    assert_eq!(status_of(&q, failed).await, JobStatus::Queued);
}

#[tokio::test]
async fn heartbeat_extends_all_held_leases_in_one_statement() {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    bulk_enqueue(&db, 5, 5).await;
    let jobs = q.claim("w", 5).await.unwrap();
    db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() + interval '1 second', last_heartbeat_at = now() - interval '1 minute'").await;
    let leases: Vec<Lease> = jobs.iter().map(|j| j.lease().unwrap()).collect();
    let held = q.extend_leases(&leases).await.unwrap();
    assert_eq!(held.len(), 5);
    assert_eq!(
        db.count("SELECT count(*) FROM provisioning_jobs WHERE lease_expires_at > now() + interval '20 seconds' AND last_heartbeat_at > now() - interval '5 seconds'").await,
        5
    );
}

// ---- Fencing under concurrency -------------------------------------------------------------
//
// Each test below interleaves two connections on purpose. Worker B takes the job over from
// stale worker A inside one open transaction (the real sweep requeues A's expired lease and the
// real claim gives B a new token), so B holds the job's row lock. A's write is then issued from
// another connection and seen waiting on that lock (pg_stat_activity); B commits; A's write
// must come back `LeaseLost` having changed nothing: the job row, its instance and its events
// are byte-identical to what B committed.

/// One statement on a connection of `pool` (of size one: the open transaction lives there).
async fn on(pool: &provisiond::db::Pool, sql: &str) {
    let mut conn = pool.get().await.unwrap();
    diesel_async::RunQueryDsl::execute(diesel::sql_query(sql), &mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[derive(diesel::QueryableByName)]
struct Text1 {
    #[diesel(sql_type = diesel::sql_types::Text)]
    t: String,
}

/// Everything a write to job `id` could change, as text.
fn state_sql(id: Uuid) -> String {
    format!(
        "SELECT concat_ws(E'\\n',
            (SELECT p::text FROM provisioning_jobs p WHERE id = '{id}'),
            (SELECT string_agg(i::text, E'\\n' ORDER BY i.id) FROM agent_instances i WHERE job_id = '{id}'),
            (SELECT string_agg(e::text, E'\\n' ORDER BY e.id) FROM job_events e WHERE job_id = '{id}')
         ) AS t"
    )
}

async fn state_on(conn: &mut diesel_async::AsyncPgConnection, id: Uuid) -> String {
    diesel_async::RunQueryDsl::get_result::<Text1>(diesel::sql_query(state_sql(id)), conn)
        .await
        .unwrap()
        .t
}

/// Worker B's takeover, open: B's pool has one connection, inside `BEGIN`.
struct OpenTakeover {
    pool: provisiond::db::Pool,
    pid: i64,
    fresh: Job,
}

impl OpenTakeover {
    async fn begin(db: &TestDb, id: Uuid) -> OpenTakeover {
        db.exec(&format!(
            "UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = '{id}'"
        ))
        .await;
        let pool = provisiond::db::connect(&db.url, 1, Duration::from_secs(10))
            .await
            .unwrap();
        on(&pool, "BEGIN").await;
        // The queue's statements run on the pool's one connection, so inside the transaction.
        let qb = Queue::new(pool.clone(), settings());
        let report = qb.sweep().await.unwrap();
        assert!(
            report.retried == vec![id] || report.rolling_back == vec![id],
            "{report:?}"
        );
        on(&pool, "UPDATE provisioning_jobs SET run_after = now()").await;
        let fresh = claim_one(&qb, "worker-b").await;
        assert_eq!(fresh.id, id);
        let pid = db_pid(&pool).await;
        OpenTakeover { pool, pid, fresh }
    }

    /// What B is about to commit.
    async fn state(&self) -> String {
        let mut conn = self.pool.get().await.unwrap();
        state_on(&mut conn, self.fresh.id).await
    }

    async fn commit(self) {
        on(&self.pool, "COMMIT").await;
    }
}

async fn db_pid(pool: &provisiond::db::Pool) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let mut conn = pool.get().await.unwrap();
    let p: Pid = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query("SELECT pg_backend_pid() AS pid"),
        &mut *conn,
    )
    .await
    .unwrap();
    p.pid.into()
}

/// Waits (polling the server, not the clock) until some backend waits on a lock `blocker` holds.
async fn wait_until_blocked_by(db: &TestDb, blocker: i64) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock' \
         AND {blocker} = ANY(pg_blocking_pids(pid))",
        db.name
    );
    for _ in 0..6000 {
        if db.count(&sql).await > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the stale write never waited on the new owner's row lock");
}

/// A write stale worker A makes with its old lease.
#[derive(Debug, Clone, Copy)]
enum StaleWrite {
    Fail { retryable: bool },
    Checkpoint,
    CompleteWithMetadata,
    Extend,
    Complete,
    HandBack,
    FinishRollback,
}

async fn write(q: &Queue, lease: Lease, w: StaleWrite) -> Result<(), QueueError> {
    let lost = |held: bool| {
        held.then_some(())
            .ok_or(QueueError::LeaseLost(lease.job_id))
    };
    match w {
        StaleWrite::Fail { retryable } => {
            let failure = Failure {
                error: "stale".into(),
                step: Some("vm_created".into()),
                retryable,
            };
            q.fail(&lease, &failure).await.map(drop)
        }
        StaleWrite::Checkpoint => {
            q.checkpoint(&lease, "vm_created", "stale", serde_json::json!({}))
                .await
        }
        StaleWrite::CompleteWithMetadata => {
            let meta = provisiond::queue::VmMetadata {
                server_id: "1".into(),
                server_ip: "192.0.2.1".into(),
                tailscale_ip: "100.64.0.1".into(),
            };
            q.complete_with_metadata(lease.job_id, provisiond::queue::Fence::Lease(lease), &meta)
                .await
                .map(drop)
        }
        StaleWrite::Extend => lost(!q.extend_leases(&[lease]).await?.is_empty()),
        StaleWrite::Complete => q.complete(&lease).await,
        StaleWrite::HandBack => lost(q.hand_back(&[lease]).await?[0]),
        StaleWrite::FinishRollback => q.finish_rollback(&lease, "stale").await,
    }
}

/// The whole interleaving for one write; `rolling_back` puts A's job in its rollback first.
async fn stale_write_blocked_behind_a_takeover_changes_nothing(w: StaleWrite, rolling_back: bool) {
    let db = TestDb::new().await;
    let q = queue(&db).await;
    let mut job = new_job(Uuid::new_v4());
    job.max_retries = Some(3);
    let id = q.enqueue(&job).await.unwrap().job().id;
    let stale = claim_one(&q, "worker-a").await.lease().unwrap();
    q.checkpoint(&stale, "key_minted", "minted", serde_json::json!({}))
        .await
        .unwrap();
    if rolling_back {
        let fatal = Failure {
            error: "fatal".into(),
            step: None,
            retryable: false,
        };
        assert!(matches!(
            q.fail(&stale, &fatal).await.unwrap(),
            FailOutcome::RollingBack(_)
        ));
    }

    let b = OpenTakeover::begin(&db, id).await;
    assert_ne!(b.fresh.lease_token, Some(stale.token));
    assert_eq!(b.fresh.rolling_back(), rolling_back);
    let committed = b.state().await;
    let a = {
        let q = q.clone();
        tokio::spawn(async move { write(&q, stale, w).await })
    };
    wait_until_blocked_by(&db, b.pid).await;
    assert!(!a.is_finished(), "{w:?} went through a held row lock");
    b.commit().await;

    let result = a.await.unwrap();
    assert!(
        matches!(result, Err(QueueError::LeaseLost(got)) if got == id),
        "{w:?} by the stale worker: {result:?}"
    );
    let mut conn = db.conn().await;
    assert_eq!(
        state_on(&mut conn, id).await,
        committed,
        "{w:?}: the stale write changed the job, its instance or its events"
    );
    let j = q.get(id).await.unwrap().unwrap();
    assert_eq!(j.status(), JobStatus::Provisioning);
    assert_eq!(j.lease_owner.as_deref(), Some("worker-b"));
}

#[tokio::test]
async fn a_stale_fatal_fail_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(
        StaleWrite::Fail { retryable: false },
        false,
    )
    .await;
}

#[tokio::test]
async fn a_stale_retryable_fail_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(
        StaleWrite::Fail { retryable: true },
        false,
    )
    .await;
}

#[tokio::test]
async fn a_stale_checkpoint_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(StaleWrite::Checkpoint, false).await;
}

#[tokio::test]
async fn a_stale_completion_with_metadata_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(StaleWrite::CompleteWithMetadata, false)
        .await;
}

#[tokio::test]
async fn a_stale_heartbeat_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(StaleWrite::Extend, false).await;
}

#[tokio::test]
async fn a_stale_completion_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(StaleWrite::Complete, false).await;
}

#[tokio::test]
async fn a_stale_hand_back_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(StaleWrite::HandBack, false).await;
}

#[tokio::test]
async fn a_stale_end_of_rollback_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(StaleWrite::FinishRollback, true).await;
}

#[tokio::test]
async fn a_stale_fail_of_a_rolling_back_job_blocked_behind_a_reclaim_changes_nothing() {
    stale_write_blocked_behind_a_takeover_changes_nothing(
        StaleWrite::Fail { retryable: false },
        true,
    )
    .await;
}

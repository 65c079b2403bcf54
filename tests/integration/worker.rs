//! The worker against real PostgreSQL: wake-ups, reconnects, lost leases, panics, shutdown.

use crate::support::TestDb;
use futures::FutureExt;
use futures::future::BoxFuture;
use provisiond::domain::{Executor, JobStatus};
use provisiond::queue::{NewJob, Queue, QueueSettings};
use provisiond::worker::{JobContext, JobHandler, NoopHandler, Outcome, Worker, WorkerSettings};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn queue_settings() -> QueueSettings {
    QueueSettings {
        lease_ttl: Duration::from_secs(30),
        ..QueueSettings::default()
    }
}

fn worker_settings(owner: &str) -> WorkerSettings {
    WorkerSettings {
        owner: owner.to_owned(),
        concurrency: 8,
        claim_batch: 8,
        // Long, so that a quick pickup can only come from NOTIFY.
        poll_interval: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
    }
}

fn new_job() -> NewJob {
    NewJob {
        agent_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        region: "us-east".into(),
        stripe_event_id: None,
        business_key: None,
        executor: Executor::Daemon,
        max_retries: None,
    }
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<provisiond::worker::WorkerReport>,
}

impl Running {
    async fn stop(self) -> provisiond::worker::WorkerReport {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

fn start(
    db: &TestDb,
    queue: &Queue,
    handler: Arc<dyn JobHandler>,
    settings: WorkerSettings,
) -> Running {
    let stop = CancellationToken::new();
    let worker = Worker::new(queue.clone(), handler, settings, db.url.clone());
    Running {
        task: tokio::spawn(worker.run(stop.clone())),
        stop,
    }
}

async fn wait_for_status(q: &Queue, id: Uuid, want: JobStatus, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let s = q.get(id).await.unwrap().unwrap().status();
        if s == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "job {id} is {s}, wanted {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until a connection to this database that started after `since_us` (µs since the
/// epoch, PostgreSQL's clock) has run the worker's `LISTEN` and is idle on it: the worker can
/// be woken from then on.
async fn wait_for_listener(db: &TestDb, since_us: i64) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND state = 'idle' \
         AND query = 'LISTEN provisiond_jobs' \
         AND backend_start > to_timestamp({since_us} / 1e6)",
        db.name
    );
    let t0 = Instant::now();
    while db.count(&sql).await == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the worker never listened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// PostgreSQL's clock, µs since the epoch.
async fn db_now_us(db: &TestDb) -> i64 {
    db.count("extract(epoch FROM clock_timestamp()) * 1e6")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_worker_well_inside_the_polling_interval() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool().await, queue_settings());
    let w = start(
        &db,
        &q,
        Arc::new(NoopHandler {
            hold: Duration::ZERO,
        }),
        worker_settings("w"),
    );
    // The worker's LISTEN connection is up (from then on a NOTIFY wakes it).
    wait_for_listener(&db, 0).await;
    for _ in 0..3 {
        let id = q.enqueue(&new_job()).await.unwrap().job().id;
        let took = wait_for_status(&q, id, JobStatus::Running, Duration::from_secs(10)).await;
        assert!(
            took < Duration::from_secs(3),
            "pickup took {took:?}; the poll interval is 30 s"
        );
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_keeps_claiming_after_its_connections_are_terminated() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool().await, queue_settings());
    let w = start(
        &db,
        &q,
        Arc::new(NoopHandler {
            hold: Duration::ZERO,
        }),
        worker_settings("w"),
    );
    wait_for_listener(&db, 0).await;
    let first = q.enqueue(&new_job()).await.unwrap().job().id;
    wait_for_status(&q, first, JobStatus::Running, Duration::from_secs(10)).await;

    // Kill every connection to this database: the pool's and the LISTEN connection.
    let before = db_now_us(&db).await;
    let killed = db
        .count(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            db.name
        ))
        .await;
    assert!(killed >= 2, "terminated {killed} connections");
    // A new LISTEN connection: the listener reconnected.
    wait_for_listener(&db, before).await;

    // The listener reconnects, so new jobs are still picked up far inside the 30 s poll.
    for _ in 0..3 {
        let id = loop {
            // The queue's own pool lost its connections too; the first use may fail once.
            match q.enqueue(&new_job()).await {
                Ok(r) => break r.job().id,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let took = wait_for_status(&q, id, JobStatus::Running, Duration::from_secs(20)).await;
        assert!(
            took < Duration::from_secs(10),
            "pickup after reconnect took {took:?}"
        );
    }
    w.stop().await;
}

/// Holds each job until its stop token fires, counting the jobs it saw.
struct Hold {
    started: Arc<AtomicUsize>,
    outcomes: Arc<std::sync::Mutex<Vec<Outcome>>>,
}

impl JobHandler for Hold {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let outcomes = self.outcomes.clone();
        async move {
            ctx.stop.cancelled().await;
            // Try one more fenced write, as a step at its checkpoint would.
            let outcome = match ctx
                .checkpoint("vm_created", "after stop", serde_json::json!({}))
                .await
            {
                Err(provisiond::queue::QueueError::LeaseLost(_)) => Outcome::LeaseLost,
                _ => Outcome::Interrupted,
            };
            outcomes.lock().unwrap().push(outcome.clone());
            outcome
        }
        .boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_leases_back_without_spending_an_attempt() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool().await, queue_settings());
    let started = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(Hold {
        started: started.clone(),
        outcomes: Default::default(),
    });
    let w = start(&db, &q, handler, worker_settings("w1"));
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(q.enqueue(&new_job()).await.unwrap().job().id);
    }
    for id in &ids {
        wait_for_status(&q, *id, JobStatus::Provisioning, Duration::from_secs(10)).await;
    }
    let report = w.stop().await;
    assert_eq!(report.handed_back, 5);
    assert_eq!(
        db.count("SELECT count(*) FROM provisioning_jobs WHERE status = 'queued' AND retry_count = 0 AND lease_token IS NULL AND run_after <= now()")
            .await,
        5
    );
    // Another worker takes them at once.
    let w2 = start(
        &db,
        &q,
        Arc::new(NoopHandler {
            hold: Duration::ZERO,
        }),
        worker_settings("w2"),
    );
    for id in &ids {
        wait_for_status(&q, *id, JobStatus::Running, Duration::from_secs(5)).await;
    }
    w2.stop().await;
    assert_eq!(
        db.count("SELECT count(*) FROM job_events WHERE message = 'lease handed back'")
            .await,
        5
    );
}

/// Holds its job until its stop token fires, reports that, then waits for the test to release it
/// before trying one more fenced write. While it waits, a worker with one slot cannot claim.
struct HoldUntilReleased {
    stopped: tokio::sync::mpsc::UnboundedSender<Uuid>,
    release: Arc<tokio::sync::Semaphore>,
    outcomes: tokio::sync::mpsc::UnboundedSender<Outcome>,
}

impl JobHandler for HoldUntilReleased {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Outcome> {
        let (stopped, release, outcomes) = (
            self.stopped.clone(),
            self.release.clone(),
            self.outcomes.clone(),
        );
        async move {
            ctx.stop.cancelled().await;
            let _ = stopped.send(ctx.job.id);
            if let Ok(permit) = release.acquire().await {
                permit.forget();
            }
            let outcome = match ctx
                .checkpoint("vm_created", "after stop", serde_json::json!({}))
                .await
            {
                Err(provisiond::queue::QueueError::LeaseLost(_)) => Outcome::LeaseLost,
                _ => Outcome::Interrupted,
            };
            let _ = outcomes.send(outcome.clone());
            outcome
        }
        .boxed()
    }
}

/// Waits for an event the test cannot otherwise order; the bound only keeps a broken build from
/// hanging, it is not a timing claim.
async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what}"))
        .unwrap_or_else(|| panic!("channel closed before {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_lease_is_lost_is_stopped_and_left_to_its_new_owner() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool().await, queue_settings());
    let (stopped_tx, mut stopped) = tokio::sync::mpsc::unbounded_channel();
    let (outcome_tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = Arc::new(HoldUntilReleased {
        stopped: stopped_tx,
        release: release.clone(),
        outcomes: outcome_tx,
    });
    let mut settings = worker_settings("w-stale");
    settings.heartbeat_interval = Duration::from_millis(200);
    // One slot, held by the job until the test releases it: the NOTIFY that the sweep and the
    // requeue send cannot make this worker claim the job back before "w-new" does.
    settings.concurrency = 1;
    settings.claim_batch = 1;
    let w = start(&db, &q, handler, settings);
    let id = q.enqueue(&new_job()).await.unwrap().job().id;
    wait_for_status(&q, id, JobStatus::Provisioning, Duration::from_secs(10)).await;

    // Another process reclaims the job behind this worker's back (as after a long pause).
    let other = take_over(&db).await;
    assert_eq!(other.len(), 1);

    // The next heartbeat notices; the handler is stopped and its write is refused.
    assert_eq!(next(&mut stopped, "stop of the stale job").await, id);
    release.add_permits(1);
    assert_eq!(
        next(&mut outcomes, "outcome of the stale job").await,
        Outcome::LeaseLost
    );
    let report = w.stop().await;
    assert_eq!(report.handed_back, 0, "a lost lease is not handed back");
    let j = q.get(id).await.unwrap().unwrap();
    assert_eq!(j.status(), JobStatus::Provisioning);
    assert_eq!(j.lease_owner.as_deref(), Some("w-new"));
    assert_eq!(j.current_step, None, "the stale write did not land");
}

/// Another daemon takes the job over: its lease runs out, the real sweep and the real claim
/// take it, all in one transaction. Done in separate commits, this worker could renew the
/// lease in between (its heartbeat), or claim the job back first (woken by the sweep's
/// NOTIFY), which made the test above flaky on a loaded machine.
async fn take_over(db: &TestDb) -> Vec<provisiond::db::models::Job> {
    let pool = provisiond::db::connect(&db.url, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let sql = |q: &'static str| {
        let pool = pool.clone();
        async move {
            let mut c = pool.get().await.unwrap();
            diesel_async::RunQueryDsl::execute(diesel::sql_query(q), &mut *c)
                .await
                .unwrap();
        }
    };
    // The pool's one connection carries the transaction, so the queue's statements run in it.
    sql("BEGIN").await;
    sql("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'").await;
    let other = Queue::new(pool.clone(), queue_settings());
    other.sweep().await.unwrap();
    sql("UPDATE provisioning_jobs SET run_after = now()").await;
    let claimed = other.claim("w-new", 1).await.unwrap();
    sql("COMMIT").await;
    claimed
}

/// Fails every attempt for good; records what its rollbacks saw.
struct FailsForGood {
    runs: Arc<AtomicUsize>,
    seen: tokio::sync::mpsc::UnboundedSender<(provisiond::db::models::Job, bool)>,
}

impl JobHandler for FailsForGood {
    fn run(&self, _ctx: JobContext) -> BoxFuture<'static, Outcome> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        async {
            Outcome::Fail {
                error: "quota exceeded".into(),
                step: Some("vm_created".into()),
            }
        }
        .boxed()
    }

    fn rollback(&self, ctx: JobContext) -> BoxFuture<'static, provisiond::worker::RollbackOutcome> {
        let seen = self.seen.clone();
        async move {
            // What the database says while the rollback runs.
            let now = ctx.queue.get(ctx.job.id).await.unwrap().unwrap();
            let held = ctx.queue.confirm_lease(&ctx.lease).await.unwrap();
            let _ = seen.send((now, held));
            provisiond::worker::RollbackOutcome::Done { complete: true }
        }
        .boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_fails_for_good_is_rolled_back_under_its_lease_then_failed() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool().await, queue_settings());
    let runs = Arc::new(AtomicUsize::new(0));
    let (seen, mut rollbacks) = tokio::sync::mpsc::unbounded_channel();
    let handler = Arc::new(FailsForGood {
        runs: runs.clone(),
        seen,
    });
    let fresh = q.enqueue(&new_job()).await.unwrap().job().id;
    // A job whose previous holder died while rolling it back.
    let resumed = q.enqueue(&new_job()).await.unwrap().job().id;
    db.exec(&format!(
        "UPDATE provisioning_jobs SET rollback_started_at = now(), rollback_error = 'deadline', \
         rollback_step = 'vm_running' WHERE id = '{resumed}'"
    ))
    .await;
    let w = start(&db, &q, handler, worker_settings("w"));
    let mut during = std::collections::HashMap::new();
    for _ in 0..2 {
        let (job, held) = rollbacks.recv().await.unwrap();
        during.insert(job.id, (job, held));
    }
    for id in [fresh, resumed] {
        let (job, held) = &during[&id];
        assert_eq!(
            job.status(),
            JobStatus::Provisioning,
            "not failed before the rollback"
        );
        assert!(job.rolling_back() && job.lease_owner.as_deref() == Some("w"));
        assert_eq!(job.error, None);
        assert!(held, "the rollback runs under the lease");
        wait_for_status(&q, id, JobStatus::Failed, Duration::from_secs(10)).await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a rolling-back job is not provisioned"
    );
    let j = q.get(fresh).await.unwrap().unwrap();
    assert_eq!(
        (j.error.as_deref(), j.failed_step.as_deref()),
        (Some("quota exceeded"), Some("vm_created"))
    );
    let j = q.get(resumed).await.unwrap().unwrap();
    assert_eq!(
        (j.error.as_deref(), j.failed_step.as_deref()),
        (Some("deadline"), Some("vm_running"))
    );
    w.stop().await;
}

struct Panics;

impl JobHandler for Panics {
    fn run(&self, _ctx: JobContext) -> BoxFuture<'static, Outcome> {
        async { panic!("handler bug") }.boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_spends_an_attempt_and_the_worker_goes_on() {
    let db = TestDb::new().await;
    let q = Queue::new(db.pool().await, queue_settings());
    let w = start(&db, &q, Arc::new(Panics), worker_settings("w"));
    let a = q.enqueue(&new_job()).await.unwrap().job().id;
    let b = q.enqueue(&new_job()).await.unwrap().job().id;
    for id in [a, b] {
        wait_for_status(&q, id, JobStatus::Queued, Duration::from_secs(10)).await;
        // queued again, but with the attempt spent
        let t0 = Instant::now();
        loop {
            let j = q.get(id).await.unwrap().unwrap();
            if j.retry_count == 1 {
                assert_eq!(j.last_error.as_deref(), Some("handler panicked"));
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    w.stop().await;
}

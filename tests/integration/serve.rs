//! `serve` in process: it watches its tasks (one that dies stops the daemon, in order, with an
//! error naming it) and it claims nothing unless its HTTP listener is bound.

use crate::support::TestDb;
use provisiond::config::Config;
use provisiond::domain::Executor;
use provisiond::queue::{NewJob, Queue, QueueSettings};
use provisiond::sim::{SimConfig, SimHandle, Simulator};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A daemon's config pointed at `db` and `sim`, provisioning enabled, HTTP on `listen`.
fn config(db: &TestDb, sim: &SimHandle, listen: &str) -> Config {
    let cfg = sim.config();
    let (hetzner, token, tailscale) = (
        sim.hetzner_base_url(),
        sim.hetzner_token(),
        sim.tailscale_base_url(),
    );
    let env = [
        ("DATABASE_URL", db.url.expose()),
        ("PROVISIOND__HTTP__LISTEN", listen),
        ("PROVISIOND__WORKER__POLL_INTERVAL", "200ms"),
        ("PROVISIOND__HETZNER__BASE_URL", hetzner.as_str()),
        ("PROVISIOND__HETZNER__TOKEN", token.expose()),
        ("PROVISIOND__TAILSCALE__BASE_URL", tailscale.as_str()),
        ("PROVISIOND__TAILSCALE__CLIENT_ID", &cfg.tailscale_client_id),
        (
            "PROVISIOND__TAILSCALE__CLIENT_SECRET",
            cfg.tailscale_client_secret.expose(),
        ),
    ];
    let env = env.map(|(k, v)| (k.to_owned(), v.to_owned()));
    Config::load_with_env(None, env).unwrap()
}

/// Runs the daemon to its end after `task` was aborted (as a crash of it would end it).
async fn kill_task(db: &TestDb, sim: &SimHandle, task: &str) -> anyhow::Error {
    let daemon = provisiond::app::start(config(db, sim, "127.0.0.1:0"), CancellationToken::new())
        .await
        .unwrap()
        .expect("started");
    assert_eq!(daemon.task_names(), ["worker", "http server"]);
    let addr = daemon.http_addr().expect("listening");
    tokio::net::TcpStream::connect(addr).await.expect("serving");
    assert!(daemon.abort_task(task));
    // A guard against a hang, not a measurement: `run` returns once every task stopped.
    let ended = tokio::time::timeout(Duration::from_secs(60), daemon.run()).await;
    let err = ended.expect("serve stopped").unwrap_err();
    // Every task was shut down, the listener with it.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_dies_stops_serve_with_an_error() {
    let db = TestDb::new().await;
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let err = kill_task(&db, &sim, "http server").await;
    assert_eq!(err.to_string(), "the http server task was aborted");
    let err = kill_task(&db, &sim, "worker").await;
    assert_eq!(err.to_string(), "the worker task was aborted");
}

/// A port already taken: `serve` fails at the bind, before any worker exists, so the queued
/// job was never claimed. (The start order itself is shown by
/// `cli::serve_binds_its_listener_before_the_worker_starts`; this guards the failure path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_that_cannot_listen_claims_nothing() {
    let db = TestDb::new().await;
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let q = Queue::new(db.pool().await, QueueSettings::default());
    q.enqueue(&NewJob {
        agent_id: uuid::Uuid::new_v4(),
        user_id: uuid::Uuid::new_v4(),
        region: "eu-central".into(),
        stripe_event_id: None,
        business_key: None,
        executor: Executor::Daemon,
        max_retries: None,
    })
    .await
    .unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let err = provisiond::app::serve(config(&db, &sim, &listen), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot listen"), "{err}");
    assert_eq!(
        db.count("SELECT count(*) FROM provisioning_jobs WHERE status = 'queued' AND claimed_at IS NULL AND lease_token IS NULL")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM job_events WHERE message <> 'enqueued'")
            .await,
        0
    );
    assert!(sim.state().servers.is_empty());
}

//! The step machine against real PostgreSQL and the simulator over HTTP.

mod support;

use provisiond::clients::hetzner::HetznerClient;
use provisiond::clients::tailscale::TailscaleClient;
use provisiond::config::Regions;
use provisiond::db::models::Job;
use provisiond::domain::{Executor, JobStatus};
use provisiond::provision::watch::WatchSettings;
use provisiond::provision::{ProvisionSettings, Provisioner, server_name};
use provisiond::queue::{NewJob, Queue, QueueSettings};
use provisiond::sim::{SimConfig, SimHandle, Simulator};
use provisiond::worker::{JobContext, JobHandler, Worker, WorkerSettings};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::TestDb;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Env {
    db: TestDb,
    sim: SimHandle,
    queue: Queue,
}

async fn env(sim: SimConfig) -> Env {
    let db = TestDb::new().await;
    let queue = Queue::new(
        db.pool().await,
        QueueSettings {
            lease_ttl: Duration::from_secs(30),
            // Retries come back quickly in tests.
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_millis(400),
            ..QueueSettings::default()
        },
    );
    let sim = Simulator::start(sim).await.expect("simulator");
    Env { db, sim, queue }
}

fn provisioner(sim: &SimHandle, deadline: Duration) -> Provisioner {
    let mut h = sim.hetzner_config();
    h.retry_base = Duration::from_millis(20);
    Provisioner::new(
        HetznerClient::new(h),
        TailscaleClient::new(sim.tailscale_config()),
        ProvisionSettings {
            server_type: "cpx22".into(),
            image: "ubuntu-24.04".into(),
            ssh_keys: vec![],
            regions: Regions::default(),
            tags: vec!["tag:customer-vm".into()],
            key_expiry: Duration::from_secs(3600),
            deadline,
            rollback_timeout: Duration::from_secs(10),
        },
        WatchSettings {
            min_interval: Duration::from_millis(20),
            max_interval: Duration::from_millis(300),
            device_max_interval: Duration::from_millis(100),
        },
    )
}

fn job(region: &str) -> NewJob {
    NewJob {
        agent_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        region: region.into(),
        stripe_event_id: None,
        business_key: None,
        executor: Executor::Daemon,
        max_retries: None,
    }
}

fn worker(
    env: &Env,
    p: Provisioner,
    owner: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<provisiond::worker::WorkerReport>,
) {
    let stop = CancellationToken::new();
    let w = Worker::new(
        env.queue.clone(),
        Arc::new(p),
        WorkerSettings {
            owner: owner.into(),
            concurrency: 64,
            claim_batch: 16,
            poll_interval: Duration::from_millis(200),
            heartbeat_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
        },
        env.db.url.clone(),
    );
    (stop.clone(), tokio::spawn(w.run(stop)))
}

/// Waits until every job is terminal; returns them.
async fn settle(q: &Queue, ids: &[Uuid], within: Duration) -> Vec<Job> {
    let t0 = Instant::now();
    loop {
        let mut jobs = Vec::new();
        for id in ids {
            jobs.push(q.get(*id).await.unwrap().unwrap());
        }
        if jobs.iter().all(|j| j.status().is_terminal()) {
            return jobs;
        }
        if t0.elapsed() > within {
            let stuck: Vec<_> = jobs
                .iter()
                .filter(|j| !j.status().is_terminal())
                .map(|j| {
                    (
                        j.id,
                        j.status(),
                        j.current_step.clone(),
                        j.last_error.clone(),
                    )
                })
                .collect();
            panic!("jobs not terminal after {within:?}: {stuck:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn servers_of(sim: &SimHandle, job: Uuid) -> Vec<i64> {
    sim.state()
        .servers
        .iter()
        .filter(|s| s.labels.get("job") == Some(&job.to_string()))
        .map(|s| s.id)
        .collect()
}

fn devices_of(sim: &SimHandle, job: Uuid) -> usize {
    let name = server_name(job);
    sim.state()
        .devices
        .iter()
        .filter(|d| d.hostname == name)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_provisions_one_server_and_one_device_and_records_everything() {
    let env = env(SimConfig::default()).await;
    let (stop, task) = worker(&env, provisioner(&env.sim, Duration::from_secs(30)), "w");
    let new = job("eu-central");
    let id = env.queue.enqueue(&new).await.unwrap().job().id;
    let j = settle(&env.queue, &[id], Duration::from_secs(30))
        .await
        .remove(0);
    stop.cancel();
    task.await.unwrap();
    if j.status() != JobStatus::Running {
        for e in env.queue.events(id).await.unwrap() {
            eprintln!("{} {:?} {} {}", e.at, e.step, e.message, e.data);
        }
    }
    assert_eq!(j.status(), JobStatus::Running, "{:?}", j.last_error);
    assert!(j.completed_at.is_some() && j.current_step.is_none());
    let server = j.server_id.unwrap();
    assert_eq!(servers_of(&env.sim, id), vec![server]);
    assert_eq!(devices_of(&env.sim, id), 1);
    let state = env.sim.state();
    let s = state.servers.iter().find(|s| s.id == server).unwrap();
    assert_eq!(s.name, server_name(id));
    assert_eq!(
        s.labels.get("managed-by").map(String::as_str),
        Some("provisiond")
    );
    assert_eq!(s.location, "fsn1");
    let keys: Vec<_> = state
        .keys
        .iter()
        .filter(|k| Some(&k.id) == j.tailscale_key_id.as_ref())
        .collect();
    assert_eq!(keys.len(), 1);
    assert!(
        keys[0].uses == 1 && keys[0].revoked.is_some(),
        "key consumed and revoked: {:?}",
        keys[0]
    );
    assert!(!keys[0].reusable && keys[0].ephemeral && keys[0].preauthorized);

    let db = &env.db;
    assert_eq!(db.count(&format!(
        "SELECT count(*) FROM agent_instances WHERE job_id = '{id}' AND status = 'running' AND server_id = '{server}' \
         AND server_ip = '{}' AND tailscale_ip LIKE '100.%' AND region = 'eu-central' AND started_at IS NOT NULL AND current_step IS NULL",
        j.server_ip.clone().unwrap()
    )).await, 1);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM agents WHERE id = '{}' AND status = 'active'",
            new.agent_id
        ))
        .await,
        1
    );
    for step in [
        "key_minted",
        "vm_created",
        "vm_running",
        "network_configured",
    ] {
        assert!(
            db.count(&format!(
                "SELECT count(*) FROM job_events WHERE job_id = '{id}' AND step = '{step}'"
            ))
            .await
                >= 1,
            "event for {step}"
        );
    }
    // Hetzner requests for one VM: create, one or two action polls, one server read.
    let hetzner: u64 = state
        .requests
        .iter()
        .filter(|(r, _)| r.contains(" /v1/"))
        .map(|(_, m)| m.values().sum::<u64>())
        .sum();
    assert!(
        hetzner <= 5,
        "{hetzner} Hetzner requests: {:?}",
        state.requests
    );
}

/// Runs one attempt of the next job with a provisioner that "dies" at `point`, then makes the
/// job claimable again as the sweep would after the dead process's lease expired.
async fn crash_at(env: &Env, point: &'static str) {
    let p = provisioner(&env.sim, Duration::from_secs(30))
        .with_failpoint(Arc::new(move |at| at == point));
    let job = env.queue.claim("doomed", 1).await.unwrap().remove(0);
    let ctx = JobContext {
        lease: job.lease().unwrap(),
        job,
        queue: env.queue.clone(),
        stop: CancellationToken::new(),
    };
    p.run(ctx).await;
    env.db
        .exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
        .await;
    assert_eq!(
        env.queue.sweep().await.unwrap().retried.len(),
        1,
        "crashed at {point}: job retried"
    );
    env.db
        .exec("UPDATE provisioning_jobs SET run_after = now()")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_step_boundary_resumes_to_exactly_one_server() {
    let points = [
        "before_key",
        "after_checkpoint:key_minted",
        "before_create",
        "after_create",
        "after_checkpoint:vm_created",
        "after_checkpoint:vm_running",
        "after_checkpoint:network_configured",
    ];
    for point in points {
        let env = env(SimConfig::default()).await;
        let id = env.queue.enqueue(&job("us-east")).await.unwrap().job().id;
        crash_at(&env, point).await;
        let (stop, task) = worker(
            &env,
            provisioner(&env.sim, Duration::from_secs(30)),
            "survivor",
        );
        let j = settle(&env.queue, &[id], Duration::from_secs(30))
            .await
            .remove(0);
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            j.status(),
            JobStatus::Running,
            "{point}: {:?}",
            j.last_error
        );
        assert_eq!(
            servers_of(&env.sim, id),
            vec![j.server_id.unwrap()],
            "{point}: exactly one server"
        );
        assert_eq!(env.sim.state().servers.len(), 1, "{point}: no orphan");
        assert_eq!(devices_of(&env.sim, id), 1, "{point}: one device");
        // Every key minted for the job is revoked (the unused one of a crashed attempt too).
        let state = env.sim.state();
        assert!(
            state.keys.iter().all(|k| k.revoked.is_some()),
            "{point}: {:?}",
            state.keys
        );
        assert_eq!(j.retry_count, 1, "{point}");
    }
}

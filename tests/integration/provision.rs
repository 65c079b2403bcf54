//! The step machine against real PostgreSQL and the simulator over HTTP.

use crate::support::TestDb;
use provisiond::clients::hetzner::HetznerClient;
use provisiond::clients::tailscale::TailscaleClient;
use provisiond::config::Regions;
use provisiond::db::models::Job;
use provisiond::domain::{Executor, JobStatus};
use provisiond::provision::watch::WatchSettings;
use provisiond::provision::{ProvisionSettings, Provisioner, server_name};
use provisiond::queue::{NewJob, Queue, QueueSettings};
use provisiond::sim::{SimConfig, SimHandle, Simulator};
use provisiond::tools::sim_clients::SimClients;
use provisiond::worker::{JobContext, JobHandler, Worker, WorkerSettings};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    // The run shows in the Prometheus text, labelled by templates, never by ids.
    let metrics = provisiond::metrics::encode_text();
    for want in [
        r#"provisiond_step_duration_seconds_count{step="network_configured",outcome="ok"}"#,
        r#"endpoint="/servers",code="201""#,
        r#"endpoint="/servers/{id}",code="200""#,
        r#"endpoint="/tailnet/{tailnet}/keys",code="200""#,
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
    assert!(
        !metrics.contains(&server.to_string()),
        "a server id reached a label"
    );
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

async fn run_jobs(env: &Env, p: Provisioner, jobs: &[NewJob], within: Duration) -> Vec<Job> {
    let (stop, task) = worker(env, p, "w");
    let mut ids = Vec::new();
    for j in jobs {
        ids.push(env.queue.enqueue(j).await.unwrap().job().id);
    }
    let done = settle(&env.queue, &ids, within).await;
    stop.cancel();
    task.await.unwrap();
    done
}

fn fault(route: &str, kind: &str, times: u32) -> provisiond::sim::FaultRule {
    serde_json::from_value(serde_json::json!({ "route": route, "fault": kind, "times": times }))
        .unwrap()
}

/// A failed job left nothing behind: no server, no device, every key revoked, instance failed.
async fn assert_rolled_back(env: &Env, j: &Job) {
    assert_eq!(j.status(), JobStatus::Failed);
    assert!(j.error.is_some() && j.failed_step.is_some(), "{j:?}");
    let state = env.sim.state();
    let live: Vec<_> = state
        .servers
        .iter()
        .filter(|s| {
            s.labels.get("job") == Some(&j.id.to_string())
                && s.status != provisiond::sim::ServerStatus::Deleting
        })
        .collect();
    if !live.is_empty() {
        for e in env.queue.events(j.id).await.unwrap() {
            eprintln!("{} {:?} {} {}", e.at, e.step, e.message, e.data);
        }
    }
    assert!(
        live.is_empty(),
        "servers left: {live:?}; job error {:?} at {:?}",
        j.error,
        j.failed_step
    );
    assert_eq!(devices_of(&env.sim, j.id), 0);
    let desc = provisiond::provision::key_description(j.id);
    assert!(
        state
            .keys
            .iter()
            .filter(|k| k.description == desc)
            .all(|k| k.revoked.is_some())
    );
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM agent_instances WHERE job_id = '{}' AND status <> 'failed'",
                j.id
            ))
            .await,
        0
    );
}

/// A server for `job` made behind this daemon's back (by another daemon, or by hand), with a
/// valid key in its user_data so that it joins the tailnet.
async fn create_server_for(p: &Provisioner, job: Uuid) -> i64 {
    let tags = vec!["tag:customer-vm".to_owned()];
    let key = p
        .tailscale()
        .create_auth_key(&provisiond::clients::tailscale::CreateKey::single_use(
            "elsewhere",
            Duration::from_secs(600),
            tags.clone(),
        ))
        .await
        .unwrap();
    let ud =
        provisiond::provision::cloud_init::user_data(&server_name(job), key.key.expose(), &tags)
            .unwrap();
    p.hetzner()
        .create_server(&provisiond::clients::hetzner::CreateServerRequest {
            name: server_name(job),
            server_type: "cpx22".into(),
            image: "ubuntu-24.04".into(),
            location: Some("fsn1".into()),
            user_data: Some(ud),
            labels: [
                ("managed-by".to_owned(), "provisiond".to_owned()),
                ("job".to_owned(), job.to_string()),
            ]
            .into(),
            ssh_keys: vec![],
            start_after_create: true,
            public_net: None,
        })
        .await
        .unwrap()
        .server
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uniqueness_error_on_create_adopts_the_existing_server() {
    let env = env(SimConfig::default()).await;
    let new = job("eu-central");
    let id = env.queue.enqueue(&new).await.unwrap().job().id;
    // Another process created this job's server already (say, a daemon whose lease ran out).
    let p = provisioner(&env.sim, Duration::from_secs(30));
    let existing = create_server_for(&p, id).await;
    let (stop, task) = worker(&env, p, "w");
    let j = settle(&env.queue, &[id], Duration::from_secs(30))
        .await
        .remove(0);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(j.status(), JobStatus::Running, "{:?}", j.last_error);
    assert_eq!(j.server_id, Some(existing), "adopted, not duplicated");
    assert_eq!(servers_of(&env.sim, id), vec![existing]);
    assert_eq!(
        env.sim.state().count_status("POST /v1/servers", 409),
        1,
        "one create, refused, never repeated"
    );
    assert!(env.db.count(&format!("SELECT count(*) FROM job_events WHERE job_id = '{id}' AND message LIKE 'name already taken%'")).await == 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_in_the_first_location_falls_back_to_the_next() {
    let mut sim = SimConfig::default();
    sim.faults.unavailable_locations = vec!["fsn1".into()];
    let env = env(sim).await;
    let j = run_jobs(
        &env,
        provisioner(&env.sim, Duration::from_secs(30)),
        &[job("eu-central")],
        Duration::from_secs(30),
    )
    .await
    .remove(0);
    assert_eq!(j.status(), JobStatus::Running, "{:?}", j.last_error);
    assert_eq!(j.location.as_deref(), Some("nbg1"));
    assert_eq!(env.sim.state().servers.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_left_off_is_powered_on() {
    let mut sim = SimConfig::default();
    sim.latency.boot = Duration::from_millis(400);
    sim.faults.leave_off = true;
    let env = env(sim).await;
    let (stop, task) = worker(&env, provisioner(&env.sim, Duration::from_secs(30)), "w");
    let id = env
        .queue
        .enqueue(&job("eu-central"))
        .await
        .unwrap()
        .job()
        .id;
    // Once the daemon has noticed and powered the server on, the fault is gone.
    let t0 = Instant::now();
    while env
        .sim
        .state()
        .count("POST /v1/servers/{id}/actions/poweron")
        == 0
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "never powered on");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.sim.set_faults(Default::default());
    let j = settle(&env.queue, &[id], Duration::from_secs(30))
        .await
        .remove(0);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(j.status(), JobStatus::Running, "{:?}", j.last_error);
    assert_eq!(env.sim.state().servers.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_actions_fail_the_job_and_roll_back() {
    let mut sim = SimConfig::default();
    sim.faults.fail_actions = true;
    let env = env(sim).await;
    let j = run_jobs(
        &env,
        provisioner(&env.sim, Duration::from_secs(30)),
        &[job("us-east")],
        Duration::from_secs(40),
    )
    .await
    .remove(0);
    assert_rolled_back(&env, &j).await;
    assert!(
        j.error.as_deref().unwrap().contains("stays off"),
        "{:?}",
        j.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retry_of_a_rolled_back_job_provisions_it_afresh() {
    let mut sim = SimConfig::default();
    sim.faults.fail_actions = true;
    let env = env(sim).await;
    let failed = run_jobs(
        &env,
        provisioner(&env.sim, Duration::from_secs(30)),
        &[job("eu-central")],
        Duration::from_secs(40),
    )
    .await
    .remove(0);
    assert_rolled_back(&env, &failed).await;
    // The cloud recovers; an operator retries the job.
    env.sim.set_faults(Default::default());
    let retried = env.queue.retry_now(failed.id).await.unwrap();
    assert_eq!(
        (
            retried.status(),
            retried.retry_count,
            retried.operator_retries
        ),
        (JobStatus::Queued, 0, 1)
    );
    assert!(
        retried.server_id.is_none() && retried.current_step.is_none(),
        "no stale checkpoint: {retried:?}"
    );
    let (stop, task) = worker(&env, provisioner(&env.sim, Duration::from_secs(30)), "w2");
    let j = settle(&env.queue, &[failed.id], Duration::from_secs(30))
        .await
        .remove(0);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(j.status(), JobStatus::Running, "{:?}", j.last_error);
    assert_eq!(j.retry_count, 0, "no attempt wasted on the deleted server");
    assert_eq!(servers_of(&env.sim, j.id).len(), 1);
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM agent_instances WHERE job_id = '{}' AND status = 'running'",
                j.id
            ))
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_joins_fails_at_the_deadline_and_rolls_back() {
    let mut sim = SimConfig::default();
    sim.faults.no_enrollment = true;
    let env = env(sim).await;
    let j = run_jobs(
        &env,
        provisioner(&env.sim, Duration::from_secs(2)),
        &[job("eu-central")],
        Duration::from_secs(30),
    )
    .await
    .remove(0);
    assert_rolled_back(&env, &j).await;
    assert!(
        j.error.as_deref().unwrap().contains("deadline"),
        "{:?}",
        j.error
    );
    assert_eq!(j.failed_step.as_deref(), Some("network_configured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_and_rate_limits_leave_no_job_stuck_or_failed() {
    // After a 429 the budget refills at limit/3600 per second, as Hetzner's does; a large
    // project limit keeps that recovery quick enough for a test.
    let mut sim = SimConfig {
        rate_limit_per_hour: 360_000,
        rate_limit_burst: 360_000,
        hang: Duration::from_millis(1500),
        ..SimConfig::default()
    };
    sim.faults.rules = vec![
        // Hetzner 429s first (a `*` rule would also hit Tailscale routes).
        fault("POST /v1/servers", "429", 1),
        fault("GET /v1/actions", "429", 1),
        fault("POST /v1/servers", "502", 2),
        fault("POST /v1/servers", "timeout", 1),
        fault("GET /v1/actions", "503", 2),
        fault("GET /v1/servers/{id}", "500", 2),
        fault("*", "429", 1),
        fault("POST /api/v2/tailnet/{tailnet}/keys", "500", 1),
    ];
    let env = env(sim).await;
    let mut h = env.sim.hetzner_config();
    h.retry_base = Duration::from_millis(20);
    h.request_timeout = Duration::from_millis(700);
    let p = Provisioner::new(
        HetznerClient::new(h),
        TailscaleClient::new(env.sim.tailscale_config()),
        provisioner(&env.sim, Duration::from_secs(30))
            .settings()
            .clone(),
        WatchSettings {
            min_interval: Duration::from_millis(20),
            max_interval: Duration::from_millis(300),
            device_max_interval: Duration::from_millis(100),
        },
    );
    let jobs: Vec<NewJob> = (0..6)
        .map(|i| job(["eu-central", "us-east", "us-west"][i % 3]))
        .collect();
    let done = run_jobs(&env, p, &jobs, Duration::from_secs(90)).await;
    if std::env::var_os("SHOW_TIMELINE").is_some() {
        for j in &done {
            for e in env.queue.events(j.id).await.unwrap() {
                eprintln!(
                    "{} {} {:?} {} {}",
                    &j.id.to_string()[..8],
                    e.at.format("%H:%M:%S%.3f"),
                    e.step,
                    e.message,
                    e.data
                );
            }
        }
    }
    for j in &done {
        match j.status() {
            JobStatus::Running => assert_eq!(
                servers_of(&env.sim, j.id),
                vec![j.server_id.unwrap()],
                "one server for {}",
                j.id
            ),
            _ => assert_rolled_back(&env, j).await,
        }
    }
    assert!(
        done.iter().all(|j| j.status() == JobStatus::Running),
        "transient faults cost retries, not jobs: {done:?}"
    );
    // Only the injected 429s: after each, the budget waited for a refill instead of sending
    // into an empty bucket, so the simulator's own limit never refused anything.
    let state = env.sim.state();
    assert!(!state.rate_limited.is_empty(), "the 429 faults fired");
    assert!(state.rate_limited.len() <= 3, "{:?}", state.rate_limited);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_deletes_unowned_resources_and_leaves_live_ones_alone() {
    use provisiond::provision::reaper::reap;
    let env = env(SimConfig::default()).await;
    let p = provisioner(&env.sim, Duration::from_secs(30));
    // A live job's server and device.
    let live = run_jobs(
        &env,
        p.clone(),
        &[job("eu-central")],
        Duration::from_secs(30),
    )
    .await
    .remove(0);
    assert_eq!(live.status(), JobStatus::Running);
    // An orphan: a labelled server, with a device, for a job this database never had.
    let ghost = Uuid::new_v4();
    let orphan = create_server_for(&p, ghost).await;
    // Let it boot and join.
    let t0 = Instant::now();
    while devices_of(&env.sim, ghost) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        let _ = p.hetzner().get_server(orphan).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tags = vec!["tag:customer-vm".to_owned()];
    // Within the grace period nothing is touched.
    let young = reap(
        &env.queue,
        p.hetzner(),
        p.tailscale(),
        &tags,
        Duration::from_secs(3600),
    )
    .await;
    assert!(young.servers_deleted.is_empty() && young.devices_deleted.is_empty());
    assert_eq!(young.too_young, 2);
    // Past it, the orphans go and the live job's resources stay.
    let report = reap(
        &env.queue,
        p.hetzner(),
        p.tailscale(),
        &tags,
        Duration::ZERO,
    )
    .await;
    assert_eq!(report.servers_deleted, vec![orphan], "{report:?}");
    assert_eq!(report.devices_deleted.len(), 1, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(devices_of(&env.sim, ghost), 0);
    assert_eq!(devices_of(&env.sim, live.id), 1);
    let _ = p.hetzner().get_server(live.server_id.unwrap()).await;
    assert_eq!(servers_of(&env.sim, live.id), vec![live.server_id.unwrap()]);
    assert!(
        env.sim
            .state()
            .servers
            .iter()
            .all(|s| s.id != orphan || s.status == provisiond::sim::ServerStatus::Deleting)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_on_one_database_provision_100_jobs_without_duplicates() {
    let env = env(SimConfig::default()).await;
    // Two daemons: their own pools, clients (so their own rate budgets) and watchers.
    let second_queue = Queue::new(env.db.pool().await, env.queue.settings().clone());
    let (stop_a, a) = worker(
        &env,
        provisioner(&env.sim, Duration::from_secs(60)),
        "daemon-a",
    );
    let stop_b = CancellationToken::new();
    let b = tokio::spawn(
        Worker::new(
            second_queue,
            Arc::new(provisioner(&env.sim, Duration::from_secs(60))),
            WorkerSettings {
                owner: "daemon-b".into(),
                concurrency: 64,
                claim_batch: 16,
                poll_interval: Duration::from_millis(200),
                heartbeat_interval: Duration::from_secs(5),
                shutdown_grace: Duration::from_secs(5),
            },
            env.db.url.clone(),
        )
        .run(stop_b.clone()),
    );
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(
            env.queue
                .enqueue(&job(
                    ["eu-central", "us-east", "us-west", "ap-southeast"][i % 4]
                ))
                .await
                .unwrap()
                .job()
                .id,
        );
    }
    let done = settle(&env.queue, &ids, Duration::from_secs(120)).await;
    stop_a.cancel();
    stop_b.cancel();
    let (ra, rb) = (a.await.unwrap(), b.await.unwrap());
    assert!(
        done.iter().all(|j| j.status() == JobStatus::Running),
        "{:?}",
        done.iter().find(|j| j.status() != JobStatus::Running)
    );
    assert!(
        ra.claimed > 0 && rb.claimed > 0,
        "both daemons worked: {ra:?} {rb:?}"
    );
    let state = env.sim.state();
    assert_eq!(state.servers.len(), 100, "one server per job, none twice");
    assert_eq!(state.devices.len(), 100);
    assert_eq!(
        state.count("POST /v1/servers"),
        100,
        "each job created exactly once"
    );
}

/// A provisioner whose clients give up on an answer after `timeout` (the simulator's `timeout`
/// fault hangs longer), with quick retries.
fn impatient_provisioner(sim: &SimHandle, deadline: Duration, timeout: Duration) -> Provisioner {
    let mut h = sim.hetzner_config();
    h.retry_base = Duration::from_millis(20);
    h.request_timeout = timeout;
    let mut t = sim.tailscale_config();
    t.retry_base = Duration::from_millis(20);
    t.request_timeout = timeout;
    Provisioner::new(
        HetznerClient::new(h),
        TailscaleClient::new(t),
        provisioner(sim, deadline).settings().clone(),
        WatchSettings {
            min_interval: Duration::from_millis(20),
            max_interval: Duration::from_millis(300),
            device_max_interval: Duration::from_millis(100),
        },
    )
}

/// The keys minted for a job, from the simulator's point of view.
fn keys_of(sim: &SimHandle, job: Uuid) -> Vec<provisiond::sim::SimKey> {
    let desc = provisiond::provision::key_description(job);
    sim.state()
        .keys
        .into_iter()
        .filter(|k| k.description == desc)
        .collect()
}

fn valid(k: &provisiond::sim::SimKey) -> bool {
    k.revoked.is_none() && (k.reusable || k.uses == 0) && k.expires > chrono::Utc::now()
}

#[test]
fn a_key_description_names_its_job_within_tailscales_rules() {
    let id = Uuid::new_v4();
    let d = provisiond::provision::key_description(id);
    assert!(d.starts_with("pv-") && d.contains(&id.simple().to_string()));
    provisiond::clients::tailscale::validate_description(&d).unwrap();
    assert!(d.len() <= 50, "{} chars", d.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_mint_and_checkpoint_leaves_no_valid_key_after_the_resume() {
    let env = env(SimConfig::default()).await;
    let id = env
        .queue
        .enqueue(&job("eu-central"))
        .await
        .unwrap()
        .job()
        .id;
    crash_at(&env, "after_key").await;
    let orphan = keys_of(&env.sim, id);
    assert_eq!(
        orphan.len(),
        1,
        "the dead attempt minted a key it never recorded"
    );
    assert!(
        env.queue
            .get(id)
            .await
            .unwrap()
            .unwrap()
            .tailscale_key_id
            .is_none()
    );

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
    assert_eq!(j.status(), JobStatus::Running, "{:?}", j.last_error);
    let keys = keys_of(&env.sim, id);
    assert_eq!(keys.len(), 2);
    let first = keys.iter().find(|k| k.id == orphan[0].id).unwrap();
    assert!(
        first.revoked.is_some(),
        "the unrecorded key was revoked: {first:?}"
    );
    assert!(keys.iter().all(|k| !valid(k)), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mint_that_times_out_is_resolved_in_the_step_and_its_key_revoked() {
    let mut sim = SimConfig {
        hang: Duration::from_secs(2),
        ..SimConfig::default()
    };
    sim.faults.rules = vec![fault("POST /api/v2/tailnet/{tailnet}/keys", "timeout", 1)];
    let env = env(sim).await;
    let p = impatient_provisioner(
        &env.sim,
        Duration::from_secs(30),
        Duration::from_millis(300),
    );
    let j = run_jobs(&env, p, &[job("us-east")], Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(j.status(), JobStatus::Running, "{:?}", j.last_error);
    assert_eq!(
        j.retry_count, 0,
        "resolved inside the step, no attempt spent"
    );
    let keys = keys_of(&env.sim, j.id);
    assert_eq!(keys.len(), 2, "the timed-out mint happened, then one more");
    let timed_out = keys
        .iter()
        .find(|k| Some(&k.id) != j.tailscale_key_id.as_ref())
        .unwrap();
    assert!(timed_out.revoked.is_some(), "{timed_out:?}");
    assert!(keys.iter().all(|k| !valid(k)), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_revokes_unrecorded_keys_after_the_grace_and_never_a_live_jobs_key() {
    use provisiond::clients::tailscale::CreateKey;
    use provisiond::provision::{key_description, reaper::reap};
    let env = env(SimConfig::default()).await;
    let p = provisioner(&env.sim, Duration::from_secs(30));
    let t = p.tailscale();
    let mint = |desc: String| {
        let t = t.clone();
        async move {
            t.create_auth_key(&CreateKey::single_use(
                desc,
                Duration::from_secs(600),
                vec![],
            ))
            .await
            .unwrap()
            .id
        }
    };
    // A job that ended, and a key with its description left valid (say, by a bug).
    let done = run_jobs(&env, p.clone(), &[job("us-east")], Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(done.status(), JobStatus::Running);
    let leftover = mint(key_description(done.id)).await;
    // A live job (queued again after its worker died) that recorded its key.
    let live = env
        .queue
        .enqueue(&job("eu-central"))
        .await
        .unwrap()
        .job()
        .id;
    crash_at(&env, "after_checkpoint:key_minted").await;
    let recorded = env
        .queue
        .get(live)
        .await
        .unwrap()
        .unwrap()
        .tailscale_key_id
        .unwrap();
    // More keys no live job records: a second one of the live job, and one of a job this
    // database never had. And one that is not ours at all.
    let unrecorded = mint(key_description(live)).await;
    let ghost = mint(key_description(Uuid::new_v4())).await;
    let foreign = mint("ci runner".to_owned()).await;

    let tags = vec!["tag:customer-vm".to_owned()];
    let young = reap(
        &env.queue,
        p.hetzner(),
        p.tailscale(),
        &tags,
        Duration::from_secs(3600),
    )
    .await;
    assert!(young.keys_revoked.is_empty(), "{young:?}");
    assert!(young.too_young >= 3, "{young:?}");

    let report = reap(
        &env.queue,
        p.hetzner(),
        p.tailscale(),
        &tags,
        Duration::ZERO,
    )
    .await;
    let mut revoked = report.keys_revoked.clone();
    revoked.sort();
    let mut want = vec![unrecorded, ghost, leftover];
    want.sort();
    assert_eq!(revoked, want, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    let state = env.sim.state();
    let key = |id: &str| state.keys.iter().find(|k| k.id == id).unwrap().clone();
    assert!(
        valid(&key(&recorded)),
        "a live job's recorded key is never revoked"
    );
    assert!(
        valid(&key(&foreign)),
        "keys we did not describe are never touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_jobs_at_20_percent_transient_faults_on_every_endpoint_all_end_running() {
    // 5 % each of 500, 503, 504 and a hang past the client's timeout, on every route, in
    // sequence: 1 - 0.95 · (18/19) · (17/18) · (16/17) = 20 % of requests fail.
    let rule = |kind: &str, p: f64| -> provisiond::sim::FaultRule {
        serde_json::from_value(serde_json::json!({ "route": "*", "fault": kind, "probability": p }))
            .unwrap()
    };
    let mut sim = SimConfig {
        hang: Duration::from_secs(1),
        ..SimConfig::default()
    };
    sim.faults.rules = vec![
        rule("500", 0.05),
        rule("503", 1.0 / 19.0),
        rule("504", 1.0 / 18.0),
        rule("timeout", 1.0 / 17.0),
    ];
    let env = env(sim).await;
    let p = impatient_provisioner(
        &env.sim,
        Duration::from_secs(90),
        Duration::from_millis(250),
    );
    let jobs: Vec<NewJob> = (0..40)
        .map(|i| job(["eu-central", "us-east", "us-west", "ap-southeast"][i % 4]))
        .collect();
    let done = run_jobs(&env, p.clone(), &jobs, Duration::from_secs(240)).await;
    let state = env.sim.state();
    let faulted = state.faults_injected();
    let total = state.total_requests;
    let failed: Vec<_> = done
        .iter()
        .filter(|j| j.status() != JobStatus::Running)
        .collect();
    let attempts: i32 = done.iter().map(|j| j.retry_count).sum();
    eprintln!(
        "40 jobs: {faulted} of {total} requests faulted ({:.1} %: {:?}); {} failed; {attempts} \
         extra attempts",
        100.0 * faulted as f64 / total as f64,
        state.faults_fired,
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    for j in &done {
        assert_eq!(
            servers_of(&env.sim, j.id),
            vec![j.server_id.unwrap()],
            "one server for {}",
            j.id
        );
    }
    // After a reap, no key minted for any job is still valid.
    env.sim.set_faults(Default::default());
    let tags = vec!["tag:customer-vm".to_owned()];
    let report = provisiond::provision::reaper::reap(
        &env.queue,
        p.hetzner(),
        p.tailscale(),
        &tags,
        Duration::ZERO,
    )
    .await;
    assert!(report.errors.is_empty(), "{report:?}");
    let valid_keys: Vec<_> = env.sim.state().keys.into_iter().filter(valid).collect();
    assert!(
        valid_keys.is_empty(),
        "valid keys after a reap: {valid_keys:?}"
    );
}

// ---- Rollback only by the lease holder ------------------------------------------------------

/// Runs SQL and the real queue on their own runtime and connection, from inside a failpoint
/// (which is synchronous): what another daemon does while this one is between two calls.
fn meanwhile<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .expect("the other daemon's step");
}

/// Another daemon takes job `id` over: its lease is expired, the sweep requeues it, worker-b
/// claims it (and would adopt the job's server by label).
async fn take_over(url: provisiond::secret::Secret, id: Uuid) {
    let pool = provisiond::db::connect(&url, 2, Duration::from_secs(10))
        .await
        .unwrap();
    let q = Queue::new(pool, QueueSettings::default());
    let mut conn = diesel_async::AsyncPgConnection::establish(url.expose())
        .await
        .unwrap();
    use diesel_async::{AsyncConnection, RunQueryDsl};
    diesel::sql_query(format!(
        "UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = '{id}'"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(q.sweep().await.unwrap().retried, vec![id]);
    diesel::sql_query("UPDATE provisioning_jobs SET run_after = now()")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(q.claim("worker-b", 1).await.unwrap().len(), 1);
}

/// Delegates to a provisioner and reports when each of its calls returned.
struct Observed {
    p: Provisioner,
    runs: tokio::sync::mpsc::UnboundedSender<provisiond::worker::Outcome>,
    rollbacks: Arc<std::sync::atomic::AtomicUsize>,
}

impl JobHandler for Observed {
    fn run(
        &self,
        ctx: JobContext,
    ) -> futures::future::BoxFuture<'static, provisiond::worker::Outcome> {
        let (run, tx) = (self.p.run(ctx), self.runs.clone());
        Box::pin(async move {
            let outcome = run.await;
            let _ = tx.send(outcome.clone());
            outcome
        })
    }

    fn rollback(
        &self,
        ctx: JobContext,
    ) -> futures::future::BoxFuture<'static, provisiond::worker::RollbackOutcome> {
        self.rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.p.rollback(ctx)
    }
}

fn observing_worker(
    env: &Env,
    handler: Arc<dyn JobHandler>,
    owner: &str,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<provisiond::worker::WorkerReport>,
) {
    let stop = CancellationToken::new();
    let w = Worker::new(
        env.queue.clone(),
        handler,
        WorkerSettings {
            owner: owner.into(),
            concurrency: 4,
            claim_batch: 4,
            poll_interval: Duration::from_millis(200),
            // The lease is lost behind this worker's back, not found by its heartbeat.
            heartbeat_interval: Duration::from_secs(14),
            shutdown_grace: Duration::from_secs(5),
        },
        env.db.url.clone(),
    );
    (stop.clone(), tokio::spawn(w.run(stop)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_is_reclaimed_while_it_fails_deletes_nothing() {
    // The server never comes up: the attempt fails for good ("stays off") without another
    // checkpoint after vm_created, which is where the job is taken over.
    let mut sim = SimConfig::default();
    sim.faults.fail_actions = true;
    let env = env(sim).await;
    let id = env.queue.enqueue(&job("us-east")).await.unwrap().job().id;
    let url = env.db.url.clone();
    let p = provisioner(&env.sim, Duration::from_secs(30)).with_failpoint(Arc::new(move |at| {
        if at == "after_checkpoint:vm_created" {
            let url = url.clone();
            meanwhile(move || take_over(url, id));
        }
        false
    }));
    let (runs, mut ran) = tokio::sync::mpsc::unbounded_channel();
    let rollbacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = Arc::new(Observed {
        p,
        runs,
        rollbacks: rollbacks.clone(),
    });
    let (stop, task) = observing_worker(&env, handler, "worker-a");
    let outcome = ran.recv().await.unwrap();
    // Stopping drains the worker: its fenced fail has been answered by then.
    stop.cancel();
    task.await.unwrap();

    assert!(
        matches!(outcome, provisiond::worker::Outcome::Fail { .. }),
        "{outcome:?}"
    );
    let state = env.sim.state();
    assert_eq!(
        state.count("DELETE /v1/servers/{id}"),
        0,
        "the stale worker deleted the new owner's server"
    );
    assert_eq!(state.count("DELETE /api/v2/tailnet/{tailnet}/keys/{id}"), 0);
    assert_eq!(rollbacks.load(std::sync::atomic::Ordering::SeqCst), 0);
    let server = servers_of(&env.sim, id);
    assert_eq!(server.len(), 1);
    assert!(
        state
            .servers
            .iter()
            .all(|s| s.status != provisiond::sim::ServerStatus::Deleting)
    );
    let j = env.queue.get(id).await.unwrap().unwrap();
    assert_eq!(
        (j.status(), j.lease_owner.as_deref(), j.rolling_back()),
        (JobStatus::Provisioning, Some("worker-b"), false),
        "the new owner's job is as it took it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_the_middle_of_a_rollback_is_resumed_by_the_next_claimer() {
    for point in [
        "rollback:delete server",
        "rollback:delete device",
        "rollback:revoke keys",
    ] {
        // The device joins, then the last step fails with no retry left (the key revoke keeps
        // answering 500, past the clients' and the step's retries): there is a server, a device
        // and a key to clean up. The faults are lifted once the rollback has been cut short.
        let mut sim = SimConfig::default();
        sim.faults.rules = vec![fault(
            "DELETE /api/v2/tailnet/{tailnet}/keys/{id}",
            "500",
            10_000,
        )];
        let env = env(sim).await;
        let mut new = job("eu-central");
        new.max_retries = Some(0);
        let id = env.queue.enqueue(&new).await.unwrap().job().id;
        let crashed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = crashed.clone();
        let p =
            provisioner(&env.sim, Duration::from_secs(30)).with_failpoint(Arc::new(move |at| {
                at == point && !flag.swap(true, std::sync::atomic::Ordering::SeqCst)
            }));
        let (stop, task) = worker(&env, p, "doomed");
        let t0 = Instant::now();
        while !crashed.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{point}: never reached"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap();
        env.sim.set_faults(Default::default());
        let j = env.queue.get(id).await.unwrap().unwrap();
        assert!(
            j.status() == JobStatus::Provisioning && j.rolling_back(),
            "{point}: died rolling back: {j:?}"
        );

        // Its lease runs out; the sweep requeues it; another daemon claims it.
        env.db
            .exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
            .await;
        // No retry is left, but the rollback was decided already: requeued for its rollback.
        assert_eq!(
            env.queue.sweep().await.unwrap().rolling_back,
            vec![id],
            "{point}"
        );
        let (stop, task) = worker(&env, provisioner(&env.sim, Duration::from_secs(30)), "next");
        let j = settle(&env.queue, &[id], Duration::from_secs(30))
            .await
            .remove(0);
        stop.cancel();
        task.await.unwrap();
        assert_rolled_back(&env, &j).await;
        assert_eq!(
            j.failed_step.as_deref(),
            Some("network_configured"),
            "{point}"
        );
        assert!(
            j.error.as_deref().unwrap().contains("revoke"),
            "{point}: {:?}",
            j.error
        );
        assert!(env.sim.state().servers.is_empty(), "{point}: nothing left");
        assert_eq!(
            env.sim.state().count("POST /v1/servers"),
            1,
            "{point}: the resumed job rolled back, it did not provision again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_sweep_gives_up_is_rolled_back_by_the_next_claimer() {
    let env = env(SimConfig::default()).await;
    let mut new = job("eu-central");
    new.max_retries = Some(0);
    let id = env.queue.enqueue(&new).await.unwrap().job().id;
    // The process dies right after creating the server; no retry is left.
    let p = provisioner(&env.sim, Duration::from_secs(30))
        .with_failpoint(Arc::new(|at| at == "after_checkpoint:vm_created"));
    let claimed = env.queue.claim("doomed", 1).await.unwrap().remove(0);
    let ctx = JobContext {
        lease: claimed.lease().unwrap(),
        job: claimed,
        queue: env.queue.clone(),
        stop: CancellationToken::new(),
    };
    p.run(ctx).await;
    assert_eq!(servers_of(&env.sim, id).len(), 1);
    env.db
        .exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
        .await;
    assert_eq!(env.queue.sweep().await.unwrap().rolling_back, vec![id]);

    let (stop, task) = worker(&env, provisioner(&env.sim, Duration::from_secs(30)), "next");
    let j = settle(&env.queue, &[id], Duration::from_secs(30))
        .await
        .remove(0);
    stop.cancel();
    task.await.unwrap();
    assert_rolled_back(&env, &j).await;
    assert!(
        j.error.as_deref().unwrap().contains("lease expired"),
        "{:?}",
        j.error
    );
    assert_eq!(j.failed_step.as_deref(), Some("vm_created"));
    assert_eq!(
        env.sim.state().count("POST /v1/servers"),
        1,
        "not provisioned again"
    );
}

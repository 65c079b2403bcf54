//! `POST /api/webhooks/github`: the seed's runner callbacks, byte-compatible. The main test runs
//! the seed workflow's own shell lines (`openssl dgst -sha256 -hmac` + `curl -sf`, seed 001)
//! against the daemon; the rest check every answer of the protocol.

use crate::http_support::*;
use provisiond::queue::QueueSettings;
use std::process::Command;
use uuid::Uuid;

/// One callback step of `.github/workflows/provision-agent.yml` (seed 001), with the workflow's
/// `${{ ... }}` expressions filled in as GitHub would.
const SEED_STEP: &str = r#"BODY='${{ body }}'
SIGNATURE=$(echo -n "$BODY" | openssl dgst -sha256 -hmac "${{ secrets.GITHUB_CALLBACK_SECRET }}" -hex | awk '{print $NF}')

curl -sf -X POST "${{ inputs.callback_url }}" \
  -H "Content-Type: application/json" \
  -H "X-Signature: $SIGNATURE" \
  -d "$BODY"
"#;

/// Runs one seed callback step with bash; returns (exit ok, stdout).
fn seed_callback(s: &Server, body: &str) -> (bool, String) {
    let script = SEED_STEP
        .replace("${{ body }}", body)
        .replace("${{ secrets.GITHUB_CALLBACK_SECRET }}", RUNNER_SECRET)
        .replace("${{ inputs.callback_url }}", &s.url("/api/webhooks/github"));
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("bash, curl and openssl are installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn tools_present() {
    for tool in ["bash", "curl", "openssl"] {
        let ok = Command::new("which")
            .arg(tool)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "{tool} is needed by this test");
    }
}

/// Sends each signed callback and expects `want` for all of them.
async fn each_answers(s: &Server, bodies: &[String], want: u16) {
    for body in bodies {
        let (code, reply) = s.runner(body).await;
        assert_eq!(code, want, "{body}: {reply}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_workflow_callbacks_move_the_job_through_provisioning_to_running() {
    tools_present();
    let s = Server::start().await;
    let (agent, user) = (Uuid::new_v4(), Uuid::new_v4());
    let job = s.enqueue(agent, user).await;

    // "Send provisioning callback"
    let body =
        format!(r#"{{"job_id":"{job}","status":"provisioning","workflow_run_id":"9876543210"}}"#);
    let (ok, out) = seed_callback(&s, &body);
    assert!(ok, "{out}");
    assert_eq!(out, r#"{"received":true}"#);
    assert_eq!(
        s.db.count(&format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{job}' AND status = 'provisioning'
             AND executor = 'external' AND workflow_run_id = '9876543210'
             AND claimed_at IS NOT NULL AND last_heartbeat_at IS NOT NULL"
        ))
        .await,
        1
    );

    // "Heartbeat loop": moves last_heartbeat_at forward.
    s.db.exec(&format!(
        "UPDATE provisioning_jobs SET last_heartbeat_at = now() - interval '10 minutes' WHERE id = '{job}'"
    ))
    .await;
    let (ok, out) = seed_callback(&s, &format!(r#"{{"job_id":"{job}","type":"heartbeat"}}"#));
    assert!(ok, "{out}");
    assert_eq!(
        s.db.count(&format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{job}'
             AND last_heartbeat_at > now() - interval '1 minute'"
        ))
        .await,
        1
    );

    // Step callbacks (seed 004): the instance row carries the step the UI shows.
    for step in ["vm_created", "ansible_started"] {
        let (ok, out) = seed_callback(
            &s,
            &format!(r#"{{"job_id":"{job}","status":"provisioning","step":"{step}"}}"#),
        );
        assert!(ok, "{out}");
        let (code, view) = s.instance(agent).await;
        assert_eq!(code, 200, "{view}");
        assert_eq!(view["instance"]["currentStep"], step);
    }
    let (_, view) = s.instance(agent).await;
    let states = step_states(&view);
    assert_eq!(
        states,
        ["completed", "completed", "completed", "active", "pending"]
    );

    // "Send success callback" with the VM's metadata (seed 000).
    let (ok, out) = seed_callback(
        &s,
        &format!(
            r#"{{"job_id":"{job}","status":"running","server_id":"4711","server_ip":"203.0.113.7","tailscale_ip":"100.64.0.9"}}"#
        ),
    );
    assert!(ok, "{out}");
    assert_eq!(s.job_status(&job).await, "running");
    assert_eq!(
        s.db.count(&format!(
            "SELECT count(*) FROM agent_instances i JOIN agents a ON a.id = i.agent_id
             WHERE i.job_id = '{job}' AND i.status = 'running' AND i.server_id = '4711'
             AND i.server_ip = '203.0.113.7' AND i.tailscale_ip = '100.64.0.9'
             AND a.status = 'active'"
        ))
        .await,
        1
    );
    // A late failure callback cannot move a finished job: curl -f sees the 409.
    let (ok, _) = seed_callback(
        &s,
        &format!(
            r#"{{"job_id":"{job}","status":"failed","error":"late","failed_step":"provision"}}"#
        ),
    );
    assert!(!ok, "a terminal job must refuse a late failure");
    assert_eq!(s.job_status(&job).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_failure_callback_fails_the_job_with_its_step() {
    tools_present();
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let (ok, _) = seed_callback(
        &s,
        &format!(r#"{{"job_id":"{job}","status":"provisioning","workflow_run_id":"1"}}"#),
    );
    assert!(ok);
    let (ok, out) = seed_callback(
        &s,
        &format!(
            r#"{{"job_id":"{job}","status":"failed","error":"Workflow failed at step: failure","failed_step":"provision"}}"#
        ),
    );
    assert!(ok, "{out}");
    assert_eq!(
        s.db.count(&format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{job}' AND status = 'failed'
             AND error = 'Workflow failed at step: failure' AND failed_step = 'provision'
             AND retry_count = 0"
        ))
        .await,
        1
    );
    // The runner retrying its failure callback is harmless.
    let (ok, _) = seed_callback(
        &s,
        &format!(
            r#"{{"job_id":"{job}","status":"failed","error":"Workflow failed at step: failure","failed_step":"provision"}}"#
        ),
    );
    assert!(ok);
}

#[tokio::test]
async fn running_without_metadata_is_the_seeds_backward_compatible_success() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let (code, _) = s
        .runner(&format!(r#"{{"job_id":"{job}","status":"provisioning"}}"#))
        .await;
    assert_eq!(code, 200);
    let (code, body) = s
        .runner(&format!(r#"{{"job_id":"{job}","status":"running"}}"#))
        .await;
    assert_eq!((code, body), (200, serde_json::json!({"received": true})));
    assert_eq!(s.job_status(&job).await, "running");
}

#[tokio::test]
async fn the_seeds_error_answers() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let before = s.checksum().await;
    let post = |body: &'static str, sig: Option<String>| {
        let mut r = s.http.post(s.url("/api/webhooks/github")).body(body);
        if let Some(sig) = sig {
            r = r.header("X-Signature", sig);
        }
        async move { status_json(r.send().await.unwrap()).await }
    };
    let good = |b: &str| Some(sign_runner(b));
    let cases: Vec<((u16, serde_json::Value), u16, &str)> = vec![
        (
            post(r#"{"job_id":"x"}"#, None).await,
            401,
            "Invalid signature",
        ),
        (
            post(r#"{"job_id":"x"}"#, Some("00".into())).await,
            401,
            "Invalid signature",
        ),
        (
            post(r#"{"job_id":"x"}"#, Some("zz".repeat(32))).await,
            401,
            "Invalid signature",
        ),
        (
            post(r#"{"job_id":"x"}"#, Some(sign_runner(r#"{"job_id":"y"}"#))).await,
            401,
            "Invalid signature",
        ),
        (post("{nope", good("{nope")).await, 400, "Invalid JSON"),
        (
            post(r#"{"status":"running"}"#, good(r#"{"status":"running"}"#)).await,
            400,
            "Missing job_id",
        ),
        (
            post(r#"{"job_id":""}"#, good(r#"{"job_id":""}"#)).await,
            400,
            "Missing job_id",
        ),
    ];
    for ((code, body), want, msg) in cases {
        assert_eq!((code, body["error"].as_str()), (want, Some(msg)), "{body}");
    }
    // Either hex case.
    let b = format!(r#"{{"job_id":"{job}"}}"#);
    let r = s
        .http
        .post(s.url("/api/webhooks/github"))
        .header("X-Signature", sign_runner(&b).to_uppercase())
        .body(b.clone())
        .send()
        .await
        .unwrap();
    let (code, body) = status_json(r).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("Missing status or type"))
    );
    // The runner protocol's published test vector: authentic (not 401), but `job_123` is not
    // one of our job ids.
    let r = s
        .http
        .post(s.url("/api/webhooks/github"))
        .header(
            "X-Signature",
            "4322529ef6beb3e84b5b520e29ed3684038e1e3c74b4575ca809c97af42ca317",
        )
        .body(r#"{"job_id":"job_123","status":"ok"}"#)
        .send()
        .await
        .unwrap();
    let (code, body) = status_json(r).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("Invalid job_id"))
    );
    let (code, body) = s
        .runner(&format!(r#"{{"job_id":"{job}","status":"paused"}}"#))
        .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("Invalid status"))
    );
    let unknown = Uuid::new_v4();
    each_answers(
        &s,
        &[
            format!(r#"{{"job_id":"{unknown}","status":"provisioning"}}"#),
            format!(r#"{{"job_id":"{unknown}","type":"heartbeat"}}"#),
            format!(r#"{{"job_id":"{unknown}","status":"provisioning","step":"vm_created"}}"#),
            format!(r#"{{"job_id":"{unknown}","status":"failed"}}"#),
        ],
        404,
    )
    .await;
    // A queued job that no runner took: heartbeats, steps and endings are illegal.
    each_answers(
        &s,
        &[
        format!(r#"{{"job_id":"{job}","type":"heartbeat"}}"#),
        format!(r#"{{"job_id":"{job}","status":"provisioning","step":"vm_created"}}"#),
        format!(r#"{{"job_id":"{job}","status":"running"}}"#),
        format!(r#"{{"job_id":"{job}","status":"failed","error":"x"}}"#),
        format!(
            r#"{{"job_id":"{job}","status":"running","server_id":"1","server_ip":"1.2.3.4","tailscale_ip":"100.64.0.1"}}"#
        ),
        ],
        409,
    )
    .await;
    assert_eq!(s.checksum().await, before);
}

#[tokio::test]
async fn a_job_the_daemon_holds_is_never_taken_over_by_a_runner() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let claimed = s.queue.claim("test-worker", 1).await.unwrap();
    assert_eq!(claimed[0].id.to_string(), job);
    let before = s.checksum().await;
    each_answers(
        &s,
        &[
            format!(r#"{{"job_id":"{job}","status":"provisioning"}}"#),
            format!(r#"{{"job_id":"{job}","type":"heartbeat"}}"#),
            format!(r#"{{"job_id":"{job}","status":"failed","error":"x"}}"#),
            format!(r#"{{"job_id":"{job}","status":"running"}}"#),
        ],
        409,
    )
    .await;
    assert_eq!(s.checksum().await, before);
}

#[tokio::test]
async fn timestamped_signatures_when_required() {
    let mut strict = settings();
    strict.runner_require_timestamp = true;
    let s = Server::with(strict, QueueSettings::default()).await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let body = format!(r#"{{"job_id":"{job}","status":"provisioning"}}"#);
    // The seed's plain signature is not enough in strict mode.
    let (code, _) = s.runner(&body).await;
    assert_eq!(code, 401);
    let send = |ts: i64, sig: String| {
        s.http
            .post(s.url("/api/webhooks/github"))
            .header("X-Signature", sig)
            .header("X-Signature-Timestamp", ts.to_string())
            .body(body.clone())
            .send()
    };
    let t = now();
    let (code, _) = status_json(send(t - 301, sign_runner_at(&body, t - 301)).await.unwrap()).await;
    assert_eq!(code, 401, "a replayed old callback");
    let (code, _) = status_json(send(t, sign_runner(&body)).await.unwrap()).await;
    assert_eq!(code, 401, "timestamp not covered by the signature");
    assert_eq!(s.job_status(&job).await, "queued");
    let (code, reply) = status_json(send(t, sign_runner_at(&body, t)).await.unwrap()).await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(s.job_status(&job).await, "provisioning");
}

#[tokio::test]
async fn runner_secret_not_configured_is_503_and_oversized_is_413() {
    let mut off = settings();
    off.runner_secret = None;
    let s = Server::with(off, QueueSettings::default()).await;
    let (code, body) = s.runner(r#"{"job_id":"x"}"#).await;
    assert_eq!(code, 503, "{body}");
    let s = Server::start().await;
    let big = format!(r#"{{"job_id":"{}"}}"#, "x".repeat(65 * 1024));
    let (code, body) = s.runner(&big).await;
    assert_eq!((code, body["error"].is_string()), (413, true));
}

/// Replays of legacy (untimestamped) callbacks: captured once, sent again later.
#[tokio::test]
async fn replayed_steps_never_move_progress_backwards_nor_add_events() {
    let s = Server::start().await;
    let agent = Uuid::new_v4();
    let job = s.enqueue(agent, Uuid::new_v4()).await;
    let step =
        |name: &str| format!(r#"{{"job_id":"{job}","status":"provisioning","step":"{name}"}}"#);
    let (code, _) = s
        .runner(&format!(r#"{{"job_id":"{job}","status":"provisioning"}}"#))
        .await;
    assert_eq!(code, 200);
    each_answers(&s, &[step("vm_created"), step("ansible_started")], 200).await;
    let events =
        format!("SELECT count(*) FROM job_events WHERE job_id = '{job}' AND step IS NOT NULL");
    let before = s.db.count(&events).await;
    // The replays are acknowledged (a runner must not retry them) and change nothing.
    each_answers(
        &s,
        &[
            step("vm_created"),
            step("ansible_started"),
            step("vm_created"),
        ],
        200,
    )
    .await;
    let (_, view) = s.instance(agent).await;
    assert_eq!(view["instance"]["currentStep"], "ansible_started", "{view}");
    assert_eq!(view["job"]["currentStep"], "ansible_started", "{view}");
    assert_eq!(
        s.db.count(&events).await,
        before,
        "a replayed step added an event"
    );
    // A step the protocol does not know is malformed, not a way to reset progress.
    let (code, body) = s.runner(&step("rebooting")).await;
    assert_eq!((code, body["error"].as_str()), (400, Some("Unknown step")));
    // Progress still moves forward.
    each_answers(&s, &[step("ansible_complete")], 200).await;
    let (_, view) = s.instance(agent).await;
    assert_eq!(view["instance"]["currentStep"], "ansible_complete");
}

#[tokio::test]
async fn a_replayed_attempt_cannot_undo_an_operator_retry() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let provisioning =
        format!(r#"{{"job_id":"{job}","status":"provisioning","workflow_run_id":"111"}}"#);
    let failed = format!(r#"{{"job_id":"{job}","status":"failed","error":"boom"}}"#);
    each_answers(&s, &[provisioning.clone(), failed.clone()], 200).await;
    assert_eq!(s.job_status(&job).await, "failed");
    let r = s
        .admin(reqwest::Method::POST, &format!("/api/jobs/{job}/retry"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(s.job_status(&job).await, "queued");
    let before = s.checksum().await;
    // The captured first attempt, replayed after the operator's retry: refused, nothing moves.
    each_answers(
        &s,
        &[
            provisioning.clone(),
            format!(r#"{{"job_id":"{job}","status":"provisioning"}}"#),
            failed,
        ],
        409,
    )
    .await;
    assert_eq!(s.job_status(&job).await, "queued");
    assert_eq!(s.checksum().await, before);
}

#[tokio::test]
async fn a_repeated_provisioning_must_name_the_attempts_workflow_run() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let start = |run: &str| {
        format!(r#"{{"job_id":"{job}","status":"provisioning","workflow_run_id":"{run}"}}"#)
    };
    each_answers(&s, &[start("111"), start("111")], 200).await;
    let before = s.checksum().await;
    each_answers(&s, &[start("222")], 409).await;
    assert_eq!(s.checksum().await, before);
    assert_eq!(
        s.db.count(&format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{job}' AND workflow_run_id = '111'"
        ))
        .await,
        1
    );
}

#[tokio::test]
async fn a_runner_cannot_take_a_job_the_daemon_already_attempted() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let claimed = s.queue.claim("test-worker", 1).await.unwrap();
    // The daemon's attempt is handed back (a shutdown): queued again, with its checkpoints.
    let lease = claimed[0].lease().unwrap();
    assert_eq!(s.queue.hand_back(&[lease]).await.unwrap(), [true]);
    assert_eq!(s.job_status(&job).await, "queued");
    let before = s.checksum().await;
    each_answers(
        &s,
        &[format!(r#"{{"job_id":"{job}","status":"provisioning"}}"#)],
        409,
    )
    .await;
    assert_eq!(s.checksum().await, before);
}

#[tokio::test]
async fn a_nul_in_a_signed_callback_is_a_400_or_stored_safely_never_a_5xx() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let before = s.checksum().await;
    // Identifiers with a NUL are malformed: 400, nothing written.
    for body in [
        format!(r#"{{"job_id":"{job}","status":"provisioning","workflow_run_id":"1\u0000"}}"#),
        format!(r#"{{"job_id":"{job}","status":"provisioning","step":"vm_\u0000created"}}"#),
        format!(
            r#"{{"job_id":"{job}","status":"running","server_id":"4\u00007","server_ip":"203.0.113.7","tailscale_ip":"100.64.0.9"}}"#
        ),
        format!(
            r#"{{"job_id":"{job}","status":"running","server_id":"47","server_ip":"203.0.113.7\u0000","tailscale_ip":"100.64.0.9"}}"#
        ),
    ] {
        let (code, reply) = s.runner(&body).await;
        assert_eq!(code, 400, "{body}: {reply}");
    }
    assert_eq!(s.checksum().await, before);
    // A failure message is for a human: kept, with the NUL replaced, so the failure is not lost.
    each_answers(
        &s,
        &[format!(r#"{{"job_id":"{job}","status":"provisioning"}}"#)],
        200,
    )
    .await;
    let (code, reply) = s
        .runner(&format!(
            r#"{{"job_id":"{job}","status":"failed","error":"disk\u0000full","failed_step":"prov\u0000ision"}}"#
        ))
        .await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(
        s.db.count(&format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{job}' AND status = 'failed'
             AND error = 'disk' || U&'\\FFFD' || 'full'"
        ))
        .await,
        1
    );
}

//! Logging hygiene: at TRACE, with every kind of request, no secret, token, signature or body
//! reaches the log, and each request is logged inside one `http` span naming its route.

use crate::http_support::*;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs [`logged_requests_leak_nothing`] in a process of its own: the check needs the global
/// subscriber to itself, and every integration test shares this binary's process. A
/// thread-local subscriber is not enough: callsite interest is cached process-wide, so lines
/// logged while another test's thread saw the callsite first can go missing.
#[test]
fn no_secret_signature_or_body_is_logged() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "http_logs::logged_requests_leak_nothing",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run in its own process by no_secret_signature_or_body_is_logged"]
async fn logged_requests_leak_nothing() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let s = Server::start().await;
    let (agent, user) = (Uuid::new_v4(), Uuid::new_v4());
    let job = s.enqueue(agent, user).await;
    let secret_marker = "BODY-MARKER-7f3a";
    let event = paid_session_event("evt_log", "cs_test_log", agent, user)
        .replace("eu-central", "eu-central\",\"note\":\"BODY-MARKER-7f3a");
    let stripe_sig = stripe_header(&event);
    s.stripe(&event, &stripe_sig).await;
    s.stripe(&event, "t=1,v1=deadbeef").await;
    let cb = format!(
        r#"{{"job_id":"{job}","status":"provisioning","workflow_run_id":"{secret_marker}"}}"#
    );
    let runner_sig = sign_runner(&cb);
    s.runner(&cb).await;
    s.runner(&format!(
        r#"{{"job_id":"{job}","status":"failed","error":"{secret_marker}"}}"#
    ))
    .await;
    s.http
        .get(s.url("/api/jobs"))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}-wrong"))
        .send()
        .await
        .unwrap();
    s.admin(reqwest::Method::GET, "/api/jobs")
        .send()
        .await
        .unwrap();

    let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("route=\"/api/webhooks/stripe\""), "{log}");
    assert!(log.contains("route=\"/api/webhooks/github\""), "{log}");
    for needle in [
        STRIPE_SECRET,
        RUNNER_SECRET,
        ADMIN_TOKEN,
        secret_marker,
        stripe_sig.as_str(),
        &stripe_sig[stripe_sig.find("v1=").unwrap() + 3..],
        runner_sig.as_str(),
        "deadbeef",
    ] {
        assert!(!log.contains(needle), "{needle:?} reached the log:\n{log}");
    }
}

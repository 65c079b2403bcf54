//! Every attempt's error is visible: `last_error` on the job in `provisiond jobs show` and in
//! `GET /api/jobs/{id}`, and each failed attempt's error in the job's events timeline.

use crate::http_support::*;
use provisiond::db::models::Job;
use provisiond::queue::{FailOutcome, Failure};
use std::process::Command;

fn jobs_show(s: &Server, id: uuid::Uuid) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_provisiond"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", s.db.url.expose())
        .args(["jobs", "show", &id.to_string()])
        .output()
        .expect("run provisiond");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn claim(s: &Server) -> Job {
    s.db.exec("UPDATE provisioning_jobs SET run_after = now()")
        .await;
    let mut jobs = s.queue.claim("w", 1).await.unwrap();
    assert_eq!(jobs.len(), 1);
    jobs.remove(0)
}

fn failure(error: &str, retryable: bool) -> Failure {
    Failure {
        error: error.into(),
        step: Some("vm_created".into()),
        retryable,
    }
}

#[tokio::test]
async fn each_attempts_error_is_on_the_job_in_its_events_in_jobs_show_and_in_the_api() {
    let s = Server::start().await;
    let id: uuid::Uuid = s
        .enqueue(uuid::Uuid::new_v4(), uuid::Uuid::new_v4())
        .await
        .parse()
        .unwrap();

    // Attempt 1 fails and is retried: a queued job says why it is waiting.
    let lease = claim(&s).await.lease().unwrap();
    let first = "create the server: hetzner 503 unavailable";
    s.queue.fail(&lease, &failure(first, true)).await.unwrap();
    let shown = jobs_show(&s, id);
    assert!(shown.contains(&format!("last err  {first}")), "{shown}");

    // Attempt 2's worker dies; the sweep retries it.
    claim(&s).await;
    s.db.exec("UPDATE provisioning_jobs SET lease_expires_at = now() - interval '1 second'")
        .await;
    assert_eq!(s.queue.sweep().await.unwrap().retried, vec![id]);

    // Attempt 3 fails for good; the job rolls back and fails.
    let lease = claim(&s).await.lease().unwrap();
    let last = "create the server: invalid_input";
    let outcome = s.queue.fail(&lease, &failure(last, false)).await.unwrap();
    assert!(matches!(outcome, FailOutcome::RollingBack(_)));
    s.queue
        .finish_rollback(&lease, "rolled back")
        .await
        .unwrap();

    let errors = [first, "lease expired: worker w stopped renewing it", last];
    let (code, body) = status_json(
        s.admin(reqwest::Method::GET, &format!("/api/jobs/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(body["job"]["status"], "failed");
    assert_eq!(body["job"]["error"], last);
    assert_eq!(body["job"]["last_error"], last);
    let timeline: Vec<String> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["data"]["error"].as_str().map(str::to_owned))
        .collect();
    for e in errors {
        assert!(
            timeline.iter().any(|t| t == e),
            "{e} missing from {timeline:?}"
        );
    }
    let shown = jobs_show(&s, id);
    assert!(shown.contains(&format!("last err  {last}")), "{shown}");
    for e in errors {
        assert!(shown.contains(e), "{e} missing from:\n{shown}");
    }
}

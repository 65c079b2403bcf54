//! `provisiond serve` with the HTTP surface on: the binary, configured by environment and secret
//! files only, answers on its listen address, takes a signed runner callback, and stops on
//! SIGTERM.

use crate::support::TestDb;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_http_and_stops_on_sigterm() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin");
    std::fs::write(&token, "serve-token\n").unwrap();
    // A free port, found by binding port 0 and releasing it: a fixed port would collide with
    // parallel test runs.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_provisiond"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.url.expose())
        .env("PROVISIOND__WORKER__ENABLED", "false")
        .env("PROVISIOND__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "PROVISIOND__HTTP__ADMIN_TOKEN_FILE",
            token.display().to_string(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let http = provisiond::tls::http_client();
    let base = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        match http.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status() == 200 => break,
            _ if t0.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("serve never became ready: {other:?}"),
        }
    }
    let r = http
        .get(format!("{base}/api/jobs"))
        .bearer_auth("serve-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // No runner secret configured: callbacks are off, clearly.
    let r = http
        .post(format!("{base}/api/webhooks/github"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "serve did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "serve exited with {status}");
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "still listening"
    );
}

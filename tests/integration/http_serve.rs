//! `provisiond serve` with the HTTP surface on: the binary, configured by environment and secret
//! files only, answers on its listen address, takes a signed runner callback, and stops on
//! SIGTERM. And what a hostile client cannot do to the server: hold it with half-open, slow or
//! idle connections (header timeout, body deadline, connection cap), even at a low fd limit.

use crate::http_support::*;
use crate::support::TestDb;
use provisiond::queue::QueueSettings;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; returns what it sent. A reset counts as
/// closed. No timeout: the test waits for the event (a hang is the failure).
async fn read_until_closed(c: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn limited(
    header: Duration,
    body: Duration,
    max_connections: usize,
) -> provisiond::http::HttpSettings {
    let mut s = settings();
    s.header_read_timeout = header;
    s.body_read_timeout = body;
    s.max_connections = max_connections;
    s
}

#[tokio::test]
async fn a_client_that_sends_headers_slowly_is_closed_after_the_header_timeout() {
    let s = Server::with(
        limited(Duration::from_millis(300), Duration::from_secs(60), 64),
        QueueSettings::default(),
    )
    .await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = c.split();
    // Keep trickling header lines (each well inside the timeout) until the server hangs up:
    // bytes arriving do not extend the deadline for the whole header.
    let trickle = async {
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if wr
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let mut got = Vec::new();
    {
        let closed = async {
            let mut buf = [0u8; 256];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::select! {
            _ = closed => {}
            _ = trickle => {}
        }
    }
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "a never-finished request was answered: {got:?}"
    );
    // The server is still serving everyone else.
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_a_408_and_the_connection_closes() {
    let s = Server::with(
        limited(Duration::from_secs(60), Duration::from_millis(300), 64),
        QueueSettings::default(),
    )
    .await;
    let before = s.checksum().await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        b"POST /api/webhooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"job_id\"",
    )
    .await
    .unwrap();
    let got = String::from_utf8_lossy(&read_until_closed(&mut c).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.to_lowercase().contains("connection: close"), "{got}");
    assert_eq!(s.checksum().await, before);
}

#[tokio::test]
async fn at_the_connection_cap_the_oldest_idle_connection_makes_room() {
    let cap = 4;
    let s = Server::with(
        limited(Duration::from_secs(3600), Duration::from_secs(60), cap),
        QueueSettings::default(),
    )
    .await;
    // Half-open requests that would hold their connection for the whole (hour-long) timeout.
    let mut flood = Vec::new();
    for _ in 0..10 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        flood.push(c);
    }
    // Served, not left waiting behind the flood.
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The server closed the oldest ones to make room: 10 + 1 connections, at most `cap` open.
    for c in &mut flood[..10 + 1 - cap] {
        assert!(read_until_closed(c).await.is_empty());
    }
}

/// A free port, found by binding port 0 and releasing it: a fixed port would collide with
/// parallel test runs.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_beyond_the_fd_limit_cannot_stop_healthz() {
    // The reported attack: a daemon limited to 128 descriptors, 168 half-open requests.
    let db = TestDb::new().await;
    let port = free_port();
    let child = Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -n 128 && exec "$0" serve"#)
        .arg(env!("CARGO_BIN_EXE_provisiond"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.url.expose())
        .env("PROVISIOND__WORKER__ENABLED", "false")
        .env("PROVISIOND__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("PROVISIOND__HTTP__MAX_CONNECTIONS", "64")
        // Long enough that no half-open connection expires on its own during the test.
        .env("PROVISIOND__HTTP__HEADER_READ_TIMEOUT", "1h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let _child = KillOnDrop(child);
    let base = format!("http://127.0.0.1:{port}");
    // The client timeout only guards against hanging forever on a broken server.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
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
    let mut flood = Vec::new();
    for _ in 0..168 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        flood.push(c);
    }
    for path in ["/healthz", "/readyz"] {
        let r = http.get(format!("{base}{path}")).send().await;
        let code = r.map(|r| r.status().as_u16());
        assert!(matches!(code, Ok(200)), "{path}: {code:?}");
    }
    drop(flood);
}

/// Kills the child process when the test ends, also when it panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_http_and_stops_on_sigterm() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin");
    std::fs::write(&token, "serve-token\n").unwrap();
    let port = free_port();
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

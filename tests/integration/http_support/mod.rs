//! Shared by the `tests/http_*.rs` files: a daemon HTTP server on a free port over a fresh
//! database, request signing computed here from first principles (the `hmac` crate, not the
//! daemon's verifier), and a checksum of every table for "nothing was written" assertions.
#![allow(dead_code)]

use crate::support::TestDb;
use hmac::{Hmac, KeyInit, Mac};
use provisiond::config::{HttpConfig, Regions};
use provisiond::http::{HttpSettings, HttpState};
use provisiond::queue::{Queue, QueueSettings};
use provisiond::secret::Secret;
use sha2::Sha256;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const STRIPE_SECRET: &str = "whsec_test_secret";
pub const RUNNER_SECRET: &str = "runner_secret";
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";

pub struct Server {
    pub db: TestDb,
    pub queue: Queue,
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn settings() -> HttpSettings {
    HttpSettings {
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        stripe_secret: Some(Secret::new(STRIPE_SECRET)),
        runner_secret: Some(Secret::new(RUNNER_SECRET)),
        ..HttpSettings::from_config(&HttpConfig::default(), &Regions::default()).unwrap()
    }
}

impl Server {
    pub async fn start() -> Server {
        Self::with(settings(), QueueSettings::default()).await
    }

    pub async fn with(settings: HttpSettings, queue_settings: QueueSettings) -> Server {
        Self::over(TestDb::new().await, settings, queue_settings).await
    }

    /// A server over a database the test prepared (e.g. with a migration reverted).
    pub async fn over(db: TestDb, settings: HttpSettings, queue_settings: QueueSettings) -> Server {
        let pool = db.pool().await;
        Self::over_pool(db, pool, settings, queue_settings).await
    }

    /// A server whose queue uses `pool` (e.g. one with a particular checkout timeout).
    pub async fn over_pool(
        db: TestDb,
        pool: provisiond::db::Pool,
        settings: HttpSettings,
        queue_settings: QueueSettings,
    ) -> Server {
        let queue = Queue::new(pool, queue_settings);
        let stop = CancellationToken::new();
        let state = HttpState::new(
            queue.clone(),
            settings,
            Regions::default(),
            db.url.clone(),
            Duration::from_secs(5),
        );
        let (addr, _task) = provisiond::http::serve(state, "127.0.0.1:0", stop.clone())
            .await
            .expect("bind");
        Server {
            db,
            queue,
            addr,
            base: format!("http://{addr}"),
            http: provisiond::tls::http_client(),
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with the admin bearer token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    pub async fn stripe(&self, body: &str, header: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(self.url("/api/webhooks/stripe"))
            .header("Stripe-Signature", header)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        status_json(r).await
    }

    pub async fn runner(&self, body: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(self.url("/api/webhooks/github"))
            .header("X-Signature", sign_runner(body))
            .header("Content-Type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        status_json(r).await
    }

    /// POSTs JSON with the admin token.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        status_json(
            self.admin(reqwest::Method::POST, path)
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// `GET /api/agents/{agent}/instance` with the admin token.
    pub async fn instance(&self, agent: uuid::Uuid) -> (u16, serde_json::Value) {
        let path = format!("/api/agents/{agent}/instance");
        status_json(
            self.admin(reqwest::Method::GET, &path)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// A checksum over every row of every table the HTTP surface could write.
    pub async fn checksum(&self) -> i64 {
        self.db
            .count(
                "SELECT ('x' || substr(md5(
                   coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM provisioning_jobs t), '')
                || coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM job_events t), '')
                || coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM agent_instances t), '')
                || coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM agents t), '')
                || coalesce((SELECT string_agg(t::text, '|' ORDER BY t::text) FROM stripe_events t), '')
                ), 1, 15))::bit(60)::bigint",
            )
            .await
    }

    pub async fn job_status(&self, id: &str) -> String {
        let r = self
            .admin(reqwest::Method::GET, &format!("/api/jobs/{id}"))
            .send()
            .await
            .unwrap();
        let (code, body) = status_json(r).await;
        assert_eq!(code, 200, "{body}");
        body["job"]["status"].as_str().unwrap().to_owned()
    }

    /// Enqueues a daemon job through the admin API; returns its id.
    pub async fn enqueue(&self, agent: uuid::Uuid, user: uuid::Uuid) -> String {
        let r = self
            .admin(reqwest::Method::POST, "/api/jobs")
            .json(&serde_json::json!({"agent_id": agent, "user_id": user}))
            .send()
            .await
            .unwrap();
        let (code, body) = status_json(r).await;
        assert_eq!(code, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }
}

/// The `status` of each UI step in an instance view.
pub fn step_states(view: &serde_json::Value) -> Vec<String> {
    view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_owned())
        .collect()
}

pub async fn status_json(r: reqwest::Response) -> (u16, serde_json::Value) {
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("status {code}: body is not JSON: {text:?}"));
    (code, body)
}

fn hmac_hex(key: &str, parts: &[&[u8]]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_bytes()).unwrap();
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// `v1` of Stripe's scheme: HMAC-SHA256 over `"{t}.{body}"`, keyed with the whole `whsec_` string.
pub fn stripe_v1(secret: &str, t: i64, body: &str) -> String {
    hmac_hex(secret, &[t.to_string().as_bytes(), b".", body.as_bytes()])
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn stripe_header(body: &str) -> String {
    let t = now();
    format!("t={t},v1={}", stripe_v1(STRIPE_SECRET, t, body))
}

pub fn sign_runner(body: &str) -> String {
    hmac_hex(RUNNER_SECRET, &[body.as_bytes()])
}

pub fn sign_runner_at(body: &str, ts: i64) -> String {
    hmac_hex(
        RUNNER_SECRET,
        &[ts.to_string().as_bytes(), b".", body.as_bytes()],
    )
}

/// A paid `checkout.session.completed` event for `agent`/`user`.
pub fn paid_session_event(
    event_id: &str,
    session_id: &str,
    agent: uuid::Uuid,
    user: uuid::Uuid,
) -> String {
    serde_json::json!({
        "id": event_id, "object": "event", "type": "checkout.session.completed",
        "api_version": "2024-06-20", "created": 1721948530, "livemode": false,
        "data": {"object": {
            "id": session_id, "object": "checkout.session", "mode": "payment",
            "status": "complete", "payment_status": "paid",
            "metadata": {"agent_id": agent, "user_id": user, "region": "eu-central"}
        }}
    })
    .to_string()
}

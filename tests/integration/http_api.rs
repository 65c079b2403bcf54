//! The status API, the admin API, health, readiness and metrics over a real socket.

use crate::http_support::*;
use provisiond::queue::QueueSettings;
use reqwest::Method;
use std::time::Duration;
use uuid::Uuid;

async fn call(s: &Server, method: Method, path: &str) -> (u16, serde_json::Value) {
    status_json(s.admin(method, path).send().await.unwrap()).await
}

#[tokio::test]
async fn admin_routes_need_the_bearer_token() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let routes = [
        (
            Method::GET,
            format!("/api/agents/{}/instance", Uuid::new_v4()),
        ),
        (Method::POST, "/api/jobs".to_owned()),
        (Method::GET, "/api/jobs".to_owned()),
        (Method::GET, format!("/api/jobs/{job}")),
        (Method::POST, format!("/api/jobs/{job}/retry")),
        (Method::POST, format!("/api/jobs/{job}/cancel")),
        (Method::POST, "/api/admin/sweep".to_owned()),
    ];
    let before = s.checksum().await;
    for (m, path) in &routes {
        for auth in [None, Some("Bearer wrong"), Some(ADMIN_TOKEN)] {
            let mut r = s.http.request(m.clone(), s.url(path));
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 401, "{m} {path} {auth:?}");
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        }
    }
    assert_eq!(s.checksum().await, before);
    let mut off = settings();
    off.admin_token = None;
    let s = Server::with(off, QueueSettings::default()).await;
    for (m, path) in &routes {
        let (code, body) = call(&s, m.clone(), path).await;
        assert_eq!(code, 503, "{m} {path}");
        assert!(body["error"].as_str().unwrap().contains("admin_token_file"));
    }
}

#[tokio::test]
async fn create_job_201_then_200_and_validation() {
    let s = Server::start().await;
    let (agent, user) = (Uuid::new_v4(), Uuid::new_v4());
    let body = serde_json::json!({"agent_id": agent, "user_id": user, "business_key": "cs_admin_1", "region": "us-west"});
    let (code, first) = s.post_json("/api/jobs", &body).await;
    assert_eq!(code, 201, "{first}");
    assert_eq!(first["region"], "us-west");
    assert!(first.get("lease_token").is_none());
    let (code, again) = s.post_json("/api/jobs", &body).await;
    assert_eq!((code, &again["id"]), (200, &first["id"]));
    let before = s.checksum().await;
    for bad in [
        serde_json::json!({"agent_id": "nope", "user_id": user}),
        serde_json::json!({"agent_id": agent}),
        serde_json::json!({"agent_id": agent, "user_id": user, "region": "mars"}),
        serde_json::json!({"agent_id": agent, "user_id": user, "business_key": "has space"}),
        serde_json::json!({"agent_id": agent, "user_id": user, "max_retries": -1}),
        serde_json::json!({"agent_id": agent, "user_id": user, "surprise": 1}),
    ] {
        let (code, reply) = s.post_json("/api/jobs", &bad).await;
        assert_eq!(code, 400, "{bad}: {reply}");
    }
    // The agent belongs to another user.
    let r = s
        .admin(Method::POST, "/api/jobs")
        .json(&serde_json::json!({"agent_id": agent, "user_id": Uuid::new_v4()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    assert_eq!(s.checksum().await, before);
}

/// Query values are text until their field parses them: `?status=1` is an unknown status (it
/// used to be turned into an integer first, and refused as "invalid type: integer"), and a
/// repeated key is refused rather than resolved by whichever came last.
#[tokio::test]
async fn query_values_are_parsed_by_their_field() {
    let s = Server::start().await;
    s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let (code, body) = call(&s, Method::GET, "/api/jobs?status=1").await;
    assert_eq!(code, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("job status") && error.contains("\"1\""),
        "{error}"
    );
    let (code, body) = call(&s, Method::GET, "/api/jobs?limit=1e3").await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    let (code, body) = call(&s, Method::GET, "/api/jobs?limit=5&limit=1").await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("twice"), "{body}");
    let (code, body) = call(&s, Method::GET, "/api/jobs?status=queued&limit=%31%30").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn list_and_get_jobs() {
    let s = Server::start().await;
    let a = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let b = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    s.queue.claim("w", 1).await.unwrap();
    let (code, all) = call(&s, Method::GET, "/api/jobs").await;
    assert_eq!(code, 200);
    assert_eq!(all["jobs"].as_array().unwrap().len(), 2);
    let (_, queued) = call(&s, Method::GET, "/api/jobs?status=queued&limit=10").await;
    let ids: Vec<&str> = queued["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b.as_str()]);
    let (_, one) = call(&s, Method::GET, "/api/jobs?limit=1").await;
    assert_eq!(one["jobs"].as_array().unwrap().len(), 1);
    for bad in [
        "/api/jobs?status=bogus",
        "/api/jobs?limit=0",
        "/api/jobs?limit=x",
        "/api/jobs?what=1",
    ] {
        let (code, body) = call(&s, Method::GET, bad).await;
        assert_eq!(code, 400, "{bad}: {body}");
    }
    let (code, detail) = call(&s, Method::GET, &format!("/api/jobs/{a}")).await;
    assert_eq!(code, 200);
    assert_eq!(detail["job"]["status"], "provisioning");
    let messages: Vec<&str> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["enqueued", "claimed"]);
    let (code, _) = call(&s, Method::GET, &format!("/api/jobs/{}", Uuid::new_v4())).await;
    assert_eq!(code, 404);
    let (code, _) = call(&s, Method::GET, "/api/jobs/not-a-uuid").await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn retry_and_cancel_follow_the_state_rules() {
    let s = Server::start().await;
    // queued with backoff → runs now
    let queued = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    s.db.exec(&format!(
        "UPDATE provisioning_jobs SET run_after = now() + interval '1 hour' WHERE id = '{queued}'"
    ))
    .await;
    let (code, job) = call(&s, Method::POST, &format!("/api/jobs/{queued}/retry")).await;
    assert_eq!(code, 200, "{job}");
    assert_eq!(
        s.db.count(&format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{queued}' AND run_after <= now()"
        ))
        .await,
        1
    );
    // failed → operator retry
    let failed = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    s.runner(&format!(
        r#"{{"job_id":"{failed}","status":"provisioning"}}"#
    ))
    .await;
    s.runner(&format!(
        r#"{{"job_id":"{failed}","status":"failed","error":"boom"}}"#
    ))
    .await;
    let (code, job) = call(&s, Method::POST, &format!("/api/jobs/{failed}/retry")).await;
    assert_eq!(code, 200, "{job}");
    assert_eq!(
        (job["status"].as_str(), job["operator_retries"].as_i64()),
        (Some("queued"), Some(1))
    );
    assert_eq!(
        (
            job["error"].is_null(),
            job["retry_count"].as_i64(),
            job["executor"].as_str()
        ),
        (true, Some(0), Some("daemon"))
    );
    // provisioning → 409, running → 409
    let held = s.queue.claim("w", 10).await.unwrap();
    assert!(!held.is_empty());
    let held = held[0].id;
    let before = s.checksum().await;
    for path in [
        format!("/api/jobs/{held}/retry"),
        format!("/api/jobs/{held}/cancel"),
    ] {
        let (code, body) = call(&s, Method::POST, &path).await;
        assert_eq!(code, 409, "{path}: {body}");
    }
    for path in [
        format!("/api/jobs/{}/retry", Uuid::new_v4()),
        format!("/api/jobs/{}/cancel", Uuid::new_v4()),
    ] {
        assert_eq!(call(&s, Method::POST, &path).await.0, 404);
    }
    assert_eq!(call(&s, Method::POST, "/api/jobs/x/retry").await.0, 400);
    // A body is refused, not ignored.
    let r = s
        .admin(Method::POST, &format!("/api/jobs/{held}/retry"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(s.checksum().await, before);
    // queued → cancelled: `failed` (a word the web app knows) with cancelled_at; terminal, so a
    // second cancel is refused; an operator retry, as for any failed job, queues it again.
    let c = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let (code, job) = call(&s, Method::POST, &format!("/api/jobs/{c}/cancel")).await;
    assert_eq!((code, job["status"].as_str()), (200, Some("failed")));
    assert!(job["cancelled_at"].is_string(), "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("cancelled"),
        "{job}"
    );
    assert_eq!(
        call(&s, Method::POST, &format!("/api/jobs/{c}/cancel"))
            .await
            .0,
        409
    );
    let (code, job) = call(&s, Method::POST, &format!("/api/jobs/{c}/retry")).await;
    assert_eq!((code, job["status"].as_str()), (200, Some("queued")));
    assert!(job["cancelled_at"].is_null(), "{job}");
}

#[tokio::test]
async fn sweep_reports_what_it_did() {
    let s = Server::start().await;
    let job = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    s.runner(&format!(r#"{{"job_id":"{job}","status":"provisioning"}}"#))
        .await;
    s.db.exec(&format!("UPDATE provisioning_jobs SET last_heartbeat_at = now() - interval '1 hour' WHERE id = '{job}'")).await;
    let (code, report) = call(&s, Method::POST, "/api/admin/sweep").await;
    assert_eq!(code, 200);
    assert_eq!(report, serde_json::json!({"retried": [], "failed": [job]}));
}

#[tokio::test]
async fn agent_instance_runs_the_timeout_check_and_derives_steps() {
    let s = Server::start().await;
    let agent = Uuid::new_v4();
    let (code, _) = s.instance(agent).await;
    assert_eq!(code, 404);
    assert_eq!(
        call(&s, Method::GET, "/api/agents/nope/instance").await.0,
        400
    );
    let job = s.enqueue(agent, Uuid::new_v4()).await;
    let (code, view) = s.instance(agent).await;
    assert_eq!(code, 200, "{view}");
    assert!(view["instance"].is_null());
    assert_eq!(view["steps"][0]["status"], "active");
    s.runner(&format!(
        r#"{{"job_id":"{job}","status":"provisioning","workflow_run_id":"1"}}"#
    ))
    .await;
    s.runner(&format!(
        r#"{{"job_id":"{job}","status":"provisioning","step":"vm_created"}}"#
    ))
    .await;
    // The runner went silent for 20 minutes: reading the status fails the job (seed 003).
    s.db.exec(&format!("UPDATE provisioning_jobs SET last_heartbeat_at = now() - interval '20 minutes' WHERE id = '{job}'")).await;
    let (code, view) = s.instance(agent).await;
    assert_eq!(code, 200, "{view}");
    assert_eq!(view["job"]["status"], "failed");
    assert!(
        view["job"]["error"]
            .as_str()
            .unwrap()
            .starts_with("Timeout: No heartbeat for")
    );
    let states = step_states(&view);
    assert_eq!(
        states,
        ["completed", "completed", "error", "pending", "pending"]
    );
    assert_eq!(view["instance"]["currentStep"], "vm_created");
}

#[tokio::test]
async fn health_readiness_metrics_and_unknown_routes() {
    let s = Server::start().await;
    s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let get = |p: &str| s.http.get(s.url(p)).send();
    let r = get("/healthz").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = get("/readyz").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = get("/metrics").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    assert!(
        text.contains(r#"provisiond_jobs{status="queued"} 1"#),
        "{text}"
    );
    assert!(text.contains("provisiond_oldest_queued_job_age_seconds"));
    let (code, body) = status_json(get("/nope").await.unwrap()).await;
    assert_eq!((code, body["error"].as_str()), (404, Some("no such route")));
    let (code, _) = status_json(s.http.delete(s.url("/api/jobs")).send().await.unwrap()).await;
    assert_eq!(code, 405);

    // A database with a pending (here: reverted) migration when the server starts is not ready.
    let db = crate::support::TestDb::new().await;
    db.exec("DELETE FROM __diesel_schema_migrations WHERE version = (SELECT max(version) FROM __diesel_schema_migrations)").await;
    let behind = Server::over(db, settings(), QueueSettings::default()).await;
    let (code, body) =
        status_json(behind.http.get(behind.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("migrations"));
}

#[tokio::test]
async fn a_405_names_the_allowed_methods() {
    let s = Server::start().await;
    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/api/jobs".to_owned(), "POST, GET"),
        (
            reqwest::Method::GET,
            "/api/webhooks/stripe".to_owned(),
            "POST",
        ),
        (
            reqwest::Method::PUT,
            format!("/api/jobs/{}", Uuid::new_v4()),
            "GET",
        ),
        (reqwest::Method::POST, "/healthz".to_owned(), "GET"),
    ] {
        let r = s.admin(method.clone(), &path).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        let got = r
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(got.as_deref(), Some(allow), "{method} {path}");
    }
}

/// Sessions ever opened on `db` (pg_stat_database), read from the server's `postgres` database
/// so that reading does not add one.
async fn sessions_opened(db: &crate::support::TestDb) -> i64 {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut admin = AsyncPgConnection::establish(crate::support::server_url().await)
        .await
        .unwrap();
    diesel::sql_query(format!(
        "SELECT coalesce(sessions, 0)::bigint AS n FROM pg_stat_database WHERE datname = '{}'",
        db.name
    ))
    .get_result::<N>(&mut admin)
    .await
    .unwrap()
    .n
}

#[tokio::test]
async fn readiness_probes_use_the_pool_not_a_session_each() {
    let s = Server::start().await;
    let pool_size = 16; // tests/support's pool
    let before = sessions_opened(&s.db).await;
    let probes = (0..200).map(|_| {
        let r = s.http.get(s.url("/readyz")).send();
        async move { r.await.unwrap().status().as_u16() }
    });
    let codes = futures::future::join_all(probes).await;
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    // Backends that exited have flushed their session count; the pool's own are at most its size.
    let opened = sessions_opened(&s.db).await - before;
    assert!(opened <= pool_size, "200 probes opened {opened} sessions");
    let live =
        s.db.count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}'",
            s.db.name
        ))
        .await;
    // The pool, the queue's LISTEN connection, and this count's own connection.
    assert!(live <= pool_size + 2, "{live} sessions open");
}

/// Drops the test database for real (its sessions are terminated).
async fn drop_database(db: &crate::support::TestDb) {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
    let mut admin = AsyncPgConnection::establish(crate::support::server_url().await)
        .await
        .unwrap();
    diesel::sql_query(format!("DROP DATABASE {} WITH (FORCE)", db.name))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// A server over a fresh database whose pool waits up to `checkout` for a connection.
async fn server_with_checkout(checkout: Duration) -> Server {
    let db = crate::support::TestDb::new().await;
    let pool = provisiond::db::connect(&db.url, 4, checkout).await.unwrap();
    Server::over_pool(db, pool, settings(), QueueSettings::default()).await
}

#[tokio::test]
async fn readyz_is_503_within_its_timeout_when_the_database_is_gone() {
    // The pool would wait an hour for a connection; readiness must not. The client's timeout
    // is only a guard against hanging (it is far above http.readiness_timeout's 1 s).
    let s = server_with_checkout(Duration::from_secs(3600)).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let probe = || http.get(s.url("/readyz")).send();
    assert_eq!(probe().await.unwrap().status().as_u16(), 200);
    drop_database(&s.db).await;
    // The first probe finds the pooled connection broken; the second must wait for a new one.
    for _ in 0..2 {
        let (code, body) = status_json(probe().await.expect("answered, not hung")).await;
        assert_eq!(code, 503, "{body}");
    }
    let r = http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn webhooks_are_503_when_the_database_is_gone() {
    let s = server_with_checkout(Duration::from_secs(1)).await;
    drop_database(&s.db).await;
    // A webhook that needs the database is a retryable 503, never a 500.
    let (code, _) = s
        .runner(&format!(
            r#"{{"job_id":"{}","type":"heartbeat"}}"#,
            Uuid::new_v4()
        ))
        .await;
    assert_eq!(code, 503);
}

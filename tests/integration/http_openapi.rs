//! Keeps `/openapi.json` true: the document the server serves lists exactly the server's route
//! table, every reference in it resolves and every path parameter is declared, every code a
//! route returns to a battery of requests is documented for it, every documented code is really
//! produced, and a documented path answers any other method with 405 and `Allow`.

use crate::http_support::*;
use reqwest::Method;
use std::collections::BTreeSet;

fn doc() -> serde_json::Value {
    serde_json::from_str(provisiond::http::OPENAPI).expect("openapi.json is JSON")
}

/// The status code of a request whose body stops after a few of its declared bytes.
async fn stalled_body_status(s: &Server, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 100\r\n\r\n{{"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got).await;
    let text = String::from_utf8_lossy(&got);
    text.split(' ').nth(1).unwrap_or("no answer").to_owned()
}

fn documented() -> BTreeSet<(String, String)> {
    let doc = doc();
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

/// Every `$ref` in `v` names something that exists in `doc`.
fn check_refs(doc: &serde_json::Value, v: &serde_json::Value, broken: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(r) = map.get("$ref").and_then(|r| r.as_str()) {
                let target = r.strip_prefix('#').and_then(|pointer| doc.pointer(pointer));
                if target.is_none() {
                    broken.push(r.to_owned());
                }
            }
            map.values().for_each(|x| check_refs(doc, x, broken));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|x| check_refs(doc, x, broken)),
        _ => {}
    }
}

#[tokio::test]
async fn the_served_document_is_the_route_table_and_resolves() {
    let s = Server::start().await;
    let r = s.http.get(s.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let served: serde_json::Value = r.json().await.expect("the served document is JSON");
    assert!(served["openapi"].as_str().unwrap().starts_with("3."));
    let mut ops = BTreeSet::new();
    for (path, item) in served["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ops.insert((method.to_uppercase(), path.clone()));
            // Each `{x}` of the template is a declared path parameter, and nothing else is.
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            assert_eq!(in_path, declared, "{method} {path}");
            assert!(
                !op["responses"].as_object().unwrap().is_empty(),
                "{method} {path}"
            );
        }
    }
    let routes: BTreeSet<(String, String)> = provisiond::http::ROUTES
        .iter()
        .map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(ops, routes, "documented operations vs the route table");
    let mut broken = Vec::new();
    check_refs(&served, &served, &mut broken);
    assert!(broken.is_empty(), "unresolved $ref: {broken:?}");
}

#[tokio::test]
async fn every_answer_is_documented_for_its_route() {
    let s = Server::start().await;
    let job = s.enqueue(uuid::Uuid::new_v4(), uuid::Uuid::new_v4()).await;
    let doc = doc();
    let big = "x".repeat(70 * 1024);
    for (method, template) in documented() {
        let path = template.replace("{id}", &job);
        let codes: BTreeSet<String> = doc["paths"][&template][method.to_lowercase()]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let m: Method = method.parse().unwrap();
        let attempts = [
            s.http.request(m.clone(), s.url(&path)),
            s.admin(m.clone(), &path),
            s.admin(m.clone(), &path).body("{garbage"),
            s.admin(m.clone(), &path)
                .body(r#"{"job_id":"x","agent_id":"y"}"#),
            s.admin(m.clone(), &path).body(big.clone()),
        ];
        for attempt in attempts {
            let r = attempt.send().await.unwrap();
            let code = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert!(
                codes.contains(&code.to_string()),
                "{method} {template} answered {code}, documented: {codes:?}; body {text}"
            );
            if template != "/metrics" {
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|_| panic!("{method} {template} {code}: not JSON: {text}"));
            }
        }
        let allowed: Vec<String> = ["POST", "GET"]
            .into_iter()
            .filter(|m| documented().contains(&((*m).to_owned(), template.clone())))
            .map(str::to_owned)
            .collect();
        for other in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if documented().contains(&(other.to_owned(), template.clone())) {
                continue;
            }
            let r = s.admin(other.parse().unwrap(), &path).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 405, "{other} {template}");
            let allow = r
                .headers()
                .get("allow")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(allow, Some(allowed.join(", ")), "{other} {template}");
        }
    }
}

/// Every response code the document lists for an operation is one the server really gives:
/// one request per documented (operation, code), and the observed set must equal the documented.
#[tokio::test]
async fn every_documented_code_is_produced() {
    use reqwest::RequestBuilder;
    use uuid::Uuid;
    let s = Server::start().await;
    let mut off = settings();
    off.admin_token = None;
    off.stripe_secret = None;
    off.runner_secret = None;
    let dark = Server::with(off, provisiond::queue::QueueSettings::default()).await;
    // Agents belong to the web app here: an order for one it lacks is a 422.
    let adopted = Server::with(
        settings(),
        provisiond::queue::QueueSettings {
            mode: provisiond::db::DatabaseMode::Adopted { users_table: false },
            ..Default::default()
        },
    )
    .await;
    let (agent, user) = (Uuid::new_v4(), Uuid::new_v4());
    let held = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    s.queue.claim("w", 10).await.unwrap();
    let queued = s.enqueue(agent, user).await;
    let fresh = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let cancel_me = s.enqueue(Uuid::new_v4(), Uuid::new_v4()).await;
    let big = "x".repeat(70 * 1024);
    let unknown = Uuid::new_v4();
    let signed = |body: String| {
        s.http
            .post(s.url("/api/webhooks/github"))
            .header("X-Signature", sign_runner(&body))
            .body(body)
    };
    let stripe = |body: &str| {
        s.http
            .post(s.url("/api/webhooks/stripe"))
            .header("Stripe-Signature", stripe_header(body))
            .body(body.to_owned())
    };
    let get = |srv: &Server, p: &str| srv.http.get(srv.url(p));
    let adm = |m: Method, p: &str| s.admin(m, p);
    let job = |id: &str, tail: &str| format!("/api/jobs/{id}{tail}");
    let new_job = serde_json::json!({"agent_id": Uuid::new_v4(), "user_id": Uuid::new_v4(), "business_key": "cs_doc"});
    let other_user = serde_json::json!({"agent_id": agent, "user_id": Uuid::new_v4()});
    let g = "/api/webhooks/github";
    let st = "/api/webhooks/stripe";
    let inst = "/api/agents/{id}/instance";
    let mut cases: Vec<(&str, &str, RequestBuilder)> = vec![
        (
            "POST",
            st,
            stripe(r#"{"id":"evt_doc","type":"charge.succeeded"}"#),
        ),
        ("POST", st, s.http.post(s.url(st)).body("{}")),
        (
            "POST",
            st,
            s.http
                .post(s.url(st))
                .header("Stripe-Signature", "t=1,v1=00")
                .body("{}"),
        ),
        ("POST", st, s.http.post(s.url(st)).body(big.clone())),
        ("POST", st, dark.http.post(dark.url(st)).body("{}")),
        (
            "POST",
            g,
            signed(format!(r#"{{"job_id":"{fresh}","status":"provisioning"}}"#)),
        ),
        ("POST", g, signed("{".into())),
        ("POST", g, s.http.post(s.url(g)).body("{}")),
        (
            "POST",
            g,
            signed(format!(r#"{{"job_id":"{unknown}","type":"heartbeat"}}"#)),
        ),
        (
            "POST",
            g,
            signed(format!(r#"{{"job_id":"{queued}","type":"heartbeat"}}"#)),
        ),
        ("POST", g, s.http.post(s.url(g)).body(big.clone())),
        ("POST", g, dark.http.post(dark.url(g)).body("{}")),
        (
            "GET",
            inst,
            adm(Method::GET, &format!("/api/agents/{agent}/instance")),
        ),
        ("GET", inst, adm(Method::GET, "/api/agents/x/instance")),
        (
            "GET",
            inst,
            get(&s, &format!("/api/agents/{agent}/instance")),
        ),
        (
            "GET",
            inst,
            adm(Method::GET, &format!("/api/agents/{unknown}/instance")),
        ),
        (
            "GET",
            inst,
            adm(Method::GET, &format!("/api/agents/{agent}/instance")).body(big.clone()),
        ),
        (
            "GET",
            inst,
            get(&dark, &format!("/api/agents/{agent}/instance")),
        ),
        (
            "POST",
            "/api/jobs",
            adm(Method::POST, "/api/jobs").json(&new_job),
        ),
        (
            "POST",
            "/api/jobs",
            adm(Method::POST, "/api/jobs").json(&new_job),
        ),
        (
            "POST",
            "/api/jobs",
            adm(Method::POST, "/api/jobs").body("{"),
        ),
        (
            "POST",
            "/api/jobs",
            s.http.post(s.url("/api/jobs")).json(&new_job),
        ),
        (
            "POST",
            "/api/jobs",
            adm(Method::POST, "/api/jobs").json(&other_user),
        ),
        (
            "POST",
            "/api/jobs",
            adopted.admin(Method::POST, "/api/jobs").json(&new_job),
        ),
        (
            "POST",
            "/api/jobs",
            adm(Method::POST, "/api/jobs").body(big.clone()),
        ),
        (
            "POST",
            "/api/jobs",
            dark.http.post(dark.url("/api/jobs")).json(&new_job),
        ),
        ("GET", "/api/jobs", adm(Method::GET, "/api/jobs")),
        ("GET", "/api/jobs", adm(Method::GET, "/api/jobs?limit=0")),
        ("GET", "/api/jobs", get(&s, "/api/jobs")),
        (
            "GET",
            "/api/jobs",
            adm(Method::GET, "/api/jobs").body(big.clone()),
        ),
        ("GET", "/api/jobs", get(&dark, "/api/jobs")),
        ("GET", "/api/jobs/{id}", adm(Method::GET, &job(&queued, ""))),
        ("GET", "/api/jobs/{id}", adm(Method::GET, &job("x", ""))),
        ("GET", "/api/jobs/{id}", get(&s, &job(&queued, ""))),
        (
            "GET",
            "/api/jobs/{id}",
            adm(Method::GET, &job(&unknown.to_string(), "")),
        ),
        (
            "GET",
            "/api/jobs/{id}",
            adm(Method::GET, &job(&queued, "")).body(big.clone()),
        ),
        ("GET", "/api/jobs/{id}", get(&dark, &job(&queued, ""))),
    ];
    for tail in ["/retry", "/cancel"] {
        let t: &'static str = if tail == "/retry" {
            "/api/jobs/{id}/retry"
        } else {
            "/api/jobs/{id}/cancel"
        };
        let ok_job = if tail == "/retry" {
            &queued
        } else {
            &cancel_me
        };
        cases.extend([
            ("POST", t, adm(Method::POST, &job(ok_job, tail))),
            ("POST", t, adm(Method::POST, &job("x", tail))),
            ("POST", t, s.http.post(s.url(&job(ok_job, tail)))),
            (
                "POST",
                t,
                adm(Method::POST, &job(&unknown.to_string(), tail)),
            ),
            ("POST", t, adm(Method::POST, &job(&held, tail))),
            (
                "POST",
                t,
                adm(Method::POST, &job(ok_job, tail)).body(big.clone()),
            ),
            ("POST", t, dark.http.post(dark.url(&job(ok_job, tail)))),
        ]);
    }
    let sw = "/api/admin/sweep";
    cases.extend([
        ("POST", sw, adm(Method::POST, sw)),
        ("POST", sw, adm(Method::POST, sw).body("{}")),
        ("POST", sw, s.http.post(s.url(sw))),
        ("POST", sw, adm(Method::POST, sw).body(big.clone())),
        ("POST", sw, dark.http.post(dark.url(sw))),
    ]);
    for p in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        cases.push(("GET", p, get(&s, p)));
        cases.push(("GET", p, get(&s, p).body(big.clone())));
    }
    let mut seen: BTreeSet<(String, String, String)> = BTreeSet::new();
    for (m, t, req) in cases {
        let code = req.send().await.unwrap().status().as_u16();
        seen.insert((m.to_owned(), t.to_owned(), code.to_string()));
    }
    // Readiness with a migration missing when the server starts.
    let behind_db = crate::support::TestDb::new().await;
    behind_db
        .exec("DELETE FROM __diesel_schema_migrations WHERE version = (SELECT max(version) FROM __diesel_schema_migrations)")
        .await;
    let behind = Server::over(
        behind_db,
        settings(),
        provisiond::queue::QueueSettings::default(),
    )
    .await;
    let code = get(&behind, "/readyz")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    seen.insert(("GET".into(), "/readyz".into(), code.to_string()));
    // A body that does not arrive within http.body_read_timeout, at every route.
    let mut slow_settings = settings();
    slow_settings.body_read_timeout = std::time::Duration::from_millis(200);
    let slow = Server::with(slow_settings, provisiond::queue::QueueSettings::default()).await;
    for (m, t, _) in provisiond::http::ROUTES {
        let path = t.replace("{id}", &queued);
        let code = stalled_body_status(&slow, m, &path).await;
        seen.insert(((*m).to_owned(), (*t).to_owned(), code));
    }

    let doc = doc();
    let mut want = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for code in op["responses"].as_object().unwrap().keys() {
                want.insert((method.to_uppercase(), path.clone(), code.clone()));
            }
        }
    }
    let missing: Vec<_> = want.difference(&seen).collect();
    let undocumented: Vec<_> = seen.difference(&want).collect();
    assert!(
        missing.is_empty() && undocumented.is_empty(),
        "documented but not produced: {missing:?}\nproduced but not documented: {undocumented:?}"
    );
}

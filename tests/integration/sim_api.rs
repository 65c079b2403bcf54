//! The simulator's own contract, over raw HTTP: headers on every response, the real error
//! envelopes for unknown routes and bad bodies, label selectors, the per-project rate limit,
//! OAuth credentials by form or Basic, the admin fault endpoint and the state endpoint.

use clap::Parser;
use provisiond::secret::Secret;
use provisiond::sim::{FaultKind, SimArgs, SimConfig, SimHandle, SimState, Simulator};
use reqwest::Method;
use serde_json::{Value, json};

async fn sim(cfg: SimConfig) -> SimHandle {
    Simulator::start(cfg).await.unwrap()
}

async fn hz(h: &SimHandle, method: Method, path: &str, body: Option<&str>) -> reqwest::Response {
    let mut r = provisiond::tls::http_client()
        .request(method, format!("{}{path}", h.hetzner_base_url()))
        .bearer_auth(h.hetzner_token().expose());
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    r.send().await.unwrap()
}

async fn create(h: &SimHandle, name: &str, labels: Value) {
    let body = json!({"name": name, "server_type": "cx23", "image": "debian-12", "labels": labels});
    let r = hz(h, Method::POST, "/servers", Some(&body.to_string())).await;
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn every_hetzner_response_carries_correlation_id_and_rate_limit_headers() {
    let h = sim(SimConfig {
        rate_limit_per_hour: 7200,
        ..SimConfig::default()
    })
    .await;
    let now = chrono::Utc::now().timestamp() as u64;
    h.set_faults(provisiond::sim::Faults {
        rules: vec!["GET /v1/actions=502*1".parse().unwrap()],
        ..Default::default()
    });
    for (method, path) in [
        (Method::GET, "/actions"),
        (Method::GET, "/servers"),
        (Method::GET, "/servers/77"),
        (Method::GET, "/no/such/route"),
        (Method::PUT, "/servers"),
    ] {
        let r = hz(&h, method, path, None).await;
        let hd = r.headers();
        assert!(hd.contains_key("x-correlation-id"), "{path}");
        assert_eq!(hd["ratelimit-limit"], "7200");
        let remaining: u64 = hd["ratelimit-remaining"].to_str().unwrap().parse().unwrap();
        assert!(remaining < 7200);
        let reset: u64 = hd["ratelimit-reset"].to_str().unwrap().parse().unwrap();
        assert!(
            reset >= now && reset < now + 3600,
            "a UNIX time, not seconds: {reset}"
        );
        assert!(
            !hd.contains_key("retry-after"),
            "Hetzner sends no Retry-After"
        );
    }
    assert_eq!(
        h.state().count_status("GET /v1/actions", 502),
        1,
        "the fault fired"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_bad_bodies_get_the_real_envelopes() {
    let h = sim(SimConfig::default()).await;
    let cases: [(Method, &str, Option<&str>, u16, &str); 7] = [
        (Method::GET, "/nope", None, 404, "not_found"),
        (
            Method::POST,
            "/servers",
            Some("{not json"),
            400,
            "json_error",
        ),
        (Method::POST, "/servers", Some("[]"), 400, "invalid_input"),
        (
            Method::POST,
            "/servers",
            Some(r#"{"name":"-bad-","server_type":"cx23","image":"debian-12"}"#),
            400,
            "invalid_input",
        ),
        (
            Method::POST,
            "/servers",
            Some(r#"{"name":"ok","server_type":"cx23","image":"debian-12","location":"mars"}"#),
            400,
            "invalid_input",
        ),
        (
            Method::GET,
            "/servers?label_selector=env%20in%20(a",
            None,
            400,
            "invalid_input",
        ),
        (Method::GET, "/actions?id=abc", None, 400, "invalid_input"),
    ];
    for (method, path, body, status, code) in cases {
        let r = hz(&h, method, path, body).await;
        assert_eq!(r.status().as_u16(), status, "{path} {body:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{path} {body:?}: {v}");
        assert!(v["error"]["message"].is_string());
    }
    let ts = provisiond::tls::http_client()
        .get(format!("{}api/v2/nothing", h.tailscale_base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ts.status(), 404);
    assert!(ts.json::<Value>().await.unwrap()["message"].is_string());
    let unauth = provisiond::tls::http_client()
        .get(format!("{}/servers", h.hetzner_base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    assert_eq!(
        unauth.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn label_selectors_and_pagination_meta() {
    let h = sim(SimConfig::default()).await;
    create(&h, "a", json!({"env": "prod", "type": "web"})).await;
    create(&h, "b", json!({"env": "staging", "type": "database"})).await;
    create(&h, "c", json!({"env": "testing"})).await;
    let names = |v: &Value| -> Vec<String> {
        v["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for (selector, want) in [
        ("env=prod", vec!["a"]),
        ("env==prod", vec!["a"]),
        ("env!=prod", vec!["b", "c"]),
        ("type", vec!["a", "b"]),
        ("!type", vec!["c"]),
        ("env in (testing,staging)", vec!["b", "c"]),
        ("env notin (testing,staging)", vec!["a"]),
        ("env=production,type!=database", vec![]),
        ("env=staging,type!=web", vec!["b"]),
    ] {
        let q: String = url::form_urlencoded::byte_serialize(selector.as_bytes()).collect();
        let v: Value = hz(
            &h,
            Method::GET,
            &format!("/servers?label_selector={q}"),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(names(&v), want, "{selector}");
    }
    let v: Value = hz(&h, Method::GET, "/servers?per_page=2&page=1", None)
        .await
        .json()
        .await
        .unwrap();
    let p = &v["meta"]["pagination"];
    assert_eq!(
        (p["page"].as_u64(), p["per_page"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(
        (p["next_page"].as_u64(), p["last_page"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(p["total_entries"], 3);
    assert!(p["previous_page"].is_null());
    let v: Value = hz(&h, Method::GET, "/servers?per_page=2&page=2", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(names(&v), ["c"]);
    assert!(v["meta"]["pagination"]["next_page"].is_null());
    let v: Value = hz(&h, Method::GET, "/servers?name=b", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(names(&v), ["b"]);
    h.shutdown().await;
}

#[tokio::test]
async fn the_project_limit_answers_429_and_refills_gradually() {
    let h = sim(SimConfig {
        hetzner_tokens: vec![Secret::new("t1"), Secret::new("t2")],
        rate_limit_per_hour: 36_000,
        rate_limit_burst: 3,
        ..SimConfig::default()
    })
    .await;
    let c = provisiond::tls::http_client();
    let url = format!("{}/locations", h.hetzner_base_url());
    let mut statuses = Vec::new();
    // Two tokens of one project share its budget.
    for token in ["t1", "t2", "t1", "t2"] {
        statuses.push(c.get(&url).bearer_auth(token).send().await.unwrap());
    }
    let last = statuses.pop().unwrap();
    assert!(statuses.iter().all(|r| r.status() == 200));
    assert_eq!(last.status(), 429);
    assert_eq!(last.headers()["ratelimit-remaining"], "0");
    let v: Value = last.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let r = c.get(&url).bearer_auth("t1").send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "10/s refill gives a request back within 250 ms"
    );
    let st = h.state();
    assert_eq!(st.rate_limited.len(), 1);
    assert_eq!(st.rate_limited[0].client, "hetzner#1");
    h.shutdown().await;
}

#[tokio::test]
async fn oauth_token_accepts_form_or_basic_credentials() {
    let h = sim(SimConfig::default()).await;
    let url = format!("{}api/v2/oauth/token", h.tailscale_base_url());
    let c = provisiond::tls::http_client();
    let id = &h.config().tailscale_client_id;
    let secret = h.config().tailscale_client_secret.expose();
    let form = c
        .post(&url)
        .form(&[("client_id", id.as_str()), ("client_secret", secret)])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    let v: Value = form.json().await.unwrap();
    assert!(
        v["access_token"]
            .as_str()
            .unwrap()
            .starts_with("tskey-api-")
    );
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(v["token_type"], "Bearer");
    let basic = c
        .post(&url)
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    let wrong = c
        .post(&url)
        .basic_auth(id, Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let json_body = c
        .post(&url)
        .json(&json!({"client_id": id, "client_secret": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        json_body.status(),
        400,
        "the endpoint takes a form, not JSON"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn faults_are_set_by_the_admin_endpoint_and_state_counts_requests() {
    let h = sim(SimConfig::default()).await;
    let c = provisiond::tls::http_client();
    let admin = format!("{}_sim/faults", h.tailscale_base_url());
    let set = c
        .post(&admin)
        .json(
            &json!({"rules": [{"route": "GET /v1/servers", "fault": "503", "times": 2}],
                      "unavailable_locations": ["hel1"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let bad = c.post(&admin).body("{\"rules\": 5}").send().await.unwrap();
    assert_eq!(bad.status(), 400);

    let codes: Vec<u16> = futures::future::join_all((0..3).map(|_| async {
        hz(&h, Method::GET, "/servers", None)
            .await
            .status()
            .as_u16()
    }))
    .await;
    assert_eq!(codes.iter().filter(|c| **c == 503).count(), 2);
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 1);
    let r = hz(
        &h,
        Method::POST,
        "/servers",
        Some(r#"{"name":"h1","server_type":"cx23","image":"debian-12","location":"hel1"}"#),
    )
    .await;
    assert_eq!(r.status(), 412);

    let st: SimState = c
        .get(format!("{}_sim/state", h.tailscale_base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st.count_status("GET /v1/servers", 503), 2);
    assert_eq!(st.count_status("GET /v1/servers", 200), 1);
    assert_eq!(st.count_status("POST /v1/servers", 412), 1);
    assert_eq!(st.total_requests, 4, "admin calls are not counted");
    assert_eq!(st.log.len(), 4);
    assert!(st.servers.is_empty());
    h.shutdown().await;
}

#[test]
fn cli_flags_become_a_config() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }
    let cli = Cli::parse_from([
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--latency",
        "realistic",
        "--boot-time",
        "3s",
        "--fault",
        "POST /v1/servers=502*2",
        "--fault",
        "*=timeout@0.01",
        "--unavailable-location",
        "fsn1",
        "--leave-off",
    ]);
    let cfg = cli.sim.to_config();
    assert_eq!(cfg.latency.boot, std::time::Duration::from_secs(3));
    assert_eq!(cfg.latency.create, std::time::Duration::from_secs(10));
    assert_eq!(cfg.faults.rules.len(), 2);
    assert_eq!(cfg.faults.rules[0].fault, FaultKind::BadGateway);
    assert_eq!(cfg.faults.rules[0].times, Some(2));
    assert_eq!(cfg.faults.unavailable_locations, ["fsn1"]);
    assert!(cfg.faults.leave_off && !cfg.faults.fail_actions);
    assert_eq!(cfg.rate_limit_burst, 3600);
}

#[tokio::test]
async fn bad_key_requests_get_a_message_never_a_panic() {
    let h = sim(SimConfig::default()).await;
    let c = provisiond::tls::http_client();
    let base = h.tailscale_base_url();
    let token: Value = c
        .post(format!("{base}api/v2/oauth/token"))
        .form(&[
            ("client_id", h.config().tailscale_client_id.as_str()),
            ("client_secret", h.config().tailscale_client_secret.expose()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = token["access_token"].as_str().unwrap().to_owned();
    let caps = |tags: Value| json!({"capabilities": {"devices": {"create": {"tags": tags}}}});
    let mut huge = caps(json!(["tag:customer-vm"]));
    huge["expirySeconds"] = json!(i64::MAX);
    for body in [
        "{".to_owned(),
        caps(json!([])).to_string(),
        caps(json!(["tag:other"])).to_string(),
        huge.to_string(),
        json!({"capabilities": 1}).to_string(),
    ] {
        let r = c
            .post(format!("{base}api/v2/tailnet/-/keys"))
            .bearer_auth(&bearer)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    }
    let r = c
        .get(format!("{base}api/v2/tailnet/other.example/devices"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "unknown tailnet");
    let r = c
        .get(format!("{base}api/v2/tailnet/-/devices"))
        .bearer_auth("tskey-api-forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(h.state().keys.is_empty());
    h.shutdown().await;
}

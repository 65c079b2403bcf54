//! The simulator's Hetzner responses validate against the schemas of the public OpenAPI
//! description (`tests/fixtures/hetzner-openapi-subset.json`, extracted from
//! `../shared/contracts/hetzner-cloud-openapi.json` with `datacenter` removed), and never carry
//! `datacenter`.

use crate::support::openapi_schema;
use provisiond::sim::{LatencyProfile, SimConfig, SimHandle, Simulator};
use serde_json::{Value, json};
use std::time::Duration;

struct Schemas(Value);

impl Schemas {
    fn load() -> Schemas {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hetzner-openapi-subset.json"
        );
        Schemas(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
    }

    /// Asserts `instance` is a valid `name` (a component schema).
    fn check(&self, name: &str, instance: &Value) {
        let errors = openapi_schema::errors(&self.0, name, instance);
        assert!(errors.is_empty(), "{name}: {errors:#?}\n{instance:#}");
        assert!(
            !instance.to_string().contains("\"datacenter\""),
            "{name} must not carry datacenter"
        );
    }
}

async fn call(
    h: &SimHandle,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = provisiond::tls::http_client()
        .request(method, format!("{}{path}", h.hetzner_base_url()))
        .bearer_auth(h.hetzner_token().expose());
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn the_fixture_is_the_spec_without_datacenter() {
    let s = Schemas::load();
    let server = &s.0["components"]["schemas"]["server"];
    assert!(server["properties"].get("datacenter").is_none());
    assert!(
        server["required"]
            .as_array()
            .unwrap()
            .contains(&json!("public_net"))
    );
    // The checker is not a rubber stamp: a server without `datacenter` but also without
    // `status` is refused, and so are a wrong type, a bad label value and a bad timestamp.
    let refused = |v: Value| !openapi_schema::errors(&s.0, "server", &v).is_empty();
    assert!(refused(json!({"id": 1, "name": "x"})));
    let server = json!({
        "id": 1, "name": "x", "status": "running", "created": "2026-12-04T10:00:00+00:00",
        "public_net": {"ipv4": null, "ipv6": null, "floating_ips": [], "firewalls": []},
        "labels": {"job": "ok"}
    });
    // Each defect adds an error of its own (the partial server above is already incomplete).
    let base = openapi_schema::errors(&s.0, "server", &server).len();
    let adds_an_error = |v: &Value| openapi_schema::errors(&s.0, "server", v).len() > base;
    for (field, bad) in [
        ("id", json!("1")),
        ("labels", json!({"job": "-bad-"})),
        ("created", json!("yesterday")),
        ("status", json!(7)),
    ] {
        let mut broken = server.clone();
        broken[field] = bad.clone();
        assert!(adds_an_error(&broken), "{field} = {bad} passes");
    }
}

#[tokio::test]
async fn create_get_list_delete_and_action_responses_match_the_spec() {
    let h = Simulator::start(SimConfig {
        latency: LatencyProfile {
            create: Duration::from_millis(100),
            boot: Duration::from_millis(100),
            ..LatencyProfile::instant()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let s = Schemas::load();
    use reqwest::Method;

    let body = json!({
        "name": "job-spec", "server_type": "cpx22", "image": "ubuntu-24.04", "location": "hil",
        "labels": {"managed-by": "provisiond", "job": "spec", "empty": ""},
        "user_data": "#cloud-config\n", "start_after_create": true,
    });
    let (st, created) = call(&h, Method::POST, "/servers", Some(body)).await;
    assert_eq!(st, 201);
    s.check("create_server_response", &created);
    // The same response with one wrong enum, one bad timestamp or one missing key is refused.
    let create_valid =
        |v: &Value| openapi_schema::errors(&s.0, "create_server_response", v).is_empty();
    for (pointer, bad) in [
        ("/server/status", json!("teleporting")),
        ("/action/started", json!("yesterday")),
        ("/server/public_net/ipv4/ip", json!(null)),
    ] {
        let mut broken = created.clone();
        *broken.pointer_mut(pointer).unwrap() = bad;
        assert!(!create_valid(&broken), "{pointer} should be refused");
    }
    let mut no_next = created.clone();
    no_next.as_object_mut().unwrap().remove("next_actions");
    assert!(!create_valid(&no_next));
    assert!(
        created["root_password"].is_string(),
        "no ssh keys: a password"
    );
    let id = created["server"]["id"].as_i64().unwrap();
    let a1 = created["action"]["id"].as_i64().unwrap();
    let a2 = created["next_actions"][0]["id"].as_i64().unwrap();

    let (_, running) = call(&h, Method::GET, &format!("/actions?id={a1}&id={a2}"), None).await;
    s.check("get_multiple_actions_response", &running);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, done) = call(&h, Method::GET, &format!("/actions?id={a1}&id={a2}"), None).await;
    s.check("get_multiple_actions_response", &done);
    assert_eq!(done["actions"][1]["status"], "success");
    let (_, one) = call(&h, Method::GET, &format!("/actions/{a1}"), None).await;
    s.check("get_action_response", &one);

    let (_, got) = call(&h, Method::GET, &format!("/servers/{id}"), None).await;
    s.check("get_server_response", &got);
    assert_eq!(got["server"]["status"], "running");
    let (_, list) = call(
        &h,
        Method::GET,
        "/servers?label_selector=job%3Dspec&per_page=50",
        None,
    )
    .await;
    s.check("list_servers_response", &list);
    assert_eq!(list["servers"].as_array().unwrap().len(), 1);
    let (_, on) = call(
        &h,
        Method::POST,
        &format!("/servers/{id}/actions/poweron"),
        None,
    )
    .await;
    s.check("power_on_server_response", &on);
    let (_, types) = call(&h, Method::GET, "/server_types", None).await;
    s.check("list_server_types_response", &types);
    let (_, locations) = call(&h, Method::GET, "/locations", None).await;
    s.check("list_locations_response", &locations);
    let (st, deleted) = call(&h, Method::DELETE, &format!("/servers/{id}"), None).await;
    assert_eq!(st, 200);
    s.check("delete_server_response", &deleted);

    // Errors use the documented envelope.
    for (method, path, body, status) in [
        (Method::GET, "/servers/1".to_owned(), None, 404),
        (
            Method::POST,
            "/servers".to_owned(),
            Some(json!({"name": "x"})),
            400,
        ),
        (Method::GET, "/servers?per_page=51".to_owned(), None, 400),
        (Method::GET, "/nothing/here".to_owned(), None, 404),
    ] {
        let (st, err) = call(&h, method, &path, body).await;
        assert_eq!(st, status, "{path}");
        s.check("error_response", &err);
    }
    h.shutdown().await;
}

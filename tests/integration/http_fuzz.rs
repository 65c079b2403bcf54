//! Property test: random bodies, headers, signatures and path parameters at every route. The
//! server must never answer 5xx (the database is up), never panic, and write nothing: the
//! checksum of every table is the same before and after.

use crate::http_support::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Debug, Clone)]
struct Attack {
    route: usize,
    param: String,
    body: Vec<u8>,
    signature: Option<String>,
    stripe_signature: Option<String>,
    timestamp: Option<String>,
    authorization: Option<String>,
    /// Sign the runner body correctly (authentic garbage) instead of using `signature`.
    sign_runner: bool,
}

fn json_like() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z_]{0,12}".prop_map(|s| format!("{s:?}")),
        Just(format!("{:?}", uuid::Uuid::new_v4().to_string())),
        Just(r#""heartbeat""#.to_owned()),
        Just(r#""running""#.to_owned()),
        Just(r#""failed""#.to_owned()),
        Just(r#""provisioning""#.to_owned()),
        Just("{}".to_owned()),
    ];
    let key = prop_oneof![
        Just("job_id"),
        Just("status"),
        Just("type"),
        Just("step"),
        Just("server_id"),
        Just("server_ip"),
        Just("tailscale_ip"),
        Just("id"),
        Just("data"),
        Just("agent_id"),
        Just("user_id"),
    ];
    proptest::collection::vec((key, value), 0..6).prop_map(|fields| {
        let inner: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
        format!("{{{}}}", inner.join(",")).into_bytes()
    })
}

fn attack() -> impl Strategy<Value = Attack> {
    let hexish = prop_oneof![
        "[0-9a-fA-F]{0,70}",
        "[ -~]{0,80}",
        "t=[0-9]{0,12},v[01]=[0-9a-f]{0,64}(,v1=[0-9a-f]{64})?",
    ];
    (
        0..provisiond::http::ROUTES.len(),
        prop_oneof![
            "[a-zA-Z0-9_-]{1,40}",
            Just(uuid::Uuid::new_v4().to_string())
        ],
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..300), json_like()],
        proptest::option::of(hexish.clone()),
        proptest::option::of(hexish),
        proptest::option::of("-?[0-9]{0,12}"),
        proptest::option::of(prop_oneof!["Bearer [ -~]{0,40}", "[ -~]{0,40}"]),
        any::<bool>(),
    )
        .prop_map(
            |(
                route,
                param,
                body,
                signature,
                stripe_signature,
                timestamp,
                authorization,
                sign_runner,
            )| {
                Attack {
                    route,
                    param,
                    body,
                    signature,
                    stripe_signature,
                    timestamp,
                    authorization,
                    sign_runner,
                }
            },
        )
}

async fn fire(s: &Server, a: &Attack) -> u16 {
    let (method, template, _) = provisiond::http::ROUTES[a.route];
    let path = template.replace("{id}", &a.param);
    let mut r = s
        .http
        .request(method.parse().unwrap(), s.url(&path))
        .body(a.body.clone());
    if a.sign_runner && template == "/api/webhooks/github" {
        // Authentic but random: the body may be anything but a valid callback for a known job
        // (job ids here are random), so it must still write nothing.
        let body = String::from_utf8_lossy(&a.body).into_owned();
        r = s
            .http
            .post(s.url(&path))
            .header("X-Signature", sign_runner(&body))
            .body(body);
    } else if let Some(sig) = &a.signature
        && let Ok(v) = reqwest::header::HeaderValue::from_str(sig)
    {
        r = r.header("X-Signature", v);
    }
    for (name, value) in [
        ("Stripe-Signature", &a.stripe_signature),
        ("X-Signature-Timestamp", &a.timestamp),
        ("Authorization", &a.authorization),
    ] {
        if let Some(v) = value
            && let Ok(v) = reqwest::header::HeaderValue::from_str(v)
        {
            r = r.header(name, v);
        }
    }
    r.send()
        .await
        .expect("the server answers")
        .status()
        .as_u16()
}

#[test]
fn random_requests_never_5xx_and_never_write() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(Server::start());
    // A known job, so that authentic random callbacks have something they could hit.
    rt.block_on(s.enqueue(uuid::Uuid::new_v4(), uuid::Uuid::new_v4()));
    let before = rt.block_on(s.checksum());
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&attack(), |a| {
            let code = rt.block_on(fire(&s, &a));
            prop_assert!(code < 500, "{code} for {a:?}");
            Ok(())
        })
        .unwrap();
    assert_eq!(
        rt.block_on(s.checksum()),
        before,
        "a random request wrote something"
    );
}

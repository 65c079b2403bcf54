//! Property test: random bodies, headers, signatures and path parameters at every route, sent
//! unauthenticated, with random credentials, and authentic (a correctly signed Stripe or runner
//! request, a correctly authorised admin request) over random bodies that name real jobs. The
//! server must never answer 5xx (the database is up) and never panic, and a request it refuses
//! (4xx) must write nothing: the checksum of every table is the same before and after it. An
//! accepted request may write; that is how the fuzz reaches further states.

use crate::http_support::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// How a request is authenticated.
#[derive(Debug, Clone)]
enum Auth {
    /// Random or missing headers (almost never valid).
    Random {
        signature: Option<String>,
        stripe_signature: Option<String>,
        authorization: Option<String>,
    },
    /// Correct for whichever route it goes to: the runner HMAC, a fresh Stripe-Signature and
    /// the admin bearer token, all at once.
    Authentic,
}

#[derive(Debug, Clone)]
struct Attack {
    route: usize,
    param: String,
    body: Vec<u8>,
    timestamp: Option<String>,
    auth: Auth,
}

/// Stands for the id of known job `i` in generated text; replaced when the request is sent.
fn job_ref() -> impl Strategy<Value = String> {
    (0..JOBS).prop_map(|i| format!("@JOB{i}@"))
}

const JOBS: usize = 3;

fn uuid_text() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|n| uuid::Uuid::from_u128(n).to_string())
}

fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z_]{0,12}".prop_map(|s| format!("{s:?}")),
        // Control characters, NUL above all: PostgreSQL refuses NUL in text and jsonb.
        "[a-z]{0,4}".prop_map(|s| format!(r#""{s}\u0000{s}""#)),
        "[a-z]{0,4}".prop_map(|s| format!(r#""{s}\n\u0007""#)),
        uuid_text().prop_map(|u| format!("{u:?}")),
        job_ref().prop_map(|j| format!("{j:?}")),
        prop_oneof![
            Just("heartbeat"),
            Just("running"),
            Just("failed"),
            Just("provisioning"),
            Just("vm_created"),
            Just("network_configured"),
            Just("ansible_started"),
            Just("ansible_complete"),
            Just("checkout.session.completed"),
            Just("checkout.session.async_payment_succeeded"),
            Just("paid"),
            Just("us-east"),
            Just("eu-central"),
            Just("cs_fuzz_1"),
            Just("evt_fuzz_1"),
        ]
        .prop_map(|s| format!("{s:?}")),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        proptest::collection::vec((key(), inner), 0..4).prop_map(|fields| object(&fields))
    })
}

fn key() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("job_id"),
        Just("status"),
        Just("type"),
        Just("step"),
        Just("error"),
        Just("failed_step"),
        Just("workflow_run_id"),
        Just("server_id"),
        Just("server_ip"),
        Just("tailscale_ip"),
        Just("id"),
        Just("data"),
        Just("object"),
        Just("metadata"),
        Just("payment_status"),
        Just("agent_id"),
        Just("user_id"),
        Just("region"),
        Just("business_key"),
        Just("executor"),
        Just("max_retries"),
    ]
}

fn object(fields: &[(&str, String)]) -> String {
    let inner: Vec<String> = fields.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
    format!("{{{}}}", inner.join(","))
}

/// A value that is usually right for its field and sometimes hostile.
fn mostly(right: impl Strategy<Value = String> + 'static) -> BoxedStrategy<String> {
    prop_oneof![4 => right, 1 => json_value()].boxed()
}

fn quoted(words: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(words).prop_map(|w| format!("{w:?}"))
}

/// Fields (name, value strategy) as a JSON object: the first `required` always appear, each
/// other one appears or not.
fn some_of(
    required: usize,
    fields: Vec<(&'static str, BoxedStrategy<String>)>,
) -> BoxedStrategy<String> {
    let parts: Vec<BoxedStrategy<Option<(&'static str, String)>>> = fields
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let v = v.prop_map(move |v| (k, v));
            if i < required {
                v.prop_map(Some).boxed()
            } else {
                proptest::option::weighted(0.3, v).boxed()
            }
        })
        .collect();
    parts
        .prop_map(|fields| object(&fields.into_iter().flatten().collect::<Vec<_>>()))
        .boxed()
}

/// A runner callback shaped like the seed's, for a known job most of the time.
fn runner_body() -> BoxedStrategy<String> {
    let fields = vec![
        ("job_id", mostly(job_ref().prop_map(|j| format!("{j:?}")))),
        (
            "status",
            mostly(quoted(&["provisioning", "running", "failed"])),
        ),
        ("type", mostly(quoted(&["heartbeat"]))),
        (
            "step",
            mostly(quoted(&[
                "vm_created",
                "network_configured",
                "ansible_started",
                "ansible_complete",
            ])),
        ),
        ("workflow_run_id", mostly(quoted(&["111", "222"]))),
        ("error", mostly(quoted(&["boom", "disk full"]))),
        ("server_id", mostly(quoted(&["4711"]))),
        ("server_ip", mostly(quoted(&["203.0.113.7"]))),
        ("tailscale_ip", mostly(quoted(&["100.64.0.9"]))),
    ];
    some_of(2, fields)
}

/// A Stripe event shaped like a checkout session event.
fn stripe_body() -> BoxedStrategy<String> {
    let metadata = some_of(
        2,
        vec![
            (
                "agent_id",
                mostly(uuid_text().prop_map(|u| format!("{u:?}"))),
            ),
            (
                "user_id",
                mostly(uuid_text().prop_map(|u| format!("{u:?}"))),
            ),
            ("region", mostly(quoted(&["us-east", "eu-central", "mars"]))),
        ],
    );
    let session = some_of(
        2,
        vec![
            (
                "id",
                mostly("cs_[a-z0-9]{1,8}".prop_map(|s| format!("{s:?}"))),
            ),
            ("payment_status", mostly(quoted(&["paid", "unpaid"]))),
            ("metadata", metadata),
        ],
    );
    let data = some_of(1, vec![("object", session)]);
    some_of(
        3,
        vec![
            (
                "id",
                mostly("evt_[a-z0-9]{1,8}".prop_map(|s| format!("{s:?}"))),
            ),
            (
                "type",
                mostly(quoted(&[
                    "checkout.session.completed",
                    "checkout.session.async_payment_succeeded",
                    "charge.succeeded",
                ])),
            ),
            ("data", data),
        ],
    )
}

/// An admin `POST /api/jobs` body.
fn job_body() -> BoxedStrategy<String> {
    some_of(
        2,
        vec![
            (
                "agent_id",
                mostly(uuid_text().prop_map(|u| format!("{u:?}"))),
            ),
            (
                "user_id",
                mostly(uuid_text().prop_map(|u| format!("{u:?}"))),
            ),
            ("region", mostly(quoted(&["us-east", "eu-central", "mars"]))),
            (
                "business_key",
                mostly("[a-z0-9_]{1,10}".prop_map(|s| format!("{s:?}"))),
            ),
            ("executor", mostly(quoted(&["daemon", "external"]))),
            ("max_retries", mostly((0..5i32).prop_map(|n| n.to_string()))),
        ],
    )
}

/// A body for `route`: mostly shaped like what that route takes, sometimes anything.
fn body(route: usize) -> BoxedStrategy<Vec<u8>> {
    let shaped = match provisiond::http::ROUTES[route] {
        (_, "/api/webhooks/github", _) => runner_body(),
        (_, "/api/webhooks/stripe", _) => stripe_body(),
        ("POST", "/api/jobs", _) => job_body(),
        // The other routes take no body: an empty one is the shape that gets through.
        _ => Just(String::new()).boxed(),
    };
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => proptest::collection::vec((key(), json_value()), 0..7)
            .prop_map(|fields| object(&fields).into_bytes()),
        4 => shaped.prop_map(String::into_bytes),
    ]
    .boxed()
}

fn attack() -> impl Strategy<Value = Attack> {
    let hexish = prop_oneof![
        "[0-9a-fA-F]{0,70}",
        "[ -~]{0,80}",
        "t=[0-9]{0,12},v[01]=[0-9a-f]{0,64}(,v1=[0-9a-f]{64})?",
    ];
    let random = (
        proptest::option::of(hexish.clone()),
        proptest::option::of(hexish),
        proptest::option::of(prop_oneof!["Bearer [ -~]{0,40}", "[ -~]{0,40}"]),
    )
        .prop_map(
            |(signature, stripe_signature, authorization)| Auth::Random {
                signature,
                stripe_signature,
                authorization,
            },
        );
    let auth = prop_oneof![1 => random, 3 => Just(Auth::Authentic)];
    let route_and_body = (0..provisiond::http::ROUTES.len()).prop_flat_map(|r| (Just(r), body(r)));
    (
        route_and_body,
        prop_oneof!["[a-zA-Z0-9_-]{1,40}", uuid_text(), job_ref()],
        // The plain (seed) runner mode accepts an absent timestamp; a random one must not count.
        proptest::option::weighted(0.1, "-?[0-9]{0,12}"),
        auth,
    )
        .prop_map(|((route, body), param, timestamp, auth)| Attack {
            route,
            param,
            body,
            timestamp,
            auth,
        })
}

fn with_jobs(text: &[u8], jobs: &[String]) -> Vec<u8> {
    let mut s = String::from_utf8_lossy(text).into_owned();
    if !s.contains("@JOB") {
        return text.to_vec();
    }
    for (i, j) in jobs.iter().enumerate() {
        s = s.replace(&format!("@JOB{i}@"), j);
    }
    s.into_bytes()
}

fn header(r: reqwest::RequestBuilder, name: &str, value: &str) -> reqwest::RequestBuilder {
    match reqwest::header::HeaderValue::from_str(value) {
        Ok(v) => r.header(name, v),
        Err(_) => r,
    }
}

async fn fire(s: &Server, jobs: &[String], a: &Attack) -> u16 {
    let (method, template, _) = provisiond::http::ROUTES[a.route];
    let param = String::from_utf8(with_jobs(a.param.as_bytes(), jobs)).unwrap();
    let path = template.replace("{id}", &param);
    let body = with_jobs(&a.body, jobs);
    let mut r = s.http.request(method.parse().unwrap(), s.url(&path));
    match &a.auth {
        Auth::Random {
            signature,
            stripe_signature,
            authorization,
        } => {
            for (name, value) in [
                ("X-Signature", signature),
                ("Stripe-Signature", stripe_signature),
                ("Authorization", authorization),
            ] {
                if let Some(v) = value {
                    r = header(r, name, v);
                }
            }
        }
        Auth::Authentic => {
            // Both signatures are over the exact bytes sent, so they are sent as a string
            // only when the body is UTF-8 (the signing helpers take text).
            let text = String::from_utf8_lossy(&body).into_owned();
            r = r
                .header("X-Signature", sign_runner(&text))
                .header("Stripe-Signature", stripe_header(&text))
                .bearer_auth(ADMIN_TOKEN);
            return send(header_ts(r, a), text.into_bytes()).await;
        }
    }
    send(header_ts(r, a), body).await
}

fn header_ts(r: reqwest::RequestBuilder, a: &Attack) -> reqwest::RequestBuilder {
    match &a.timestamp {
        Some(ts) => header(r, "X-Signature-Timestamp", ts),
        None => r,
    }
}

async fn send(r: reqwest::RequestBuilder, body: Vec<u8>) -> u16 {
    r.body(body)
        .send()
        .await
        .expect("the server answers")
        .status()
        .as_u16()
}

/// Jobs the fuzz can name: a queued daemon job, a job a runner drives, and a queued job of
/// its own user.
async fn known_jobs(s: &Server) -> Vec<String> {
    let mut jobs = Vec::new();
    for _ in 0..JOBS {
        jobs.push(s.enqueue(uuid::Uuid::new_v4(), uuid::Uuid::new_v4()).await);
    }
    let (code, body) = s
        .runner(&format!(
            r#"{{"job_id":"{}","status":"provisioning"}}"#,
            jobs[1]
        ))
        .await;
    assert_eq!(code, 200, "{body}");
    jobs
}

#[test]
fn random_requests_never_5xx_and_refused_ones_never_write() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(Server::start());
    let jobs = rt.block_on(known_jobs(&s));
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let wrote = std::sync::atomic::AtomicUsize::new(0);
    let codes = std::sync::Mutex::new(std::collections::BTreeMap::<(usize, u16), usize>::new());
    runner
        .run(&attack(), |a| {
            let before = rt.block_on(s.checksum());
            let code = rt.block_on(fire(&s, &jobs, &a));
            *codes.lock().unwrap().entry((a.route, code)).or_default() += 1;
            prop_assert!(code < 500, "{code} for {a:?}");
            let after = rt.block_on(s.checksum());
            if code >= 400 {
                prop_assert_eq!(after, before, "refused with {} but wrote: {:?}", code, a);
            } else if after != before {
                wrote.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
        .unwrap();
    // Authentic requests must get through to writes, or the check above proves nothing.
    let wrote = wrote.into_inner();
    eprintln!("{wrote} of 256 requests wrote");
    assert!(
        wrote >= 5,
        "only {wrote} requests wrote anything; (route, code) counts: {:?}",
        codes.into_inner().unwrap()
    );
}

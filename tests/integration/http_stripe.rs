//! `POST /api/webhooks/stripe` over a real socket and a real database. Signatures are computed
//! here with the `hmac` crate (Stripe's published algorithm), never with the daemon's verifier.

use crate::http_support::*;
use provisiond::queue::QueueSettings;
use std::time::Duration;
use uuid::Uuid;

async fn jobs(s: &Server) -> i64 {
    s.db.count("SELECT count(*) FROM provisioning_jobs").await
}

#[tokio::test]
async fn the_documented_vector_is_right_and_accepted_at_its_timestamp() {
    const BODY: &str = r#"{"id":"evt_test_webhook","object":"event"}"#;
    const V1: &str = "88a022085c6bdb887b02cb26ff76dd681234d9675c0f22844059f55552a8883a";
    assert_eq!(stripe_v1("whsec_test_secret", 1_492_774_577, BODY), V1);
    // The vector is from 2017: only a server with a very wide tolerance may accept it.
    let mut settings = settings();
    settings.stripe_tolerance = Duration::from_secs(20 * 365 * 86400);
    let s = Server::with(settings, QueueSettings::default()).await;
    let (code, body) = s.stripe(BODY, &format!("t=1492774577,v1={V1}")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["outcome"], "ignored");
    assert_eq!(
        s.db.count("SELECT count(*) FROM stripe_events WHERE event_id = 'evt_test_webhook' AND outcome = 'ignored'")
            .await,
        1
    );
    // With the default tolerance the same header is a replay.
    let s = Server::start().await;
    let (code, _) = s.stripe(BODY, &format!("t=1492774577,v1={V1}")).await;
    assert_eq!(code, 401);
}

#[tokio::test]
async fn paid_session_enqueues_one_job_with_event_and_session_recorded() {
    let s = Server::start().await;
    let (agent, user) = (Uuid::new_v4(), Uuid::new_v4());
    let event = paid_session_event("evt_paid_1", "cs_test_paid_1", agent, user);
    let (code, body) = s.stripe(&event, &stripe_header(&event)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["outcome"], "enqueued");
    let job_id = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!(
        s.db.count(&format!(
            "SELECT count(*) FROM provisioning_jobs WHERE id = '{job_id}' AND agent_id = '{agent}'
             AND user_id = '{user}' AND region = 'eu-central' AND status = 'queued'
             AND executor = 'daemon' AND stripe_event_id = 'evt_paid_1'
             AND business_key = 'cs_test_paid_1'"
        ))
        .await,
        1
    );
    assert_eq!(s.job_status(&job_id).await, "queued");
}

#[tokio::test]
async fn duplicate_event_and_second_event_for_same_session_yield_one_job() {
    let s = Server::start().await;
    let (agent, user) = (Uuid::new_v4(), Uuid::new_v4());
    let event = paid_session_event("evt_dup_1", "cs_test_dup", agent, user);
    let (_, first) = s.stripe(&event, &stripe_header(&event)).await;
    let job = first["job_id"].clone();
    assert!(job.is_string());
    // Stripe redelivers the same event.
    let (code, again) = s.stripe(&event, &stripe_header(&event)).await;
    assert_eq!((code, &again["job_id"]), (200, &job), "{again}");
    assert_eq!(again["outcome"], "duplicate");
    // A different event for the same purchase.
    let second = event.replace("evt_dup_1", "evt_dup_2").replace(
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
    );
    let (code, other) = s.stripe(&second, &stripe_header(&second)).await;
    assert_eq!((code, &other["job_id"]), (200, &job), "{other}");
    assert_eq!(other["outcome"], "duplicate");
    assert_eq!(jobs(&s).await, 1);
    assert_eq!(s.db.count("SELECT count(*) FROM stripe_events").await, 2);
}

#[tokio::test]
async fn concurrent_deliveries_of_one_event_yield_one_job() {
    let s = Server::start().await;
    let event = paid_session_event("evt_race", "cs_test_race", Uuid::new_v4(), Uuid::new_v4());
    let header = stripe_header(&event);
    let results = futures::future::join_all((0..8).map(|_| s.stripe(&event, &header))).await;
    let ids: std::collections::HashSet<String> = results
        .iter()
        .map(|(code, b)| {
            assert_eq!(*code, 200, "{b}");
            b["job_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(jobs(&s).await, 1);
}

#[tokio::test]
async fn rolling_secret_two_v1_entries_are_accepted() {
    let s = Server::start().await;
    let event = paid_session_event("evt_roll", "cs_test_roll", Uuid::new_v4(), Uuid::new_v4());
    let t = now();
    let header = format!(
        "t={t},v1={},v1={}",
        stripe_v1("whsec_the_old_secret", t, &event),
        stripe_v1(STRIPE_SECRET, t, &event)
    );
    let (code, body) = s.stripe(&event, &header).await;
    assert_eq!(
        (code, body["outcome"].as_str()),
        (200, Some("enqueued")),
        "{body}"
    );
}

#[tokio::test]
async fn unauthentic_events_are_refused_and_write_nothing() {
    let s = Server::start().await;
    let event = paid_session_event("evt_bad", "cs_test_bad", Uuid::new_v4(), Uuid::new_v4());
    let t = now();
    let good = stripe_v1(STRIPE_SECRET, t, &event);
    let before = s.checksum().await;
    let cases: Vec<(String, u16)> = vec![
        // only the test-mode v0 scheme, even with the right digest
        (format!("t={t},v0={good}"), 401),
        // Outside the 300 s tolerance either way, with a margin: the server reads its clock
        // when the request arrives, which on a loaded machine can be seconds after `t`.
        (
            format!(
                "t={},v1={}",
                t - 330,
                stripe_v1(STRIPE_SECRET, t - 330, &event)
            ),
            401,
        ),
        (
            format!(
                "t={},v1={}",
                t + 330,
                stripe_v1(STRIPE_SECRET, t + 330, &event)
            ),
            401,
        ),
        (
            format!("t={t},v1={}", stripe_v1("whsec_other", t, &event)),
            401,
        ),
        (format!("t={t},v1={}", &good[..63]), 401),
        (format!("v1={good}"), 400),
        ("garbage".to_owned(), 400),
    ];
    for (header, want) in cases {
        let (code, body) = s.stripe(&event, &header).await;
        assert_eq!(code, want, "{header}: {body}");
        assert!(body["error"].is_string());
    }
    // The body is part of what is signed.
    let (code, _) = s
        .stripe(
            &event.replace("cs_test_bad", "cs_test_evil"),
            &format!("t={t},v1={good}"),
        )
        .await;
    assert_eq!(code, 401);
    // No header at all.
    let r = s
        .http
        .post(s.url("/api/webhooks/stripe"))
        .body(event.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(s.checksum().await, before);
}

#[tokio::test]
async fn authentic_but_not_actionable_events_are_acknowledged_and_kept_with_a_reason() {
    let s = Server::start().await;
    let (agent, user) = (Uuid::new_v4(), Uuid::new_v4());
    let unpaid = paid_session_event("evt_unpaid", "cs_test_u", agent, user)
        .replace(r#""payment_status":"paid""#, r#""payment_status":"unpaid""#);
    let no_meta = serde_json::json!({
        "id": "evt_nometa", "type": "checkout.session.completed",
        "data": {"object": {"id": "cs_test_n", "payment_status": "paid", "metadata": {}}}
    })
    .to_string();
    let bad_region =
        paid_session_event("evt_region", "cs_test_r", agent, user).replace("eu-central", "mars-1");
    for (event, id, reason) in [
        (&unpaid, "evt_unpaid", "payment_status"),
        (&no_meta, "evt_nometa", "metadata.agent_id"),
        (&bad_region, "evt_region", "mars-1"),
    ] {
        let (code, body) = s.stripe(event, &stripe_header(event)).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["outcome"], "not_actionable");
        assert!(body["reason"].as_str().unwrap().contains(reason), "{body}");
        assert_eq!(
            s.db.count(&format!(
                "SELECT count(*) FROM stripe_events WHERE event_id = '{id}' AND outcome = 'not_actionable' AND reason LIKE '%{reason}%'"
            ))
            .await,
            1
        );
    }
    assert_eq!(jobs(&s).await, 0);
    // The async success of the unpaid session then enqueues it.
    let later = unpaid.replace("evt_unpaid", "evt_async_ok").replace(
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
    );
    let (code, body) = s.stripe(&later, &stripe_header(&later)).await;
    assert_eq!(
        (code, body["outcome"].as_str()),
        (200, Some("enqueued")),
        "{body}"
    );
}

#[tokio::test]
async fn other_event_types_are_acknowledged_and_ignored() {
    let s = Server::start().await;
    let event = r#"{"id":"evt_pi","object":"event","type":"payment_intent.succeeded","data":{"object":{"id":"pi_1"}}}"#;
    let (code, body) = s.stripe(event, &stripe_header(event)).await;
    assert_eq!((code, body["outcome"].as_str()), (200, Some("ignored")));
    assert_eq!(jobs(&s).await, 0);
}

#[tokio::test]
async fn malformed_json_oversized_body_and_missing_secret() {
    let s = Server::start().await;
    let before = s.checksum().await;
    let (code, body) = s.stripe("{not json", &stripe_header("{not json")).await;
    assert_eq!((code, body["error"].as_str()), (400, Some("Invalid JSON")));
    let big = format!(r#"{{"id":"evt_big","pad":"{}"}}"#, "x".repeat(70_000));
    let (code, body) = s.stripe(&big, &stripe_header(&big)).await;
    assert_eq!(code, 413, "{body}");
    assert_eq!(s.checksum().await, before);

    let mut off = settings();
    off.stripe_secret = None;
    let s = Server::with(off, QueueSettings::default()).await;
    let event = r#"{"id":"evt_x"}"#;
    let (code, body) = s.stripe(event, &stripe_header(event)).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("stripe_webhook_secret_file")
    );
}

#[tokio::test]
async fn a_nul_in_a_signed_event_is_a_400_or_stored_safely_never_a_5xx() {
    let s = Server::start().await;
    let (agent, user) = (Uuid::new_v4(), Uuid::new_v4());
    let before = s.checksum().await;
    // In the event id or type (identifiers): malformed, nothing written.
    for event in [
        r#"{"id":"evt_\u0000nul","type":"checkout.session.completed"}"#.to_owned(),
        r#"{"id":"evt_nul_type","type":"checkout.\u0000session.completed"}"#.to_owned(),
    ] {
        let (code, body) = s.stripe(&event, &stripe_header(&event)).await;
        assert_eq!(code, 400, "{event}: {body}");
    }
    assert_eq!(s.checksum().await, before);
    // In the session id or the metadata: not actionable, acknowledged and recorded safely.
    let event = paid_session_event("evt_nul_session", "cs_\u{0}nul", agent, user);
    let (code, body) = s.stripe(&event, &stripe_header(&event)).await;
    assert_eq!(
        (code, body["outcome"].as_str()),
        (200, Some("not_actionable")),
        "{body}"
    );
    let event = paid_session_event("evt_nul_region", "cs_nul_region", agent, user)
        .replace(r#""region":"eu-central""#, r#""region":"eu-\u0000central""#);
    let (code, body) = s.stripe(&event, &stripe_header(&event)).await;
    assert_eq!(
        (code, body["outcome"].as_str()),
        (200, Some("not_actionable")),
        "{body}"
    );
    assert_eq!(
        s.db.count("SELECT count(*) FROM stripe_events WHERE outcome = 'not_actionable'")
            .await,
        2
    );
    assert_eq!(jobs(&s).await, 0);
}

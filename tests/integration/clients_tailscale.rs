//! The Tailscale client against the simulator over real HTTP: OAuth token caching, auth keys,
//! devices, and what the client does with errors and 429s.

use provisiond::clients::tailscale::{
    CreateKey, DeviceFilter, TailscaleClient, TailscaleConfig, TailscaleError,
};
use provisiond::secret::Secret;
use provisiond::sim::{FaultKind, FaultRule, Faults, SimConfig, SimHandle, Simulator};
use provisiond::tools::sim_clients::SimClients;
use std::time::{Duration, Instant};

async fn sim(cfg: SimConfig) -> SimHandle {
    Simulator::start(cfg).await.expect("simulator starts")
}

fn key(desc: &str, tags: &[&str]) -> CreateKey {
    CreateKey::single_use(
        desc,
        Duration::from_secs(600),
        tags.iter().map(|t| t.to_string()).collect(),
    )
}

fn fault(route: &str, fault: FaultKind) -> Faults {
    Faults {
        rules: vec![FaultRule {
            route: route.into(),
            fault,
            times: Some(1),
            probability: None,
        }],
        ..Faults::default()
    }
}

const TOKEN: &str = "POST /api/v2/oauth/token";
const KEYS: &str = "POST /api/v2/tailnet/{tailnet}/keys";
const DEVICES: &str = "GET /api/v2/tailnet/{tailnet}/devices";
const LIST_KEYS: &str = "GET /api/v2/tailnet/{tailnet}/keys";
const GET_KEY: &str = "GET /api/v2/tailnet/{tailnet}/keys/{id}";
const REVOKE: &str = "DELETE /api/v2/tailnet/{tailnet}/keys/{id}";

#[tokio::test]
async fn concurrent_callers_share_one_cached_token() {
    let h = sim(SimConfig::default()).await;
    let c = TailscaleClient::new(h.tailscale_config());
    let calls = (0..10).map(|_| {
        let c = c.clone();
        async move { c.list_devices(&DeviceFilter::default()).await }
    });
    for r in futures::future::join_all(calls).await {
        assert!(r.unwrap().is_empty());
    }
    assert_eq!(
        h.state().count(TOKEN),
        1,
        "one token for ten concurrent calls"
    );
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    assert_eq!(h.state().count(TOKEN), 1, "and reused afterwards");
    h.shutdown().await;
}

#[tokio::test]
async fn token_is_refreshed_a_minute_before_expiry() {
    // A 61 s token is due for refresh after 1 s.
    let h = sim(SimConfig {
        tailscale_token_ttl: Duration::from_secs(61),
        ..SimConfig::default()
    })
    .await;
    let c = TailscaleClient::new(h.tailscale_config());
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    assert_eq!(h.state().count(TOKEN), 1);
    // The cache runs on tokio's clock: jump it past the refresh point instead of sleeping. (Time
    // runs again for the request itself, so that no HTTP timeout fires early.)
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(900)).await;
    tokio::time::resume();
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    assert_eq!(h.state().count(TOKEN), 1, "not yet due");
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(200)).await;
    tokio::time::resume();
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    assert_eq!(h.state().count(TOKEN), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn wrong_client_secret_is_an_error_that_does_not_leak_it() {
    let h = sim(SimConfig::default()).await;
    let mut cfg = h.tailscale_config();
    cfg.client_secret = Secret::new("tskey-client-wrong");
    let c = TailscaleClient::new(cfg.clone());
    let e = c.list_devices(&DeviceFilter::default()).await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(!e.to_string().contains("tskey-client-wrong"));
    assert!(!format!("{cfg:?}").contains("tskey-client-wrong"));
    h.shutdown().await;
}

#[tokio::test]
async fn create_key_is_single_use_ephemeral_preauthorized_and_tagged() {
    let h = sim(SimConfig::default()).await;
    let c = TailscaleClient::new(h.tailscale_config());
    let k = c
        .create_auth_key(&key("job 7f3c2a", &["tag:customer-vm"]))
        .await
        .unwrap();
    assert!(k.key.expose().starts_with("tskey-auth-"));
    assert!(
        !format!("{k:?}").contains(k.key.expose()),
        "the key never prints"
    );
    let expires = k.expires.expect("expiry");
    let left = (expires - chrono::Utc::now()).num_seconds();
    assert!(
        (590..=600).contains(&left),
        "expirySeconds honoured: {left}"
    );
    let st = h.state();
    let sk = st.keys.iter().find(|s| s.id == k.id).unwrap();
    assert!(!sk.reusable && sk.ephemeral && sk.preauthorized);
    assert_eq!(sk.tags, ["tag:customer-vm"]);
    assert_eq!(sk.description, "job 7f3c2a");

    // Without tags in the request, the OAuth client's configured set is used.
    assert_eq!(c.tags(), ["tag:customer-vm"]);
    let k2 = c.create_auth_key(&key("job 2", &[])).await.unwrap();
    let st = h.state();
    assert_eq!(
        st.keys.iter().find(|s| s.id == k2.id).unwrap().tags,
        ["tag:customer-vm"]
    );
    h.shutdown().await;
}

#[tokio::test]
async fn tags_must_match_the_oauth_clients_full_set() {
    let h = sim(SimConfig {
        tailscale_tags: vec!["tag:customer-vm".into(), "tag:prod".into()],
        ..SimConfig::default()
    })
    .await;
    let c = TailscaleClient::new(h.tailscale_config());
    let e = c
        .create_auth_key(&key("job 1", &["tag:customer-vm"]))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(
        e.to_string().contains("are invalid or not permitted"),
        "{e}"
    );
    assert!(!e.is_retryable());
    c.create_auth_key(&key("job 1", &["tag:prod", "tag:customer-vm"]))
        .await
        .unwrap();
    assert_eq!(h.state().count(KEYS), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn bad_descriptions_are_refused_before_sending() {
    let h = sim(SimConfig::default()).await;
    let c = TailscaleClient::new(h.tailscale_config());
    for d in ["cs_test_abc", "job:1", &"x".repeat(51)] {
        let e = c
            .create_auth_key(&key(d, &["tag:customer-vm"]))
            .await
            .unwrap_err();
        assert!(matches!(e, TailscaleError::InvalidRequest(_)), "{d}: {e:?}");
    }
    assert_eq!(h.state().count(KEYS), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn revoke_key_and_revoking_an_unknown_key_is_done() {
    let h = sim(SimConfig::default()).await;
    let c = TailscaleClient::new(h.tailscale_config());
    let k = c
        .create_auth_key(&key("job 2", &["tag:customer-vm"]))
        .await
        .unwrap();
    c.revoke_key(&k.id).await.unwrap();
    let st = h.state();
    assert!(
        st.keys
            .iter()
            .find(|s| s.id == k.id)
            .unwrap()
            .revoked
            .is_some()
    );
    c.revoke_key("kNOSUCHKEYCNTRL").await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn a_429_on_a_read_waits_for_retry_after_but_a_key_create_is_not_retried() {
    let h = sim(SimConfig::default()).await;
    let c = TailscaleClient::new(h.tailscale_config());
    h.set_faults(fault(DEVICES, FaultKind::RateLimited));
    let started = Instant::now();
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 honoured"
    );
    assert_eq!(h.state().count(DEVICES), 2);

    h.set_faults(fault(KEYS, FaultKind::RateLimited));
    let e = c
        .create_auth_key(&key("job 3", &["tag:customer-vm"]))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(429));
    assert!(e.is_retryable());
    assert_eq!(h.state().count(KEYS), 1, "a write is never retried blindly");
    assert!(h.state().keys.is_empty());

    h.set_faults(fault(DEVICES, FaultKind::BadGateway));
    let before = h.state().count(DEVICES);
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    assert_eq!(
        h.state().count(DEVICES),
        before + 2,
        "a 502 on a read is retried"
    );
    h.shutdown().await;
}

fn quick(h: &SimHandle) -> TailscaleClient {
    let mut cfg = h.tailscale_config();
    cfg.retry_base = Duration::from_millis(5);
    cfg.request_timeout = Duration::from_millis(300);
    TailscaleClient::new(cfg)
}

fn rules(list: &[(&str, FaultKind)]) -> Faults {
    Faults {
        rules: list
            .iter()
            .map(|(route, fault)| FaultRule {
                route: route.to_string(),
                fault: *fault,
                times: Some(1),
                probability: None,
            })
            .collect(),
        ..Faults::default()
    }
}

#[tokio::test]
async fn every_idempotent_call_is_retried_through_5xx_and_timeouts() {
    let h = sim(SimConfig {
        hang: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    let c = quick(&h);
    h.set_faults(rules(&[
        (TOKEN, FaultKind::ServerError),
        (TOKEN, FaultKind::Timeout),
        (DEVICES, FaultKind::Unavailable),
        (DEVICES, FaultKind::Timeout),
        (LIST_KEYS, FaultKind::GatewayTimeout),
        (GET_KEY, FaultKind::ServerError),
        (REVOKE, FaultKind::BadGateway),
        (REVOKE, FaultKind::Timeout),
        ("DELETE /api/v2/device/{id}", FaultKind::ServerError),
    ]));
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    let k = c
        .create_auth_key(&key("pv-one", &["tag:customer-vm"]))
        .await
        .unwrap();
    assert_eq!(c.keys_described("pv-one").await.unwrap().len(), 1);
    c.revoke_key(&k.id).await.unwrap();
    c.delete_device("nNOSUCHCNTRL").await.unwrap();
    let st = h.state();
    assert!(st.keys.iter().all(|k| k.revoked.is_some()));
    assert_eq!(
        st.count_status(REVOKE, 200),
        2,
        "the timed-out revoke happened and was repeated"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn keys_are_found_by_description_from_a_listing_of_ids() {
    let h = sim(SimConfig::default()).await;
    let c = quick(&h);
    let a = c.create_auth_key(&key("pv-job-a", &[])).await.unwrap();
    let a2 = c.create_auth_key(&key("pv-job-a", &[])).await.unwrap();
    c.create_auth_key(&key("pv-job-b", &[])).await.unwrap();
    c.revoke_key(&a2.id).await.unwrap();
    // The listing has ids only (as documented); details come from each key.
    let listed: serde_json::Value = provisiond::tls::http_client()
        .get(format!("{}api/v2/tailnet/-/keys", h.tailscale_base_url()))
        .bearer_auth(
            serde_json::from_str::<serde_json::Value>(
                &provisiond::tls::http_client()
                    .post(format!("{}api/v2/oauth/token", h.tailscale_base_url()))
                    .form(&[
                        ("client_id", h.config().tailscale_client_id.as_str()),
                        ("client_secret", h.config().tailscale_client_secret.expose()),
                    ])
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap(),
            )
            .unwrap()["access_token"]
                .as_str()
                .unwrap(),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = listed["keys"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "revoked keys are not active: {listed}");
    assert!(entries.iter().all(|k| k.as_object().unwrap().len() == 1));

    let found = c.keys_described("pv-job-a").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, a.id);
    assert!(!found[0].invalid && found[0].created.is_some());
    assert!(c.keys_described("pv-job-c").await.unwrap().is_empty());
    assert_eq!(
        c.get_key(&a2.id).await.unwrap().map(|k| k.invalid),
        Some(true)
    );
    assert_eq!(c.get_key("kNOSUCHKEYCNTRL").await.unwrap(), None);
    h.shutdown().await;
}

#[tokio::test]
async fn a_wrong_oauth_credential_is_one_definitive_error_and_a_transient_one_is_retried() {
    let h = sim(SimConfig::default()).await;
    let patience = provisiond::clients::retry::RetryPolicy {
        base: Duration::from_millis(5),
        cap: Duration::from_millis(50),
        max_retries: 5,
    };
    let mut cfg = h.tailscale_config();
    cfg.client_secret = Secret::new("tskey-client-wrong");
    let wrong = TailscaleClient::new(cfg);
    let e = wrong.check_credentials(&patience).await.unwrap_err();
    assert!(e.is_bad_credential(), "{e:?}");
    assert!(!e.is_retryable());
    let line = e.to_string();
    assert!(
        line.contains("OAuth client rejected") && !line.contains("wrong"),
        "{line}"
    );
    assert_eq!(
        h.state().count(TOKEN),
        1,
        "a refused credential is not asked again"
    );

    h.set_faults(rules(&[
        (TOKEN, FaultKind::ServerError),
        (TOKEN, FaultKind::BadGateway),
    ]));
    let right = quick(&h);
    right.check_credentials(&patience).await.unwrap();
    assert_eq!(h.state().count(TOKEN), 4);
    h.shutdown().await;
}

#[tokio::test]
async fn key_create_timeout_is_reported_as_outcome_unknown() {
    let h = sim(SimConfig {
        hang: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let mut cfg: TailscaleConfig = h.tailscale_config();
    cfg.request_timeout = Duration::from_millis(300);
    let c = TailscaleClient::new(cfg);
    c.list_devices(&DeviceFilter::default()).await.unwrap();
    h.set_faults(fault(KEYS, FaultKind::Timeout));
    let e = c
        .create_auth_key(&key("job 4", &["tag:customer-vm"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            TailscaleError::Transport {
                timed_out: true,
                outcome_unknown: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        h.state().keys.len(),
        1,
        "the key was minted although we never heard"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn deleting_an_unknown_device_is_done() {
    let h = sim(SimConfig::default()).await;
    let c = TailscaleClient::new(h.tailscale_config());
    c.delete_device("nNOSUCHCNTRL").await.unwrap();
    assert_eq!(
        h.state().count_status("DELETE /api/v2/device/{id}", 404),
        1,
        "the API said 404 and the client took it as done"
    );
    h.shutdown().await;
}

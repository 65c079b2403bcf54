//! The Hetzner rate budget against the simulator's per-project limit, with a small limit so
//! the tests take seconds: bursts are spread out, nothing is sent between a 429 and its reset,
//! and the budget recovers.

use provisiond::clients::hetzner::{CreateServerRequest, HetznerClient};
use provisiond::secret::Secret;
use provisiond::sim::{SimConfig, SimHandle, SimState, Simulator};
use std::collections::BTreeMap;
use std::time::Duration;

/// 10 requests per second refill, at most 5 at once.
async fn small_budget_sim() -> SimHandle {
    Simulator::start(SimConfig {
        hetzner_tokens: vec![Secret::new("ours"), Secret::new("other-tool")],
        rate_limit_per_hour: 36_000,
        rate_limit_burst: 5,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn client(h: &SimHandle) -> HetznerClient {
    let mut cfg = h.hetzner_config();
    cfg.retry_base = Duration::from_millis(10);
    HetznerClient::new(cfg)
}

async fn one_server(c: &HetznerClient) -> i64 {
    c.create_server(&CreateServerRequest {
        name: "job-rate".into(),
        server_type: "cx23".into(),
        image: "ubuntu-24.04".into(),
        location: None,
        user_data: None,
        labels: BTreeMap::new(),
        ssh_keys: vec!["k".into()],
        start_after_create: true,
        public_net: None,
    })
    .await
    .unwrap()
    .server
    .id
}

/// Our client's requests (token #0), in arrival order, as UNIX microseconds.
fn our_arrivals(st: &SimState) -> Vec<i64> {
    st.log
        .iter()
        .filter(|r| r.client == "hetzner#0")
        .map(|r| r.at_us)
        .collect()
}

#[tokio::test]
async fn a_burst_is_spread_out_instead_of_hitting_the_limit() {
    let h = small_budget_sim().await;
    let c = client(&h);
    let id = one_server(&c).await;
    assert_eq!(
        c.budget().limit(),
        36_000,
        "limit learnt from RateLimit-Limit"
    );

    let calls = (0..20).map(|_| {
        let c = c.clone();
        async move { c.get_server(id).await }
    });
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(|r| matches!(r, Ok(Some(_)))));

    let st = h.state();
    assert!(
        st.rate_limited.is_empty(),
        "a budget-aware client never exceeds the limit: {:?}",
        st.rate_limited
    );
    assert_eq!(st.count_status("GET /v1/servers/{id}", 200), 20);
    // 21 requests against a bucket of 5 refilling 10/s cannot be sent in under 1.6 s.
    let t = our_arrivals(&st);
    let span = (t[t.len() - 1] - t[0]) as f64 / 1e6;
    assert!(span >= 1.4, "requests were paced over {span:.2}s");
    h.shutdown().await;
}

#[tokio::test]
async fn after_a_429_nothing_is_sent_before_reset_and_the_budget_recovers() {
    let h = small_budget_sim().await;
    let c = client(&h);
    let id = one_server(&c).await;

    // Another tool in the same project spends the shared budget behind our back.
    let other = provisiond::tls::http_client();
    let url = format!("{}/servers/{id}", h.hetzner_base_url());
    for _ in 0..8 {
        other
            .get(&url)
            .bearer_auth("other-tool")
            .send()
            .await
            .unwrap();
    }

    // Our client still believes it has budget, meets a 429, must wait for the reset, and then
    // gets through (rate_limit_exceeded is retried for reads).
    for _ in 0..6 {
        assert!(c.get_server(id).await.unwrap().is_some());
    }

    let st = h.state();
    let ours: Vec<_> = st
        .rate_limited
        .iter()
        .filter(|r| r.client == "hetzner#0")
        .collect();
    assert!(
        !ours.is_empty(),
        "the scenario must produce a 429 for our client"
    );
    let arrivals = our_arrivals(&st);
    for limited in &ours {
        let reset_us = limited.reset as i64 * 1_000_000;
        let early: Vec<_> = arrivals
            .iter()
            .filter(|t| **t > limited.at_us && **t < reset_us)
            .collect();
        assert!(
            early.is_empty(),
            "requests at {early:?} between a 429 at {} and its reset {}",
            limited.at_us,
            reset_us
        );
    }

    // Recovery: with nobody else spending, the budget fills up again and no further 429s come.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        c.budget().remaining() >= 3,
        "remaining {}",
        c.budget().remaining()
    );
    assert!(c.budget().blocked_until().is_none());
    let before = h.state().rate_limited.len();
    for _ in 0..3 {
        assert!(c.get_server(id).await.unwrap().is_some());
    }
    assert_eq!(h.state().rate_limited.len(), before);
    h.shutdown().await;
}

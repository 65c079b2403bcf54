//! The Hetzner rate budget against the simulator's per-project limit, with a small limit so
//! the tests take seconds: bursts are spread out, after a 429 nothing is sent until one request
//! has refilled (not until the reset, when the bucket is full again), and the budget recovers.
//! The stall after a 429 is measured exactly in paused time, on the budget itself.

use provisiond::clients::hetzner::{CreateServerRequest, HetznerClient};
use provisiond::clients::rate_budget::RateBudget;
use provisiond::secret::Secret;
use provisiond::sim::{SimConfig, SimHandle, SimState, Simulator};
use provisiond::tools::sim_clients::SimClients;
use std::collections::BTreeMap;
use std::sync::Arc;
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
async fn after_a_429_nothing_is_sent_until_one_request_refilled_and_the_budget_recovers() {
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

    // Our client still believes it has budget, meets a 429, waits for one refill (100 ms at
    // 10/s), and then gets through (rate_limit_exceeded is retried for reads).
    for _ in 0..6 {
        assert!(c.get_server(id).await.unwrap().is_some());
    }

    let st = h.state();
    let ours: Vec<_> = st
        .rate_limited
        .iter()
        .filter(|r| r.client == "hetzner#0")
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "exactly one 429: after it the client never sends into an empty bucket: {ours:?}"
    );
    let arrivals = our_arrivals(&st);
    let limited = ours[0];
    let next = arrivals
        .iter()
        .find(|t| **t > limited.at_us)
        .expect("a request after the 429");
    // One token takes 100 ms to refill; the next request waited for it (the sim's clock and
    // ours differ by the request's transit, hence the margin below 100 ms).
    assert!(
        next - limited.at_us >= 90_000,
        "next request {} µs after the 429",
        next - limited.at_us
    );
    // And it did not wait for the announced reset (the bucket full again, 0.5 s away).
    let reset_us = limited.reset as i64 * 1_000_000;
    assert!(
        *next < reset_us || reset_us - limited.at_us < 200_000,
        "waited for the reset"
    );

    // Recovery: with nobody else spending, the budget fills up again and no further 429s come.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        c.budget().remaining() >= 3,
        "remaining {}",
        c.budget().remaining()
    );
    let before = h.state().rate_limited.len();
    for _ in 0..3 {
        assert!(c.get_server(id).await.unwrap().is_some());
    }
    assert_eq!(h.state().rate_limited.len(), before);
    h.shutdown().await;
}

/// 40 callers in flight when a 429 arrives on a 3600/h project; returns when each got its
/// token, relative to the 429.
async fn grants_after_a_429(limit_per_hour: u64) -> Vec<Duration> {
    let b = Arc::new(RateBudget::new());
    b.observe(Some(limit_per_hour), Some(50));
    b.observe(Some(limit_per_hour), Some(0));
    b.rate_limited();
    let t0 = tokio::time::Instant::now();
    let waiters: Vec<_> = (0..40)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                b.acquire().await;
                t0.elapsed()
            })
        })
        .collect();
    let mut out = Vec::new();
    for w in waiters {
        out.push(w.await.unwrap());
    }
    out.sort();
    out
}

#[tokio::test(start_paused = true)]
async fn a_429_stalls_the_next_request_for_one_refill_not_until_the_bucket_is_full() {
    let grants = grants_after_a_429(3600).await;
    let stall = grants[0];
    eprintln!("stall after a 429 at 3600/h: {stall:?}");
    // One request refills in 1 s at 3600/h; the reset (bucket full) would be an hour away.
    assert!(
        stall >= Duration::from_millis(999),
        "{stall:?}: sent into an empty bucket"
    );
    assert!(stall < Duration::from_secs(2), "{stall:?}");
    let grants = grants_after_a_429(7200).await;
    assert!(grants[0] >= Duration::from_millis(499) && grants[0] < Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn after_a_429_the_refill_is_spread_evenly_over_the_work_in_flight() {
    let grants = grants_after_a_429(3600).await;
    // One grant per refilled token: the k-th caller goes at k seconds, none earlier (that
    // would send into an empty bucket) and none starved.
    for (k, g) in grants.iter().enumerate() {
        let due = Duration::from_secs(k as u64 + 1);
        assert!(
            *g + Duration::from_millis(1) >= due && *g <= due + Duration::from_millis(5),
            "caller {k} got its token at {g:?}, due {due:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn no_token_is_handed_out_while_the_budget_is_empty() {
    let b = Arc::new(RateBudget::new());
    b.observe(Some(3600), Some(0));
    b.rate_limited();
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.acquire().await })
    };
    tokio::time::sleep(Duration::from_millis(990)).await;
    assert!(
        !waiter.is_finished(),
        "a request went out before a token refilled"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(waiter.is_finished());
}

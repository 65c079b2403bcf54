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
    b.observe(Some(limit_per_hour), Some(50)).await;
    b.observe(Some(limit_per_hour), Some(0)).await;
    b.rate_limited().await;
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
    b.observe(Some(3600), Some(0)).await;
    b.rate_limited().await;
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

/// Three daemons' clients on one project (three tokens of it, three connection pools, as three
/// processes would have), each sending 20 reads one after another, all three at once; returns
/// the simulator's record and how many reads failed (after the client's own retries).
async fn three_daemons_read(shared: Option<&crate::support::TestDb>) -> (SimState, usize) {
    let h = Simulator::start(SimConfig {
        hetzner_tokens: vec![Secret::new("d0"), Secret::new("d1"), Secret::new("d2")],
        rate_limit_per_hour: 36_000,
        rate_limit_burst: 5,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut clients = Vec::new();
    for d in 0..3 {
        let mut cfg = h.hetzner_config();
        cfg.retry_base = Duration::from_millis(10);
        cfg.token = Secret::new(format!("d{d}"));
        let budget = match shared {
            Some(db) => {
                let store = provisiond::db::rate_budget::PgRateBudget::open(db.pool().await, "p1")
                    .await
                    .unwrap();
                RateBudget::shared(Arc::new(store))
            }
            None => RateBudget::new(),
        };
        clients.push(HetznerClient::new(cfg).with_budget(Arc::new(budget)));
    }
    let id = one_server(&clients[0]).await;
    let daemons = clients.iter().map(|c| async move {
        let mut failed = 0;
        for _ in 0..20 {
            failed += usize::from(!matches!(c.get_server(id).await, Ok(Some(_))));
        }
        failed
    });
    let failed = futures::future::join_all(daemons).await.into_iter().sum();
    let st = h.state();
    h.shutdown().await;
    (st, failed)
}

#[tokio::test]
async fn daemons_sharing_a_project_share_one_budget_and_never_meet_a_429() {
    let db = crate::support::TestDb::new().await;
    let (st, failed) = three_daemons_read(Some(&db)).await;
    assert_eq!(failed, 0);
    assert!(
        st.rate_limited.is_empty(),
        "the shared budget overspent the project: {:?}",
        st.rate_limited
    );
    // Used evenly: in the first half of the reads, each daemon had its share (reservations are
    // served in the order they reach the database, whichever process made them; with a budget
    // per process, the first to learn the headers would take more).
    let reads: Vec<&str> = st
        .log
        .iter()
        .filter(|r| r.route == "GET /v1/servers/{id}" && r.status == 200)
        .map(|r| r.client.as_str())
        .collect();
    assert_eq!(reads.len(), 60);
    for d in 0..3 {
        let name = format!("hetzner#{d}");
        let early = reads[..30].iter().filter(|c| **c == name).count();
        assert!((8..=12).contains(&early), "{name}: {early} of the first 30");
    }
    assert!(
        db.count("SELECT rate_limited FROM hetzner_rate_budgets WHERE project = 'p1'")
            .await
            == 0
    );
}

/// The same load with a budget per process overspends the project: what the shared budget is for.
#[tokio::test]
async fn daemons_pacing_themselves_alone_overspend_a_shared_project() {
    let (st, _) = three_daemons_read(None).await;
    assert!(
        !st.rate_limited.is_empty(),
        "three separate budgets stayed within one project's limit by luck"
    );
}

/// The shared bucket's arithmetic, read from the database's answers (no clock is waited on):
/// after a 429 the next reservation waits one token's refill, the one after it two, and the
/// API's `remaining` only ever lowers the count.
#[tokio::test]
async fn the_shared_bucket_empties_on_a_429_and_refills_one_token_at_a_time() {
    use provisiond::clients::rate_budget::SharedBudgetStore;
    let db = crate::support::TestDb::new().await;
    let store = provisiond::db::rate_budget::PgRateBudget::open(db.pool().await, "p")
        .await
        .unwrap();
    // 36,000/h: one token every 100 ms; the API says 20 are left.
    let b = store.observe(Some(36_000), Some(20)).await.unwrap();
    assert_eq!((b.limit_per_hour, b.capacity), (36_000.0, 21.0));
    assert!((b.tokens - 20.0).abs() < 0.1, "{b:?}");
    // A late response claiming more does not raise it.
    let b = store.observe(Some(36_000), Some(30)).await.unwrap();
    assert!(b.tokens < 20.5, "{b:?}");
    let first = store.reserve().await.unwrap();
    assert_eq!(first.wait, Duration::ZERO, "tokens are there");

    let b = store.rate_limited().await.unwrap();
    assert!(b.tokens.abs() < 0.05, "empty after a 429: {b:?}");
    let next = store.reserve().await.unwrap();
    let after = store.reserve().await.unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // Measured from each reservation's own time, so the milliseconds this machine takes
    // between statements come off the waits; the spacing stays one token (100 ms).
    assert!(ms(next.wait) > 0.0 && ms(next.wait) <= 100.0, "{next:?}");
    assert!(
        ms(after.wait) > 100.0 && ms(after.wait) <= 200.0,
        "{after:?}"
    );
    assert!(ms(after.wait) - ms(next.wait) > 50.0, "{next:?} {after:?}");
    assert_eq!(
        db.count("SELECT rate_limited FROM hetzner_rate_budgets WHERE project = 'p'")
            .await,
        1
    );
}

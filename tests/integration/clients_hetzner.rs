//! The Hetzner client against the simulator over real HTTP: every operation, and what the
//! client does with every class of error.

use provisiond::clients::hetzner::{
    ActionStatus, CreateServerRequest, ErrorClass, HetznerClient, HetznerConfig, HetznerError,
    PublicNetRequest, ServerQuery, ServerStatus,
};
use provisiond::secret::Secret;
use provisiond::sim::{
    FaultKind, FaultRule, Faults, LatencyProfile, SimConfig, SimHandle, Simulator,
};
use provisiond::tools::sim_clients::SimClients;
use std::collections::BTreeMap;
use std::time::Duration;

async fn sim(cfg: SimConfig) -> SimHandle {
    Simulator::start(cfg).await.expect("simulator starts")
}

fn client(h: &SimHandle) -> HetznerClient {
    let mut cfg = h.hetzner_config();
    // Short backoff so retry tests take milliseconds.
    cfg.retry_base = Duration::from_millis(5);
    cfg.request_timeout = Duration::from_secs(5);
    HetznerClient::new(cfg)
}

fn req(name: &str) -> CreateServerRequest {
    CreateServerRequest {
        name: name.to_owned(),
        server_type: "cx23".into(),
        image: "ubuntu-24.04".into(),
        location: Some("fsn1".into()),
        user_data: None,
        labels: BTreeMap::from([
            ("managed-by".to_owned(), "provisiond".to_owned()),
            ("job".to_owned(), name.to_owned()),
        ]),
        ssh_keys: vec!["ops".into()],
        start_after_create: true,
        public_net: None,
    }
}

fn rule(route: &str, fault: FaultKind, times: u32) -> FaultRule {
    FaultRule {
        route: route.into(),
        fault,
        times: Some(times),
        probability: None,
    }
}

fn faults(rules: Vec<FaultRule>) -> Faults {
    Faults {
        rules,
        ..Faults::default()
    }
}

#[tokio::test]
async fn create_returns_server_ip_and_actions_then_server_runs() {
    let h = sim(SimConfig::default()).await;
    let c = client(&h);
    let created = c.create_server(&req("job-a1")).await.unwrap();
    assert_eq!(created.server.name, "job-a1");
    assert_eq!(created.server.status, ServerStatus::Initializing);
    assert!(
        created.server.ipv4().is_some(),
        "the IP is already in the 201"
    );
    assert_eq!(created.server.location_name(), Some("fsn1"));
    assert_eq!(created.action.command, "create_server");
    assert_eq!(created.action.status, ActionStatus::Running);
    assert_eq!(created.next_actions.len(), 1);
    assert_eq!(created.next_actions[0].command, "start_server");
    assert!(created.root_password.is_none(), "ssh keys were given");

    let ids = [created.action.id, created.next_actions[0].id];
    let actions = c.get_actions(&ids).await.unwrap();
    assert_eq!(actions.len(), 2);
    assert!(
        actions
            .iter()
            .all(|a| a.status == ActionStatus::Success && a.progress == 100)
    );
    let s = c.get_server(created.server.id).await.unwrap().unwrap();
    assert_eq!(s.status, ServerStatus::Running);
    assert_eq!(s.labels.get("job").map(String::as_str), Some("job-a1"));
    h.shutdown().await;
}

#[tokio::test]
async fn root_password_only_without_ssh_keys_and_stays_secret() {
    let h = sim(SimConfig::default()).await;
    let c = client(&h);
    let mut r = req("job-pw");
    r.ssh_keys.clear();
    r.public_net = Some(PublicNetRequest {
        enable_ipv4: false,
        enable_ipv6: true,
    });
    let created = c.create_server(&r).await.unwrap();
    let pw = created.root_password.clone().expect("generated password");
    assert!(!pw.is_empty());
    assert!(!format!("{created:?}").contains(pw.expose()));
    assert_eq!(
        created.server.ipv4(),
        None,
        "enable_ipv4: false gives no IPv4"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn actions_progress_over_time_and_server_moves_to_running() {
    let h = sim(SimConfig {
        latency: LatencyProfile {
            create: Duration::from_millis(300),
            boot: Duration::from_millis(300),
            ..LatencyProfile::instant()
        },
        ..SimConfig::default()
    })
    .await;
    let c = client(&h);
    let created = c.create_server(&req("job-slow")).await.unwrap();
    let id = created.server.id;
    let early = c.get_server(id).await.unwrap().unwrap();
    assert_eq!(early.status, ServerStatus::Initializing);
    let start = created.next_actions[0].id;
    let a = c.get_actions(&[start]).await.unwrap();
    assert_eq!(a[0].status, ActionStatus::Running);
    assert!(a[0].progress < 100);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let a = c.get_actions(&[start]).await.unwrap();
    assert_eq!(a[0].status, ActionStatus::Success);
    assert!(a[0].finished.is_some());
    assert_eq!(
        c.get_server(id).await.unwrap().unwrap().status,
        ServerStatus::Running
    );
    h.shutdown().await;
}

#[tokio::test]
async fn list_follows_pagination_and_filters_by_label_and_name() {
    let h = sim(SimConfig::default()).await;
    let c = client(&h);
    for i in 0..60 {
        c.create_server(&req(&format!("job-{i:03}"))).await.unwrap();
    }
    let mut other = req("other-1");
    other.labels = BTreeMap::from([("managed-by".to_owned(), "someone-else".to_owned())]);
    c.create_server(&other).await.unwrap();

    let ours = c
        .list_servers(&ServerQuery {
            label_selector: Some("managed-by=provisiond".into()),
            name: None,
        })
        .await
        .unwrap();
    assert_eq!(ours.len(), 60);
    assert_eq!(
        h.state().count("GET /v1/servers"),
        2,
        "60 servers at 50 per page are two requests"
    );
    let by_name = c
        .list_servers(&ServerQuery {
            label_selector: None,
            name: Some("job-007".into()),
        })
        .await
        .unwrap();
    assert_eq!(by_name.len(), 1);
    assert_eq!(by_name[0].name, "job-007");
    let one_job = c
        .list_servers(&ServerQuery {
            label_selector: Some("managed-by=provisiond,job in (job-001,job-002),!absent".into()),
            name: None,
        })
        .await
        .unwrap();
    assert_eq!(one_job.len(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn get_actions_batches_25_ids_per_request() {
    let h = sim(SimConfig::default()).await;
    let c = client(&h);
    let mut ids = Vec::new();
    for i in 0..15 {
        let r = c.create_server(&req(&format!("job-act{i}"))).await.unwrap();
        ids.push(r.action.id);
        ids.push(r.next_actions[0].id);
    }
    ids.push(999_999_999); // unknown ids are simply absent
    let actions = c.get_actions(&ids).await.unwrap();
    assert_eq!(actions.len(), 30);
    assert_eq!(
        h.state().count("GET /v1/actions"),
        2,
        "31 ids are two chunks"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn delete_returns_action_and_a_second_delete_is_done() {
    let h = sim(SimConfig {
        latency: LatencyProfile {
            delete: Duration::from_millis(300),
            ..LatencyProfile::instant()
        },
        ..SimConfig::default()
    })
    .await;
    let c = client(&h);
    let id = c.create_server(&req("job-del")).await.unwrap().server.id;
    let action = c.delete_server(id).await.unwrap().expect("delete action");
    assert_eq!(action.command, "delete_server");
    let s = c
        .get_server(id)
        .await
        .unwrap()
        .expect("briefly still listed");
    assert_eq!(s.status, ServerStatus::Deleting);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(c.get_server(id).await.unwrap().is_none());
    assert!(
        c.delete_server(id).await.unwrap().is_none(),
        "404 on delete is done"
    );
    assert!(c.get_server(424242).await.unwrap().is_none());
    h.shutdown().await;
}

#[tokio::test]
async fn uniqueness_error_is_an_adopt_signal_and_create_is_sent_once() {
    let h = sim(SimConfig::default()).await;
    let c = client(&h);
    c.create_server(&req("job-dup")).await.unwrap();
    let err = c.create_server(&req("job-dup")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Adopt);
    assert_eq!(err.status(), Some(409));
    assert_eq!(err.code(), Some("uniqueness_error"));
    let cid = err.correlation_id().expect("correlation id").to_owned();
    assert!(
        err.to_string().contains(&cid),
        "correlation id in the message: {err}"
    );
    assert_eq!(h.state().count("POST /v1/servers"), 2);
    // Adoption: the existing server is found by its labels.
    let found = c
        .list_servers(&ServerQuery {
            label_selector: Some("managed-by=provisiond,job=job-dup".into()),
            name: None,
        })
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn resource_unavailable_is_a_relocate_signal() {
    let h = sim(SimConfig {
        faults: Faults {
            unavailable_locations: vec!["fsn1".into()],
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let c = client(&h);
    let err = c.create_server(&req("job-reloc")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Relocate);
    assert_eq!(err.code(), Some("resource_unavailable"));
    let mut elsewhere = req("job-reloc");
    elsewhere.location = Some("nbg1".into());
    let ok = c.create_server(&elsewhere).await.unwrap();
    assert_eq!(ok.server.location_name(), Some("nbg1"));
    h.shutdown().await;
}

#[tokio::test]
async fn fatal_errors_invalid_input_unauthorized_and_quota() {
    let h = sim(SimConfig {
        server_limit: Some(1),
        ..SimConfig::default()
    })
    .await;
    let c = client(&h);
    let mut bad_type = req("job-bad");
    bad_type.server_type = "cx99".into();
    let e = c.create_server(&bad_type).await.unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Fatal, Some("invalid_input"))
    );

    let mut deprecated = req("job-old");
    deprecated.server_type = "cx22".into();
    let e = c.create_server(&deprecated).await.unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Fatal, Some("invalid_input"))
    );

    c.create_server(&req("job-first")).await.unwrap();
    let e = c.create_server(&req("job-second")).await.unwrap_err();
    assert_eq!(e.status(), Some(403));
    assert_eq!(e.code(), Some("resource_limit_exceeded"));
    assert_eq!(
        e.class(),
        ErrorClass::Fatal,
        "a 403 quota is not a rate limit"
    );

    let wrong = HetznerClient::new(HetznerConfig::new(
        h.hetzner_base_url(),
        Secret::new("nope"),
    ));
    let e = wrong.get_server(1).await.unwrap_err();
    assert_eq!((e.status(), e.class()), (Some(401), ErrorClass::Fatal));
    assert!(!e.to_string().contains("nope"));
    assert!(!format!("{:?}", h.hetzner_config()).contains(h.hetzner_token().expose()));
    h.shutdown().await;
}

#[tokio::test]
async fn retryable_codes_are_retried_for_reads_but_never_for_create() {
    let h = sim(SimConfig::default()).await;
    let c = client(&h);
    let id = c.create_server(&req("job-r")).await.unwrap().server.id;

    h.set_faults(faults(vec![
        rule("GET /v1/servers/{id}", FaultKind::BadGateway, 1),
        rule("GET /v1/servers/{id}", FaultKind::Conflict, 1),
        rule("GET /v1/servers/{id}", FaultKind::GatewayTimeout, 1),
    ]));
    assert!(c.get_server(id).await.unwrap().is_some());
    assert_eq!(
        h.state().count("GET /v1/servers/{id}"),
        4,
        "three retries, then success"
    );

    h.set_faults(faults(vec![rule(
        "POST /v1/servers",
        FaultKind::BadGateway,
        1,
    )]));
    let e = c.create_server(&req("job-r2")).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable);
    assert!(!e.outcome_unknown(), "a 502 is an answer");
    assert_eq!(
        h.state().count("POST /v1/servers"),
        2,
        "the failed create was sent once"
    );

    // 503 `unavailable` and 500 are retried too (hcloud-go does not): for a read, a passing
    // fault of the service must cost a retry, not a job attempt.
    h.set_faults(faults(vec![
        rule("GET /v1/servers/{id}", FaultKind::Unavailable, 1),
        rule("GET /v1/servers/{id}", FaultKind::ServerError, 1),
    ]));
    let before = h.state().count("GET /v1/servers/{id}");
    assert!(c.get_server(id).await.unwrap().is_some());
    assert_eq!(h.state().count("GET /v1/servers/{id}"), before + 3);

    // Retries are bounded: a fault that never stops ends in the error after max_retries.
    h.set_faults(faults(vec![FaultRule {
        route: "DELETE /v1/servers/{id}".into(),
        fault: FaultKind::BadGateway,
        times: None,
        probability: None,
    }]));
    let e = c.delete_server(id).await.unwrap_err();
    assert_eq!(e.status(), Some(502));
    assert_eq!(
        h.state().count("DELETE /v1/servers/{id}"),
        6,
        "1 + 5 retries"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn create_timeout_reports_outcome_unknown_and_the_server_can_be_adopted() {
    let h = sim(SimConfig {
        hang: Duration::from_secs(3),
        faults: faults(vec![rule("POST /v1/servers", FaultKind::Timeout, 1)]),
        ..SimConfig::default()
    })
    .await;
    let mut cfg = h.hetzner_config();
    cfg.request_timeout = Duration::from_millis(300);
    let c = HetznerClient::new(cfg);
    let e = c.create_server(&req("job-limbo")).await.unwrap_err();
    assert!(
        matches!(
            e,
            HetznerError::Transport {
                timed_out: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.outcome_unknown());
    assert_eq!(e.class(), ErrorClass::Retryable);
    assert_eq!(h.state().count("POST /v1/servers"), 1, "not retried");
    let adopted = c
        .list_servers(&ServerQuery {
            label_selector: Some("job=job-limbo".into()),
            name: None,
        })
        .await
        .unwrap();
    assert_eq!(adopted.len(), 1, "the timed-out create did happen");
    h.shutdown().await;
}

#[tokio::test]
async fn locked_server_and_power_on_of_a_server_left_off() {
    let h = sim(SimConfig {
        faults: Faults {
            leave_off: true,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let c = client(&h);
    let created = c.create_server(&req("job-off")).await.unwrap();
    let ids = [created.action.id, created.next_actions[0].id];
    let actions = c.get_actions(&ids).await.unwrap();
    assert!(actions.iter().all(|a| a.status == ActionStatus::Success));
    let s = c.get_server(created.server.id).await.unwrap().unwrap();
    assert_eq!(
        s.status,
        ServerStatus::Off,
        "actions succeeded but the server is off"
    );

    h.set_faults(Faults::default());
    let a = c.power_on(s.id).await.unwrap();
    assert_eq!(a.command, "start_server");
    let s = c.get_server(s.id).await.unwrap().unwrap();
    assert_eq!(s.status, ServerStatus::Running);
    h.shutdown().await;

    // While an action runs, the server is locked: 423, retried by the client (power-on is
    // idempotent in effect), a bounded number of times.
    let h = sim(SimConfig {
        latency: LatencyProfile {
            create: Duration::from_secs(5),
            ..LatencyProfile::instant()
        },
        ..SimConfig::default()
    })
    .await;
    let c = client(&h);
    let id = c.create_server(&req("job-busy")).await.unwrap().server.id;
    let e = c.power_on(id).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(423), Some("locked")));
    assert_eq!(e.class(), ErrorClass::Retryable);
    assert_eq!(
        h.state().count("POST /v1/servers/{id}/actions/poweron"),
        6,
        "1 + 5 retries"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn failed_actions_are_reported_with_their_error() {
    let h = sim(SimConfig {
        faults: Faults {
            fail_actions: true,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let c = client(&h);
    let created = c.create_server(&req("job-fail")).await.unwrap();
    let a = c.get_actions(&[created.action.id]).await.unwrap();
    assert_eq!(a[0].status, ActionStatus::Error);
    assert_eq!(
        a[0].error.as_ref().map(|e| e.code.as_str()),
        Some("action_failed")
    );
    let s = c.get_server(created.server.id).await.unwrap().unwrap();
    assert_eq!(
        s.status,
        ServerStatus::Off,
        "the server exists: an orphan to delete"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_before_sending() {
    let h = sim(SimConfig::default()).await;
    let c = client(&h);
    let mut long_label = req("job-l");
    long_label.labels.insert(
        "session".into(),
        "cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY".into(),
    );
    let mut big = req("job-big");
    big.user_data = Some("#".repeat(32 * 1024 + 1));
    let mut reserved = req("job-res");
    reserved.labels.insert("hetzner.cloud/x".into(), "y".into());
    for r in [long_label, big, reserved] {
        let e = c.create_server(&r).await.unwrap_err();
        assert!(matches!(e, HetznerError::InvalidRequest(_)), "{e:?}");
        assert_eq!(e.class(), ErrorClass::Fatal);
    }
    assert_eq!(h.state().count("POST /v1/servers"), 0);
    let mut max = req("job-max");
    max.user_data = Some("#".repeat(32 * 1024));
    c.create_server(&max).await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn server_types_and_locations() {
    let h = sim(SimConfig::default()).await;
    let c = client(&h);
    let locations = c.list_locations().await.unwrap();
    let names: Vec<&str> = locations.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["fsn1", "nbg1", "hel1", "ash", "hil", "sin"]);
    assert_eq!(locations[3].network_zone.as_deref(), Some("us-east"));
    let types = c.list_server_types().await.unwrap();
    let t = |n: &str| types.iter().find(|t| t.name == n).unwrap();
    assert!(t("cx23").usable_in("fsn1"));
    assert!(!t("cx23").usable_in("ash"), "not offered there");
    assert!(!t("cx22").usable_in("fsn1"), "deprecated");
    assert!(t("cpx12").usable_in("ash"));
    assert!(
        !t("cpx12").usable_in("hil"),
        "deprecated in this location only"
    );
    h.shutdown().await;
}

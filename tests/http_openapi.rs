//! Keeps `/openapi.json` true: the documented operations are exactly the server's route table,
//! every route answers, every code a route returns to a battery of requests is documented for
//! it, and a documented path answers any other method with 405.

mod http_support;
mod support;

use http_support::*;
use reqwest::Method;
use std::collections::BTreeSet;

fn doc() -> serde_json::Value {
    serde_json::from_str(provisiond::http::OPENAPI).expect("openapi.json is JSON")
}

fn documented() -> BTreeSet<(String, String)> {
    let doc = doc();
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[test]
fn documented_operations_are_exactly_the_route_table() {
    assert!(doc()["openapi"].as_str().unwrap().starts_with("3."));
    let routes: BTreeSet<(String, String)> = provisiond::http::ROUTES
        .iter()
        .map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented(), routes);
}

#[tokio::test]
async fn every_answer_is_documented_for_its_route() {
    let s = Server::start().await;
    let job = s.enqueue(uuid::Uuid::new_v4(), uuid::Uuid::new_v4()).await;
    let doc = doc();
    let big = "x".repeat(70 * 1024);
    for (method, template) in documented() {
        let path = template.replace("{id}", &job);
        let codes: BTreeSet<String> = doc["paths"][&template][method.to_lowercase()]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let m: Method = method.parse().unwrap();
        let attempts = [
            s.http.request(m.clone(), s.url(&path)),
            s.admin(m.clone(), &path),
            s.admin(m.clone(), &path).body("{garbage"),
            s.admin(m.clone(), &path)
                .body(r#"{"job_id":"x","agent_id":"y"}"#),
            s.admin(m.clone(), &path).body(big.clone()),
        ];
        for attempt in attempts {
            let r = attempt.send().await.unwrap();
            let code = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert!(
                codes.contains(&code.to_string()),
                "{method} {template} answered {code}, documented: {codes:?}; body {text}"
            );
            if template != "/metrics" {
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|_| panic!("{method} {template} {code}: not JSON: {text}"));
            }
        }
        for other in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if documented().contains(&(other.to_owned(), template.clone())) {
                continue;
            }
            let r = s.admin(other.parse().unwrap(), &path).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 405, "{other} {template}");
        }
    }
    let served = s.http.get(s.url("/openapi.json")).send().await.unwrap();
    assert_eq!(served.text().await.unwrap(), provisiond::http::OPENAPI);
}

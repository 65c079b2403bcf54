//! Hetzner Cloud API client: servers, actions, server types and locations.
//!
//! Owns request building, the shared [`RateBudget`], lenient response models and the mapping of
//! API errors to an [`ErrorClass`] by `error.code` (never by HTTP status alone: 409 is both
//! `conflict` and `uniqueness_error`). Idempotent calls (reads, deletes, power-on, action
//! polls) are retried here through [`crate::clients::retry`] on every transient answer: 5xx, timeouts,
//! broken connections, `conflict`, `locked`, and 429s (the rate budget does that waiting).
//! `create_server` never is, because a retried create either collides on the name or makes a
//! duplicate: the caller looks the server up by label instead.

use super::config::HetznerConfig;
use super::error::{ErrorClass, HetznerError};
use super::models::{
    Action, CreateServerRequest, CreateServerResponse, Location, Server, ServerQuery, ServerType,
    null_default,
};
use crate::clients::rate_budget::RateBudget;
use crate::clients::retry::{RetryPolicy, retry};
use crate::secret::Secret;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

/// Hetzner's documented maximum page size.
const PER_PAGE: u32 = 50;
/// hcloud-go polls actions in chunks of 25 ids per request; so do we.
const ACTIONS_PER_REQUEST: usize = 25;

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    pagination: Option<Pagination>,
}

#[derive(Deserialize)]
struct Pagination {
    #[serde(default)]
    next_page: Option<u32>,
}

#[derive(Deserialize)]
struct ServerEnvelope {
    server: Server,
}
#[derive(Deserialize)]
struct ServersPage {
    #[serde(default, deserialize_with = "null_default")]
    servers: Vec<Server>,
    #[serde(default)]
    meta: Option<Meta>,
}
#[derive(Deserialize)]
struct ActionEnvelope {
    action: Action,
}
#[derive(Deserialize)]
struct OptActionEnvelope {
    #[serde(default)]
    action: Option<Action>,
}
#[derive(Deserialize)]
struct ActionsPage {
    #[serde(default, deserialize_with = "null_default")]
    actions: Vec<Action>,
    #[serde(default)]
    meta: Option<Meta>,
}
#[derive(Deserialize)]
struct ServerTypesPage {
    #[serde(default, deserialize_with = "null_default")]
    server_types: Vec<ServerType>,
    #[serde(default)]
    meta: Option<Meta>,
}
#[derive(Deserialize)]
struct LocationsPage {
    #[serde(default, deserialize_with = "null_default")]
    locations: Vec<Location>,
    #[serde(default)]
    meta: Option<Meta>,
}

fn next_page(meta: &Option<Meta>) -> Option<u32> {
    meta.as_ref()?.pagination.as_ref()?.next_page
}

/// Cheap to clone; clones share the HTTP connection pool and the rate budget.
#[derive(Debug, Clone)]
pub struct HetznerClient {
    http: reqwest::Client,
    base: Arc<str>,
    token: Secret,
    budget: Arc<RateBudget>,
    retry: RetryPolicy,
}

/// Whether a call may be repeated by the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Idempotent {
    Yes,
    No,
}

impl HetznerClient {
    pub fn new(cfg: HetznerConfig) -> HetznerClient {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .user_agent(concat!("provisiond/", env!("CARGO_PKG_VERSION")))
            .build()
            // Only fails if the TLS backend cannot initialise, which is a broken build.
            .unwrap_or_else(|e| panic!("cannot build HTTP client: {e}"));
        HetznerClient {
            http,
            base: Arc::from(cfg.base_url.as_str().trim_end_matches('/')),
            token: cfg.token,
            budget: Arc::new(RateBudget::new()),
            retry: RetryPolicy {
                base: cfg.retry_base,
                cap: Duration::from_secs(60),
                max_retries: cfg.max_retries,
            },
        }
    }

    /// Paces this client with `budget` instead of its own: shared by every client of the same
    /// project in this process and, when the budget has a shared store, by every daemon.
    pub fn with_budget(mut self, budget: Arc<RateBudget>) -> HetznerClient {
        self.budget = budget;
        self
    }

    /// The process-wide budget, for metrics (`remaining()`).
    pub fn budget(&self) -> &Arc<RateBudget> {
        &self.budget
    }

    /// How this client retries idempotent calls; callers that resolve a create by looking it up
    /// back off the same way.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Creates a server. Sent exactly once: on `ErrorClass::Adopt`, or a transport error with
    /// `outcome_unknown`, look the server up by label or name instead of creating again.
    pub async fn create_server(
        &self,
        req: &CreateServerRequest,
    ) -> Result<CreateServerResponse, HetznerError> {
        req.validate()?;
        let body =
            serde_json::to_vec(req).map_err(|e| HetznerError::InvalidRequest(e.to_string()))?;
        self.call(Method::POST, "/servers", &[], Some(body), Idempotent::No)
            .await
    }

    /// `None` if the server does not exist.
    pub async fn get_server(&self, id: i64) -> Result<Option<Server>, HetznerError> {
        let path = format!("/servers/{id}");
        match self
            .call::<ServerEnvelope>(Method::GET, &path, &[], None, Idempotent::Yes)
            .await
        {
            Ok(env) => Ok(Some(env.server)),
            Err(e) if e.class() == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All servers matching the query, following pagination.
    pub async fn list_servers(&self, q: &ServerQuery) -> Result<Vec<Server>, HetznerError> {
        let mut base: Vec<(&str, String)> = Vec::new();
        if let Some(sel) = &q.label_selector {
            base.push(("label_selector", sel.clone()));
        }
        if let Some(name) = &q.name {
            base.push(("name", name.clone()));
        }
        let mut out = Vec::new();
        self.paginate::<ServersPage>("/servers", base, |p| {
            out.extend(p.servers);
            p.meta
        })
        .await?;
        Ok(out)
    }

    /// Deletes a server. `Ok(None)` when it was already gone: a delete that finds nothing is done.
    pub async fn delete_server(&self, id: i64) -> Result<Option<Action>, HetznerError> {
        let path = format!("/servers/{id}");
        match self
            .call::<OptActionEnvelope>(Method::DELETE, &path, &[], None, Idempotent::Yes)
            .await
        {
            Ok(env) => Ok(env.action),
            Err(e) if e.class() == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Powers a server on. Retried by the client: powering on a running server is harmless.
    pub async fn power_on(&self, id: i64) -> Result<Action, HetznerError> {
        let path = format!("/servers/{id}/actions/poweron");
        let env: ActionEnvelope = self
            .call(Method::POST, &path, &[], None, Idempotent::Yes)
            .await?;
        Ok(env.action)
    }

    /// The given actions, in one `GET /actions?id=..` per 25 ids. Unknown ids are simply absent.
    pub async fn get_actions(&self, ids: &[i64]) -> Result<Vec<Action>, HetznerError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ACTIONS_PER_REQUEST) {
            let query: Vec<(&str, String)> =
                chunk.iter().map(|id| ("id", id.to_string())).collect();
            self.paginate::<ActionsPage>("/actions", query, |p| {
                out.extend(p.actions);
                p.meta
            })
            .await?;
        }
        Ok(out)
    }

    pub async fn list_server_types(&self) -> Result<Vec<ServerType>, HetznerError> {
        let mut out = Vec::new();
        self.paginate::<ServerTypesPage>("/server_types", Vec::new(), |p| {
            out.extend(p.server_types);
            p.meta
        })
        .await?;
        Ok(out)
    }

    pub async fn list_locations(&self) -> Result<Vec<Location>, HetznerError> {
        let mut out = Vec::new();
        self.paginate::<LocationsPage>("/locations", Vec::new(), |p| {
            out.extend(p.locations);
            p.meta
        })
        .await?;
        Ok(out)
    }

    async fn paginate<P: DeserializeOwned>(
        &self,
        path: &str,
        base_query: Vec<(&str, String)>,
        mut take: impl FnMut(P) -> Option<Meta>,
    ) -> Result<(), HetznerError> {
        let mut page = 1u32;
        // Bounded so that a server that always says "next" cannot keep us here forever.
        for _ in 0..10_000 {
            let mut query = base_query.clone();
            query.push(("page", page.to_string()));
            query.push(("per_page", PER_PAGE.to_string()));
            let p: P = self
                .call(Method::GET, path, &query, None, Idempotent::Yes)
                .await?;
            match next_page(&take(p)) {
                Some(n) if n > page => page = n,
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        idempotent: Idempotent,
    ) -> Result<T, HetznerError> {
        let once = || self.send_once(&method, path, query, body.as_ref(), idempotent);
        if idempotent == Idempotent::No {
            return once().await;
        }
        let what = format!(
            "hetzner {method} {}",
            crate::clients::call_metrics::endpoint_label(path)
        );
        retry(&self.retry, None, &what, once, HetznerError::retry_verdict).await
    }

    async fn send_once<T: DeserializeOwned>(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Vec<u8>>,
        idempotent: Idempotent,
    ) -> Result<T, HetznerError> {
        self.budget.acquire().await;
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(self.token.expose())
            .query(query);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.clone());
        }
        let endpoint = crate::clients::call_metrics::endpoint_label(path);
        let resp = req.send().await.map_err(|e| {
            crate::metrics::api_call(
                "hetzner",
                &endpoint,
                crate::clients::call_metrics::transport_code(&e),
            );
            transport_error(e, idempotent)
        })?;
        let status = resp.status();
        crate::metrics::api_call("hetzner", &endpoint, status.as_str());
        let headers = resp.headers().clone();
        self.budget
            .observe(
                header_u64(&headers, "ratelimit-limit"),
                header_u64(&headers, "ratelimit-remaining"),
            )
            .await;
        crate::metrics::rate_limit_remaining("hetzner", self.budget.remaining());
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.budget.rate_limited().await;
        }
        let correlation_id = headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transport_error(e, idempotent))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| HetznerError::Decode {
                message: e.to_string(),
                correlation_id,
            });
        }
        let (code, message) = match serde_json::from_slice::<ErrorEnvelope>(&bytes) {
            Ok(env) => (env.error.code, env.error.message),
            Err(_) => (
                String::new(),
                status.canonical_reason().unwrap_or("error").to_owned(),
            ),
        };
        let err = HetznerError::Api {
            status: status.as_u16(),
            code,
            message,
            correlation_id,
        };
        tracing::debug!(%method, path, error = %err, "hetzner call failed");
        Err(err)
    }
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn transport_error(e: reqwest::Error, idempotent: Idempotent) -> HetznerError {
    HetznerError::Transport {
        // Without the URL: it is ours and adds nothing, and the query could carry label values.
        timed_out: e.is_timeout(),
        // A refused connection never reached the API; anything later might have.
        outcome_unknown: idempotent == Idempotent::No && !e.is_connect(),
        message: e.without_url().to_string(),
    }
}

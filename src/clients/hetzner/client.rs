//! Hetzner Cloud API client: servers, actions, server types and locations.
//!
//! Owns request building, the shared [`RateBudget`], lenient response models and the mapping of
//! API errors to an [`ErrorClass`] by `error.code` (never by HTTP status alone: 409 is both
//! `conflict` and `uniqueness_error`). Idempotent calls (reads, deletes, power-on, action
//! polls) are retried here through [`super::retry`] on every transient answer: 5xx, timeouts,
//! broken connections, `conflict`, `locked`, and 429s (the rate budget does that waiting).
//! `create_server` never is, because a retried create either collides on the name or makes a
//! duplicate: the caller looks the server up by label instead.

use super::rate_budget::RateBudget;
use super::retry::{RetryPolicy, Verdict, retry};
use crate::secret::Secret;
use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Hetzner's documented maximum page size.
const PER_PAGE: u32 = 50;
/// hcloud-go polls actions in chunks of 25 ids per request; so do we.
const ACTIONS_PER_REQUEST: usize = 25;
/// `user_data` is stored by Hetzner and limited to 32 KiB.
const MAX_USER_DATA: usize = 32 * 1024;

#[derive(Debug, Clone, Deserialize)]
pub struct HetznerConfig {
    /// e.g. `https://api.hetzner.cloud/v1`, or the simulator's `http://127.0.0.1:PORT/v1`.
    #[serde(default = "default_base_url")]
    pub base_url: url::Url,
    pub token: Secret,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of idempotent calls after the first attempt (hcloud-go uses 5).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First backoff step; doubles per retry, capped at 60 s, full jitter.
    #[serde(default = "default_retry_base", with = "humantime_serde")]
    pub retry_base: Duration,
}

fn default_base_url() -> url::Url {
    // A constant that parses; covered by `default_config_parses`.
    url::Url::parse("https://api.hetzner.cloud/v1").unwrap_or_else(|_| unreachable!())
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_retries() -> u32 {
    5
}
fn default_retry_base() -> Duration {
    Duration::from_secs(1)
}

impl HetznerConfig {
    pub fn new(base_url: url::Url, token: Secret) -> Self {
        HetznerConfig {
            base_url,
            token,
            request_timeout: default_request_timeout(),
            max_retries: default_max_retries(),
            retry_base: default_retry_base(),
        }
    }
}

/// What the caller should do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient: try again later (the client already retried idempotent calls).
    Retryable,
    /// `uniqueness_error`: the server exists already; look it up and take it over.
    Adopt,
    /// `resource_unavailable` / `placement_error`: try another location or type.
    Relocate,
    /// The resource does not exist (for a delete: done).
    NotFound,
    /// Retrying cannot help (bad input, auth, quota, protection).
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum HetznerError {
    /// The API answered with an error (its envelope, or a bare status when there was none).
    #[error("hetzner api: {message} ({code}, HTTP {status}, correlation-id {})", correlation_id.as_deref().unwrap_or("-"))]
    Api {
        status: u16,
        /// `error.code`, or empty when the body had no envelope (e.g. a proxy's 502).
        code: String,
        message: String,
        correlation_id: Option<String>,
    },
    /// No usable response: connect error, timeout, broken connection.
    /// `outcome_unknown` is true when the request may have reached the API, which for a create
    /// means the server may exist: adopt by label before creating again.
    #[error("hetzner request failed: {message} (outcome unknown: {outcome_unknown})")]
    Transport {
        message: String,
        timed_out: bool,
        outcome_unknown: bool,
    },
    /// A 2xx whose body we could not read.
    #[error("hetzner response unreadable: {message} (correlation-id {})", correlation_id.as_deref().unwrap_or("-"))]
    Decode {
        message: String,
        correlation_id: Option<String>,
    },
    /// Refused before sending: the API would reject it, and create must not waste an attempt.
    #[error("invalid hetzner request: {0}")]
    InvalidRequest(String),
}

impl HetznerError {
    pub fn class(&self) -> ErrorClass {
        match self {
            HetznerError::Api { status, code, .. } => class_of(*status, code),
            HetznerError::Transport { .. } => ErrorClass::Retryable,
            // The API accepted the call; what happened is unclear, so look again later.
            HetznerError::Decode { .. } => ErrorClass::Retryable,
            HetznerError::InvalidRequest(_) => ErrorClass::Fatal,
        }
    }

    /// The API's `error.code`, if it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            HetznerError::Api { code, .. } if !code.is_empty() => Some(code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            HetznerError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            HetznerError::Api { correlation_id, .. }
            | HetznerError::Decode { correlation_id, .. } => correlation_id.as_deref(),
            _ => None,
        }
    }

    /// True when a create may have taken effect although we got no usable answer: no response
    /// (after the request may have left), or a 2xx we could not read. Adopt by label before
    /// creating again.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            HetznerError::Transport {
                outcome_unknown: true,
                ..
            } | HetznerError::Decode { .. }
        )
    }

    /// Whether the client itself may repeat an idempotent call. Wider than hcloud-go's policy
    /// (which leaves out 503 `unavailable`, 500 and `locked`): for a call that is safe to
    /// repeat, a passing fault of the service must cost a retry, not a job attempt.
    fn retry_verdict(&self) -> Verdict {
        match self {
            // The budget already waits for the next token; a backoff on top would only stall.
            HetznerError::Api { status: 429, .. } => Verdict::After(Duration::ZERO),
            HetznerError::Api { .. } | HetznerError::Transport { .. }
                if self.class() == ErrorClass::Retryable =>
            {
                Verdict::Backoff
            }
            _ => Verdict::Stop,
        }
    }
}

fn class_of(status: u16, code: &str) -> ErrorClass {
    match code {
        "conflict" | "rate_limit_exceeded" | "bad_gateway" | "timeout" => ErrorClass::Retryable,
        // Not retried inside the client (hcloud-go does not either), but for the step machine
        // these are passing states of the service or the resource, not a verdict on the job.
        "unavailable" | "maintenance" | "server_error" | "service_error" | "locked"
        | "resource_locked" | "robot_unavailable" => ErrorClass::Retryable,
        "uniqueness_error" => ErrorClass::Adopt,
        "resource_unavailable" | "placement_error" => ErrorClass::Relocate,
        "not_found" => ErrorClass::NotFound,
        "" => match status {
            404 => ErrorClass::NotFound,
            429 | 500..=599 => ErrorClass::Retryable,
            _ => ErrorClass::Fatal,
        },
        // invalid_input, json_error, unauthorized, forbidden, token_readonly, protected,
        // resource_limit_exceeded (a 403 that is a quota, not a rate limit), and codes we do
        // not know: a person has to look.
        _ => ErrorClass::Fatal,
    }
}

// ---------------------------------------------------------------------------------------------
// Models: only the fields we use; everything else is ignored, everything optional may be absent.

/// RFC 3339 in any of the forms the API emits (`Z`, `+00:00`, fractional seconds); null, absent
/// or unparsable becomes `None` rather than failing the whole response.
fn lenient_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    Ok(raw.and_then(|s| {
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .ok()
            .or_else(|| s.parse::<DateTime<Utc>>().ok())
    }))
}

/// `null` becomes the type's default, so a nullable map or list never fails a parse.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerStatus {
    Initializing,
    Starting,
    Running,
    Stopping,
    Off,
    Deleting,
    Migrating,
    Rebuilding,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Server {
    pub id: i64,
    #[serde(default)]
    pub name: String,
    #[serde(default = "unknown_status")]
    pub status: ServerStatus,
    #[serde(default, deserialize_with = "lenient_time")]
    pub created: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub public_net: Option<PublicNet>,
    #[serde(default)]
    pub location: Option<NamedRef>,
}

fn unknown_status() -> ServerStatus {
    ServerStatus::Unknown
}

impl Server {
    /// The public IPv4, present already in the 201 of a create (absent with `enable_ipv4: false`).
    pub fn ipv4(&self) -> Option<&str> {
        self.public_net
            .as_ref()?
            .ipv4
            .as_ref()
            .map(|v| v.ip.as_str())
    }

    pub fn location_name(&self) -> Option<&str> {
        self.location.as_ref().map(|l| l.name.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct PublicNet {
    #[serde(default)]
    pub ipv4: Option<Ipv4>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Ipv4 {
    pub ip: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NamedRef {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionStatus {
    Running,
    Success,
    Error,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Action {
    pub id: i64,
    #[serde(default)]
    pub command: String,
    pub status: ActionStatus,
    #[serde(default)]
    pub progress: i64,
    #[serde(default)]
    pub error: Option<ActionError>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub finished: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ActionError {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CreateServerResponse {
    pub server: Server,
    pub action: Action,
    #[serde(default, deserialize_with = "null_default")]
    pub next_actions: Vec<Action>,
    /// Only when no SSH keys were given. A secret: it must not reach a log.
    #[serde(default, deserialize_with = "secret_opt")]
    pub root_password: Option<Secret>,
}

fn secret_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(Secret::new))
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerType {
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub cores: Option<f64>,
    #[serde(default)]
    pub memory: Option<f64>,
    #[serde(default)]
    pub disk: Option<f64>,
    #[serde(default, deserialize_with = "null_default")]
    pub locations: Vec<ServerTypeLocation>,
}

impl ServerType {
    /// Offered for new servers in `location`: listed there, not deprecated there, and not
    /// marked unavailable (the flag is recent and may be absent).
    pub fn usable_in(&self, location: &str) -> bool {
        self.locations
            .iter()
            .any(|l| l.name == location && l.deprecation.is_none() && l.available.unwrap_or(true))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerTypeLocation {
    pub name: String,
    #[serde(default)]
    pub deprecation: Option<serde_json::Value>,
    #[serde(default)]
    pub available: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Location {
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub city: Option<String>,
    #[serde(default)]
    pub country: Option<String>,
    #[serde(default)]
    pub network_zone: Option<String>,
}

/// `Debug` is written by hand: `user_data` carries a Tailscale auth key and must never be printed.
#[derive(Clone, Serialize)]
pub struct CreateServerRequest {
    pub name: String,
    pub server_type: String,
    pub image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ssh_keys: Vec<String>,
    pub start_after_create: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_net: Option<PublicNetRequest>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PublicNetRequest {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ServerQuery {
    pub label_selector: Option<String>,
    pub name: Option<String>,
}

impl std::fmt::Debug for CreateServerRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateServerRequest")
            .field("name", &self.name)
            .field("server_type", &self.server_type)
            .field("image", &self.image)
            .field("location", &self.location)
            .field(
                "user_data",
                &self
                    .user_data
                    .as_ref()
                    .map(|u| format!("<{} bytes, redacted>", u.len())),
            )
            .field("labels", &self.labels)
            .field("ssh_keys", &self.ssh_keys)
            .field("start_after_create", &self.start_after_create)
            .field("public_net", &self.public_net)
            .finish()
    }
}

/// A label name or value body: 1-63 characters, alphanumeric at both ends, `-_.` between
/// (the spec's pattern `^[a-z0-9A-Z]([a-z0-9A-Z\._-]{0,61}[a-z0-9A-Z])?$`).
fn is_label_word(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    match b {
        [] => false,
        [one] => one.is_ascii_alphanumeric(),
        [first, mid @ .., last] => {
            b.len() <= 63
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && mid.iter().all(inner)
        }
    }
}

/// A DNS subdomain (the optional key prefix): at most 253 characters of dot-separated
/// lowercase labels.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// Checks a label key against Hetzner's rules: optional DNS-subdomain prefix and `/`, a name of
/// at most 63 characters, and not the reserved `hetzner.cloud/` prefix.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p == "hetzner.cloud" || p.ends_with(".hetzner.cloud") {
            return Err(format!(
                "label key {key:?} uses the reserved hetzner.cloud/ prefix"
            ));
        }
        if !is_dns_subdomain(p) {
            return Err(format!("label key {key:?} has an invalid prefix"));
        }
    }
    if !is_label_word(name) {
        return Err(format!(
            "label key {key:?}: name must be 1-63 characters, alphanumeric at both ends, -_. between"
        ));
    }
    Ok(())
}

/// Checks a label value: at most 63 characters, empty or alphanumeric at both ends, `-_.` between.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_word(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} ({} chars) must be at most 63 characters, empty or alphanumeric at both ends, -_. between",
            value.chars().count()
        ))
    }
}

impl CreateServerRequest {
    /// What the API would reject, checked before spending a create on it.
    pub fn validate(&self) -> Result<(), HetznerError> {
        let bad = |m: String| Err(HetznerError::InvalidRequest(m));
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return bad(format!(
                "server name {:?} is not a valid RFC 1123 hostname",
                self.name
            ));
        }
        for (k, v) in &self.labels {
            validate_label_key(k).map_err(HetznerError::InvalidRequest)?;
            validate_label_value(v).map_err(HetznerError::InvalidRequest)?;
        }
        if let Some(ud) = &self.user_data
            && ud.len() > MAX_USER_DATA
        {
            return bad(format!(
                "user_data is {} bytes; Hetzner accepts at most {MAX_USER_DATA}",
                ud.len()
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------

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
        let what = format!("hetzner {method} {}", super::endpoint_label(path));
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
        let endpoint = super::endpoint_label(path);
        let resp = req.send().await.map_err(|e| {
            crate::metrics::api_call("hetzner", &endpoint, super::transport_code(&e));
            transport_error(e, idempotent)
        })?;
        let status = resp.status();
        crate::metrics::api_call("hetzner", &endpoint, status.as_str());
        let headers = resp.headers().clone();
        self.budget.observe(
            header_u64(&headers, "ratelimit-limit"),
            header_u64(&headers, "ratelimit-remaining"),
        );
        crate::metrics::rate_limit_remaining("hetzner", self.budget.remaining());
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.budget.rate_limited();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_user_data() {
        let req = CreateServerRequest {
            name: "pv-1".into(),
            server_type: "cpx22".into(),
            image: "ubuntu-24.04".into(),
            location: None,
            user_data: Some("tailscale up --auth-key=tskey-auth-SECRET".into()),
            labels: BTreeMap::new(),
            ssh_keys: vec![],
            start_after_create: true,
            public_net: None,
        };
        let printed = format!("{req:?}");
        assert!(!printed.contains("tskey"), "{printed}");
        assert!(printed.contains("bytes, redacted"));
    }

    #[test]
    fn default_config_parses() {
        assert_eq!(default_base_url().as_str(), "https://api.hetzner.cloud/v1");
    }

    #[test]
    fn error_class_follows_the_code_not_the_status() {
        let cases = [
            (409, "conflict", ErrorClass::Retryable),
            (409, "uniqueness_error", ErrorClass::Adopt),
            (412, "resource_unavailable", ErrorClass::Relocate),
            (412, "placement_error", ErrorClass::Relocate),
            (403, "resource_limit_exceeded", ErrorClass::Fatal),
            (403, "forbidden", ErrorClass::Fatal),
            (423, "locked", ErrorClass::Retryable),
            (423, "protected", ErrorClass::Fatal),
            (429, "rate_limit_exceeded", ErrorClass::Retryable),
            (404, "not_found", ErrorClass::NotFound),
            (502, "", ErrorClass::Retryable),
            (400, "invalid_input", ErrorClass::Fatal),
            (401, "unauthorized", ErrorClass::Fatal),
        ];
        for (status, code, want) in cases {
            assert_eq!(class_of(status, code), want, "{status} {code}");
        }
    }

    #[test]
    fn client_retries_every_transient_answer_but_no_verdict() {
        let api = |status: u16, code: &str| HetznerError::Api {
            status,
            code: code.into(),
            message: String::new(),
            correlation_id: None,
        };
        for e in [
            api(409, "conflict"),
            api(500, "server_error"),
            api(500, ""),
            api(502, ""),
            api(503, "unavailable"),
            api(504, "timeout"),
            api(423, "locked"),
        ] {
            assert_eq!(e.retry_verdict(), Verdict::Backoff, "{e}");
        }
        assert_eq!(
            api(429, "rate_limit_exceeded").retry_verdict(),
            Verdict::After(Duration::ZERO),
            "the rate budget does the waiting"
        );
        for e in [
            api(409, ""),
            api(409, "uniqueness_error"),
            api(401, "unauthorized"),
            api(423, "protected"),
            api(404, "not_found"),
            api(412, "resource_unavailable"),
        ] {
            assert_eq!(e.retry_verdict(), Verdict::Stop, "{e}");
        }
    }

    #[test]
    fn label_rules_match_the_docs() {
        assert!(validate_label_value("").is_ok());
        assert!(validate_label_value("job-7f3c2a").is_ok());
        assert!(validate_label_value(&"a".repeat(63)).is_ok());
        assert!(validate_label_value(&"a".repeat(64)).is_err());
        assert!(
            validate_label_value(
                "cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY"
            )
            .is_err()
        );
        assert!(validate_label_value("a:b").is_err());
        assert!(validate_label_value("-a").is_err());
        assert!(validate_label_key("example.com/my").is_ok());
        assert!(validate_label_key("managed-by").is_ok());
        assert!(validate_label_key("hetzner.cloud/x").is_err());
        assert!(validate_label_key("").is_err());
    }

    #[test]
    fn server_parses_without_datacenter_and_with_any_rfc3339() {
        for created in [
            "2016-01-30T23:50:00Z",
            "2016-01-30T23:50:00+00:00",
            "2016-01-30T23:50:00.123456+01:00",
        ] {
            let s: Server = serde_json::from_value(serde_json::json!({
                "id": 1, "name": "a", "status": "running", "created": created,
                "labels": null, "public_net": {"ipv4": null}, "brand_new_field": 1
            }))
            .unwrap();
            assert!(s.created.is_some(), "{created}");
            assert_eq!(s.ipv4(), None);
        }
        let s: Server =
            serde_json::from_value(serde_json::json!({"id": 2, "status": "teleporting"})).unwrap();
        assert_eq!(s.status, ServerStatus::Unknown);
    }
}

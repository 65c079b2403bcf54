//! Tailscale API v2 client: OAuth client credentials, auth keys, devices.
//!
//! Owns the token cache (one refresh shared by all concurrent callers, ~60 s before expiry, on
//! tokio's clock), the request shapes and lenient key and device models. Idempotent calls
//! (token requests, reads, deletes, key revokes) are retried through [`super::retry`] on 429
//! (after `Retry-After`), 5xx and broken connections; creating a key is never retried, because
//! a retried write cannot be taken back: the caller finds keys of an unknown mint by their
//! description ([`TailscaleClient::keys_described`]) and revokes them. Secrets (client secret,
//! access token, auth keys) never reach a log or an error.

use super::retry::{RetryPolicy, Verdict, retry};
use crate::secret::Secret;
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Refresh this long before the token expires, so a request never carries a dying token.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// The longest `Retry-After` we wait for inside the client; longer waits are the caller's call.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
const MAX_DESCRIPTION: usize = 50;

#[derive(Debug, Clone, Deserialize)]
pub struct TailscaleConfig {
    /// e.g. `https://api.tailscale.com`; the client appends `/api/v2/...`.
    #[serde(default = "default_base_url")]
    pub base_url: url::Url,
    /// `-` means the OAuth client's own tailnet.
    #[serde(default = "default_tailnet")]
    pub tailnet: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// The OAuth client's tag set; keys must carry exactly these tags. Used for keys whose
    /// `CreateKey::tags` is empty.
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of idempotent calls after the first attempt.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First backoff step; doubles per retry, capped at 60 s, full jitter.
    #[serde(default = "default_retry_base", with = "humantime_serde")]
    pub retry_base: Duration,
}

fn default_max_retries() -> u32 {
    5
}
fn default_retry_base() -> Duration {
    Duration::from_secs(1)
}

fn default_base_url() -> url::Url {
    // A constant that parses; covered by `default_base_url_parses`.
    url::Url::parse("https://api.tailscale.com").unwrap_or_else(|_| unreachable!())
}
fn default_tailnet() -> String {
    "-".to_owned()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

impl TailscaleConfig {
    pub fn new(
        base_url: url::Url,
        client_id: String,
        client_secret: Secret,
        tags: Vec<String>,
    ) -> Self {
        TailscaleConfig {
            base_url,
            tailnet: default_tailnet(),
            client_id,
            client_secret,
            tags,
            request_timeout: default_request_timeout(),
            max_retries: default_max_retries(),
            retry_base: default_retry_base(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TailscaleError {
    /// The API answered `{"message": ...}` with an error status.
    #[error("tailscale api: {message} (HTTP {status})")]
    Api {
        status: u16,
        message: String,
        /// `Retry-After` of a 429, when it carried one.
        retry_after: Option<Duration>,
    },
    /// The token endpoint refused the OAuth client (400/401/403).
    #[error(
        "tailscale OAuth client rejected: {message} (HTTP {status}); check tailscale.client_id and tailscale.client_secret_file"
    )]
    Credentials { status: u16, message: String },
    /// No usable response. For a key create, `outcome_unknown` means a key may exist: find it
    /// by its description and revoke it before minting another.
    #[error("tailscale request failed: {message} (outcome unknown: {outcome_unknown})")]
    Transport {
        message: String,
        timed_out: bool,
        outcome_unknown: bool,
    },
    #[error("tailscale response unreadable: {0}")]
    Decode(String),
    #[error("invalid tailscale request: {0}")]
    InvalidRequest(String),
}

impl TailscaleError {
    pub fn status(&self) -> Option<u16> {
        match self {
            TailscaleError::Api { status, .. } | TailscaleError::Credentials { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Worth trying again later: throttling, server trouble, no answer.
    pub fn is_retryable(&self) -> bool {
        match self {
            TailscaleError::Api { status, .. } => *status == 429 || *status >= 500,
            TailscaleError::Transport { .. } => true,
            TailscaleError::Decode(_)
            | TailscaleError::InvalidRequest(_)
            | TailscaleError::Credentials { .. } => false,
        }
    }

    /// The OAuth client itself was refused (wrong id or secret, revoked client): retrying
    /// cannot help, a person has to fix the configuration.
    pub fn is_bad_credential(&self) -> bool {
        matches!(self, TailscaleError::Credentials { .. })
    }

    fn retry_verdict(&self) -> Verdict {
        match self {
            TailscaleError::Api {
                status: 429,
                retry_after,
                ..
            } => Verdict::After(retry_after.unwrap_or(Duration::from_secs(1))),
            e if e.is_retryable() => Verdict::Backoff,
            _ => Verdict::Stop,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CreateKey {
    pub description: String,
    pub expiry: Duration,
    pub tags: Vec<String>,
    pub reusable: bool,
    pub ephemeral: bool,
    pub preauthorized: bool,
}

impl CreateKey {
    /// The key this daemon wants: single-use, ephemeral, pre-authorized.
    pub fn single_use(description: impl Into<String>, expiry: Duration, tags: Vec<String>) -> Self {
        CreateKey {
            description: description.into(),
            expiry,
            tags,
            reusable: false,
            ephemeral: true,
            preauthorized: true,
        }
    }
}

/// Tailscale allows up to 50 alphanumerics, hyphens and spaces (no underscores, no colons).
pub fn validate_description(d: &str) -> Result<(), String> {
    if d.chars().count() > MAX_DESCRIPTION {
        return Err(format!(
            "key description is longer than {MAX_DESCRIPTION} characters"
        ));
    }
    if let Some(c) = d
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == ' '))
    {
        return Err(format!(
            "key description may hold only alphanumerics, hyphens and spaces, not {c:?}"
        ));
    }
    Ok(())
}

/// A freshly minted auth key. `key` is shown only once by the API; store the `id`, never the key.
#[derive(Debug, Clone)]
pub struct AuthKey {
    pub id: String,
    pub key: Secret,
    pub expires: Option<DateTime<Utc>>,
}

/// What the API says about an existing key (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub description: String,
    pub created: Option<DateTime<Utc>>,
    /// Revoked, expired or used up: it can no longer add a device.
    pub invalid: bool,
}

#[derive(Deserialize)]
struct KeyListEntry {
    id: String,
    /// The list endpoint documents only ids ("may return more in the future"); whatever more
    /// it sends is used, what it leaves out is read from the key itself.
    #[serde(default)]
    description: Option<String>,
    #[serde(default, deserialize_with = "lenient_time")]
    created: Option<DateTime<Utc>>,
    #[serde(default)]
    invalid: Option<bool>,
}

#[derive(Deserialize)]
struct KeyList {
    #[serde(default)]
    keys: Vec<KeyListEntry>,
}

#[derive(Deserialize)]
struct KeyDetails {
    id: String,
    #[serde(default)]
    description: String,
    #[serde(default, deserialize_with = "lenient_time")]
    created: Option<DateTime<Utc>>,
    #[serde(default)]
    invalid: bool,
}

#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub hostname: Option<String>,
    pub tags: Vec<String>,
}

/// `""`, null, absent or unparsable times become `None` (external devices have `created: ""`).
fn lenient_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    Ok(raw.and_then(|s| {
        DateTime::parse_from_rfc3339(&s)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }))
}

fn null_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// Legacy numeric-string id.
    #[serde(default)]
    pub id: String,
    /// Preferred id.
    #[serde(default)]
    pub node_id: String,
    #[serde(default)]
    pub hostname: String,
    /// MagicDNS name; gets a numeric suffix on hostname collisions.
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "null_vec")]
    pub addresses: Vec<String>,
    #[serde(default, deserialize_with = "null_vec")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub authorized: bool,
    #[serde(default, deserialize_with = "lenient_time")]
    pub created: Option<DateTime<Utc>>,
    #[serde(default)]
    pub is_ephemeral: bool,
}

impl Device {
    /// The tailnet IPv4 (100.64.0.0/10), wherever it sits in `addresses`.
    pub fn ipv4_100(&self) -> Option<std::net::Ipv4Addr> {
        self.addresses
            .iter()
            .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
            .find(|ip| ip.octets()[0] == 100 && (ip.octets()[1] & 0xC0) == 64)
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default = "default_expires_in")]
    expires_in: u64,
}
fn default_expires_in() -> u64 {
    3600
}

#[derive(Deserialize)]
struct ApiMessage {
    #[serde(default)]
    message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyRequest<'a> {
    capabilities: Capabilities<'a>,
    expiry_seconds: u64,
    description: &'a str,
}
#[derive(Serialize)]
struct Capabilities<'a> {
    devices: DeviceCaps<'a>,
}
#[derive(Serialize)]
struct DeviceCaps<'a> {
    create: KeyCaps<'a>,
}
#[derive(Serialize)]
struct KeyCaps<'a> {
    reusable: bool,
    ephemeral: bool,
    preauthorized: bool,
    tags: &'a [String],
}

#[derive(Deserialize)]
struct KeyResponse {
    id: String,
    key: String,
    #[serde(default, deserialize_with = "lenient_time")]
    expires: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct DevicesResponse {
    #[serde(default)]
    devices: Vec<Device>,
}

#[derive(Debug)]
struct CachedToken {
    token: Secret,
    refresh_at: Instant,
}

/// Cheap to clone; clones share the connection pool and the token cache.
#[derive(Debug, Clone)]
pub struct TailscaleClient {
    http: reqwest::Client,
    base: Arc<str>,
    tailnet: Arc<str>,
    client_id: Arc<str>,
    client_secret: Secret,
    tags: Arc<[String]>,
    /// An async mutex held across the refresh, so concurrent callers wait for one refresh
    /// instead of each minting a token.
    token: Arc<Mutex<Option<CachedToken>>>,
    retry: RetryPolicy,
}

impl TailscaleClient {
    pub fn new(cfg: TailscaleConfig) -> TailscaleClient {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .user_agent(concat!("provisiond/", env!("CARGO_PKG_VERSION")))
            .build()
            // Only fails if the TLS backend cannot initialise, which is a broken build.
            .unwrap_or_else(|e| panic!("cannot build HTTP client: {e}"));
        TailscaleClient {
            http,
            base: Arc::from(cfg.base_url.as_str().trim_end_matches('/')),
            tailnet: Arc::from(cfg.tailnet.as_str()),
            client_id: Arc::from(cfg.client_id.as_str()),
            client_secret: cfg.client_secret,
            tags: Arc::from(cfg.tags),
            token: Arc::new(Mutex::new(None)),
            retry: RetryPolicy {
                base: cfg.retry_base,
                cap: Duration::from_secs(60),
                max_retries: cfg.max_retries,
            },
        }
    }

    /// A valid access token, minted or refreshed if it is missing or within a minute of expiry.
    /// The token request is repeated on transient errors (it mints nothing that matters), so
    /// that a passing fault of the token endpoint does not fail the call that needed it.
    async fn access_token(&self) -> Result<Secret, TailscaleError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.token.clone());
        }
        let (token, lifetime) = retry(
            &self.retry,
            None,
            "tailscale token request",
            || self.request_token(),
            TailscaleError::retry_verdict,
        )
        .await?;
        *cached = Some(CachedToken {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN),
        });
        Ok(token)
    }

    async fn request_token(&self) -> Result<(Secret, Duration), TailscaleError> {
        let endpoint = "/oauth/token";
        let resp = self
            .http
            .post(format!("{}/api/v2/oauth/token", self.base))
            .form(&[
                ("client_id", &*self.client_id),
                ("client_secret", self.client_secret.expose()),
                ("grant_type", "client_credentials"),
            ])
            .send()
            .await
            .map_err(|e| {
                crate::metrics::api_call(
                    "tailscale",
                    endpoint,
                    super::call_metrics::transport_code(&e),
                );
                transport_error(e, false)
            })?;
        let status = resp.status();
        crate::metrics::api_call("tailscale", endpoint, status.as_str());
        let retry_after = retry_after(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| transport_error(e, false))?;
        if !status.is_success() {
            return Err(match api_error(status, &bytes, retry_after) {
                TailscaleError::Api {
                    status: s @ (400 | 401 | 403),
                    message,
                    ..
                } => TailscaleError::Credentials { status: s, message },
                other => other,
            });
        }
        let tr: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|e| TailscaleError::Decode(e.to_string()))?;
        Ok((
            Secret::new(tr.access_token),
            Duration::from_secs(tr.expires_in),
        ))
    }

    /// Checks the OAuth client by requesting a fresh token (startup and `check-config`).
    /// Transient errors are retried with `policy`; a refused credential is
    /// [`TailscaleError::Credentials`] at once.
    pub async fn check_credentials(&self, policy: &RetryPolicy) -> Result<(), TailscaleError> {
        let (token, lifetime) = retry(
            policy,
            None,
            "tailscale OAuth check",
            || self.request_token(),
            TailscaleError::retry_verdict,
        )
        .await?;
        *self.token.lock().await = Some(CachedToken {
            token,
            refresh_at: Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN),
        });
        Ok(())
    }

    /// How this client retries idempotent calls; callers that resolve a mint by looking keys
    /// up back off the same way.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// The OAuth client's tag set from the configuration.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// Mints an auth key, with the configured tags if `req.tags` is empty. Sent once; never
    /// retried by the client.
    pub async fn create_auth_key(&self, req: &CreateKey) -> Result<AuthKey, TailscaleError> {
        validate_description(&req.description).map_err(TailscaleError::InvalidRequest)?;
        let tags: &[String] = if req.tags.is_empty() {
            &self.tags
        } else {
            &req.tags
        };
        if tags.is_empty() {
            return Err(TailscaleError::InvalidRequest(
                "keys minted with OAuth must carry tags".into(),
            ));
        }
        let body = KeyRequest {
            capabilities: Capabilities {
                devices: DeviceCaps {
                    create: KeyCaps {
                        reusable: req.reusable,
                        ephemeral: req.ephemeral,
                        preauthorized: req.preauthorized,
                        tags,
                    },
                },
            },
            expiry_seconds: req.expiry.as_secs().max(1),
            description: &req.description,
        };
        let body =
            serde_json::to_vec(&body).map_err(|e| TailscaleError::InvalidRequest(e.to_string()))?;
        let path = format!("/tailnet/{}/keys", self.tailnet);
        let bytes = self.call(Method::POST, &path, &[], Some(body)).await?;
        let k: KeyResponse =
            serde_json::from_slice(&bytes).map_err(|e| TailscaleError::Decode(e.to_string()))?;
        Ok(AuthKey {
            id: k.id,
            key: Secret::new(k.key),
            expires: k.expires,
        })
    }

    /// Revokes a key. A key that is not there (404) is as good as revoked.
    pub async fn revoke_key(&self, id: &str) -> Result<(), TailscaleError> {
        let path = format!("/tailnet/{}/keys/{}", self.tailnet, path_segment(id));
        match self.call(Method::DELETE, &path, &[], None).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A key's metadata; `None` if the API does not know it.
    pub async fn get_key(&self, id: &str) -> Result<Option<KeyInfo>, TailscaleError> {
        let path = format!("/tailnet/{}/keys/{}", self.tailnet, path_segment(id));
        let bytes = match self.call(Method::GET, &path, &[], None).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let k: KeyDetails =
            serde_json::from_slice(&bytes).map_err(|e| TailscaleError::Decode(e.to_string()))?;
        Ok(Some(KeyInfo {
            id: k.id,
            description: k.description,
            created: k.created,
            invalid: k.invalid,
        }))
    }

    /// The tailnet's active keys with their metadata. The list endpoint is documented to
    /// return ids only, so each key it does not describe is read on its own (no pagination
    /// exists; a key gone in between is skipped).
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, TailscaleError> {
        let path = format!("/tailnet/{}/keys", self.tailnet);
        let bytes = self.call(Method::GET, &path, &[], None).await?;
        let list: KeyList =
            serde_json::from_slice(&bytes).map_err(|e| TailscaleError::Decode(e.to_string()))?;
        let mut out = Vec::with_capacity(list.keys.len());
        for k in list.keys {
            match k.description {
                Some(description) => out.push(KeyInfo {
                    id: k.id,
                    description,
                    created: k.created,
                    invalid: k.invalid.unwrap_or(false),
                }),
                None => out.extend(self.get_key(&k.id).await?),
            }
        }
        Ok(out)
    }

    /// The valid keys whose description is exactly `description`: the way to find what a mint
    /// with an unknown outcome (or a crashed process) left behind.
    pub async fn keys_described(&self, description: &str) -> Result<Vec<KeyInfo>, TailscaleError> {
        let mut keys = self.list_keys().await?;
        keys.retain(|k| k.description == description && !k.invalid);
        Ok(keys)
    }

    /// Devices matching the filter (exact match, server-side; all results, no pagination).
    pub async fn list_devices(&self, f: &DeviceFilter) -> Result<Vec<Device>, TailscaleError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(h) = &f.hostname {
            query.push(("hostname", h.clone()));
        }
        for t in &f.tags {
            query.push(("tags", t.clone()));
        }
        let path = format!("/tailnet/{}/devices", self.tailnet);
        let bytes = self.call(Method::GET, &path, &query, None).await?;
        let d: DevicesResponse =
            serde_json::from_slice(&bytes).map_err(|e| TailscaleError::Decode(e.to_string()))?;
        Ok(d.devices)
    }

    /// Removes a device by `nodeId` (or legacy id). 404 means it is already gone: done.
    pub async fn delete_device(&self, node_id: &str) -> Result<(), TailscaleError> {
        let path = format!("/device/{}", path_segment(node_id));
        match self.call(Method::DELETE, &path, &[], None).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One API call; idempotent ones (everything but a POST, which mints) are retried on
    /// transient errors.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, TailscaleError> {
        let once = || self.send_once(&method, path, query, body.as_ref());
        if method == Method::POST {
            return once().await;
        }
        let what = format!(
            "tailscale {method} {}",
            super::call_metrics::endpoint_label(path)
        );
        retry(
            &self.retry,
            None,
            &what,
            once,
            TailscaleError::retry_verdict,
        )
        .await
    }

    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Vec<u8>>,
    ) -> Result<bytes::Bytes, TailscaleError> {
        let write = *method == Method::POST;
        let mut retried_401 = false;
        loop {
            let token = self.access_token().await?;
            let mut req = self
                .http
                .request(method.clone(), format!("{}/api/v2{path}", self.base))
                .bearer_auth(token.expose())
                .query(query);
            if let Some(b) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let endpoint = super::call_metrics::endpoint_label(path);
            let resp = req.send().await.map_err(|e| {
                crate::metrics::api_call(
                    "tailscale",
                    &endpoint,
                    super::call_metrics::transport_code(&e),
                );
                transport_error(e, write)
            })?;
            let status = resp.status();
            crate::metrics::api_call("tailscale", &endpoint, status.as_str());
            let retry_after = retry_after(resp.headers());
            let bytes = resp.bytes().await.map_err(|e| transport_error(e, write))?;
            if status.is_success() {
                return Ok(bytes);
            }
            // A token revoked or expired early: drop it and mint a new one, once. Safe for
            // writes too, because a 401 means the API did nothing.
            if status == StatusCode::UNAUTHORIZED && !retried_401 {
                retried_401 = true;
                *self.token.lock().await = None;
                continue;
            }
            let err = api_error(status, &bytes, retry_after);
            tracing::debug!(%method, path, error = %err, "tailscale call failed");
            return Err(err);
        }
    }
}

/// `Retry-After` in seconds, capped: longer waits are the caller's call.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    h.get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// Ids come from the API, but a path segment must never be able to change the route.
fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn api_error(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> TailscaleError {
    let message = serde_json::from_slice::<ApiMessage>(body)
        .map(|m| m.message)
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    TailscaleError::Api {
        status: status.as_u16(),
        message,
        retry_after,
    }
}

fn transport_error(e: reqwest::Error, write: bool) -> TailscaleError {
    TailscaleError::Transport {
        timed_out: e.is_timeout(),
        outcome_unknown: write && !e.is_connect(),
        message: e.without_url().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_base_url_parses() {
        assert_eq!(default_base_url().as_str(), "https://api.tailscale.com/");
    }

    #[test]
    fn description_rules() {
        assert!(validate_description("job 7f3c2a").is_ok());
        assert!(validate_description("job-7f3c2a").is_ok());
        assert!(validate_description("cs_test_abc").is_err());
        assert!(validate_description("job:1").is_err());
        assert!(validate_description(&"a".repeat(51)).is_err());
    }

    #[test]
    fn device_parses_empty_created_and_picks_the_100_address() {
        let d: Device = serde_json::from_value(serde_json::json!({
            "id": "1", "nodeId": "n1CNTRL", "hostname": "h", "created": "",
            "addresses": ["fd7a:115c:a1e0::1", "100.87.74.78"], "tags": null
        }))
        .unwrap();
        assert_eq!(d.created, None);
        assert_eq!(d.ipv4_100(), Some("100.87.74.78".parse().unwrap()));
        assert!(d.tags.is_empty());
    }
}

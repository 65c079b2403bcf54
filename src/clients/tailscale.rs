//! Tailscale API v2 client: OAuth client credentials, auth keys, devices.
//!
//! Owns the token cache (one refresh shared by all concurrent callers, ~60 s before expiry),
//! the request shapes and lenient device models. Reads and deletes honour `Retry-After` on a
//! 429 (once, capped); creating a key is never retried, because a retried write cannot be taken
//! back. Secrets (client secret, access token, auth keys) never reach a log or an error.

use crate::secret::Secret;
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TailscaleError {
    /// The API answered `{"message": ...}` with an error status.
    #[error("tailscale api: {message} (HTTP {status})")]
    Api { status: u16, message: String },
    /// No usable response. For a key create, `outcome_unknown` means a key may exist: it is
    /// single-use and short-lived, so mint another and let the orphan expire (or revoke it).
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
            TailscaleError::Api { status, .. } => Some(*status),
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
            TailscaleError::Decode(_) | TailscaleError::InvalidRequest(_) => false,
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
        }
    }

    /// A valid access token, minted or refreshed if it is missing or within a minute of expiry.
    async fn access_token(&self) -> Result<Secret, TailscaleError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.token.clone());
        }
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
            .map_err(|e| transport_error(e, false))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| transport_error(e, false))?;
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        let tr: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|e| TailscaleError::Decode(e.to_string()))?;
        let lifetime = Duration::from_secs(tr.expires_in);
        let token = Secret::new(tr.access_token);
        *cached = Some(CachedToken {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN),
        });
        Ok(token)
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

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<bytes::Bytes, TailscaleError> {
        // Reads and deletes repeat harmlessly; a POST here mints something.
        let idempotent = method != Method::POST;
        let mut retried_429 = false;
        let mut retried_401 = false;
        loop {
            let token = self.access_token().await?;
            let mut req = self
                .http
                .request(method.clone(), format!("{}/api/v2{path}", self.base))
                .bearer_auth(token.expose())
                .query(query);
            if let Some(b) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.clone());
            }
            let endpoint = super::endpoint_label(path);
            let resp = req.send().await.map_err(|e| {
                crate::metrics::api_call("tailscale", &endpoint, super::transport_code(&e));
                transport_error(e, !idempotent)
            })?;
            let status = resp.status();
            crate::metrics::api_call("tailscale", &endpoint, status.as_str());
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| transport_error(e, !idempotent))?;
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
            if status == StatusCode::TOO_MANY_REQUESTS && idempotent && !retried_429 {
                retried_429 = true;
                let wait = retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(MAX_RETRY_AFTER);
                tracing::debug!(%method, path, "tailscale 429, retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(api_error(status, &bytes));
        }
    }
}

/// Ids come from the API, but a path segment must never be able to change the route.
fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn api_error(status: StatusCode, body: &[u8]) -> TailscaleError {
    let message = serde_json::from_slice::<ApiMessage>(body)
        .map(|m| m.message)
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    TailscaleError::Api {
        status: status.as_u16(),
        message,
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

//! Hetzner wire models: only the fields we use; everything else is ignored, everything optional
//! may be absent, and times parse in any RFC 3339 form the API emits.
//! Must not: print `user_data` or a root password (both carry secrets).

use crate::secret::Secret;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

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
pub(super) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
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

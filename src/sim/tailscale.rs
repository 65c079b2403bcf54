//! The simulated Tailscale API (`/api/v2`): OAuth tokens, auth keys, devices.
//!
//! Owns the OAuth client-credentials exchange (form body or HTTP Basic), key minting with
//! Tailscale's rules (tags must match the OAuth client's full tag set; description of at most
//! 50 alphanumerics, hyphens and spaces), key listing (ids of the active keys, as documented)
//! and key details, device listing with exact-match filters, and device deletion. Errors are `{"message": ...}`. Devices only appear through enrollment in
//! `world.rs`. Must not panic on input.

use super::world::{SimDevice, SimKey};
use super::{Reply, Req, Sim, rfc3339};
use base64::Engine;
use chrono::{Duration as ChronoDuration, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// Tailscale's default, and longest, key lifetime.
const DEFAULT_KEY_EXPIRY_SECS: i64 = 90 * 24 * 3600;

fn message(status: u16, msg: &str) -> Reply {
    Reply::json(status, &json!({ "message": msg }))
}

fn random_alnum(n: usize) -> String {
    use rand::RngExt;
    const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

pub(crate) fn handle(sim: &Sim, route: &'static str, req: &Req) -> Reply {
    if route == "POST /api/v2/oauth/token" {
        return token(sim, req);
    }
    if route == "unknown /api/v2" {
        return message(404, "not found");
    }
    let now = Utc::now();
    let mut w = sim.world();
    w.advance(now);
    let authorized = req
        .bearer()
        .and_then(|t| w.ts_tokens.get(t))
        .is_some_and(|exp| *exp > now);
    if !authorized {
        return message(401, "API token invalid");
    }
    let segs: Vec<&str> = req.path.trim_end_matches('/').split('/').collect();
    // ["", "api", "v2", "tailnet", T, "keys"|"devices", ID?] or ["", "api", "v2", "device", ID]
    if segs.get(3) == Some(&"tailnet") {
        let tailnet = segs.get(4).copied().unwrap_or_default();
        if tailnet != "-" && tailnet != sim.cfg.tailnet {
            return message(404, "tailnet not found");
        }
    }
    let last = segs.last().copied().unwrap_or_default();
    match route {
        "POST /api/v2/tailnet/{tailnet}/keys" => create_key(sim, &mut w.keys, req, now),
        // As documented: the ids of the active keys only; details come from the key itself.
        "GET /api/v2/tailnet/{tailnet}/keys" => {
            let ids: Vec<Value> = w
                .keys
                .values()
                .filter(|k| !k.invalid(now))
                .map(|k| json!({ "id": k.id }))
                .collect();
            Reply::json(200, &json!({ "keys": ids }))
        }
        "GET /api/v2/tailnet/{tailnet}/keys/{id}" => match w.keys.get(last) {
            Some(k) => Reply::json(200, &key_json(k, now, false)),
            None => message(404, "key not found"),
        },
        "DELETE /api/v2/tailnet/{tailnet}/keys/{id}" => match w.keys.get_mut(last) {
            Some(k) => {
                k.revoked.get_or_insert(now);
                Reply::empty(200)
            }
            None => message(404, "key not found"),
        },
        "GET /api/v2/tailnet/{tailnet}/devices" => {
            let devices: Vec<Value> = w
                .devices
                .iter()
                .filter(|d| device_matches(d, req))
                .map(device_json)
                .collect();
            Reply::json(200, &json!({ "devices": devices }))
        }
        "DELETE /api/v2/device/{id}" => {
            let before = w.devices.len();
            w.devices.retain(|d| d.node_id != last && d.id != last);
            if w.devices.len() < before {
                Reply::empty(200)
            } else {
                message(404, "device not found")
            }
        }
        _ => message(404, "not found"),
    }
}

fn token(sim: &Sim, req: &Req) -> Reply {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    let field = |k: &str| form.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    let basic = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    let (id, secret) = match (field("client_id"), field("client_secret"), basic) {
        (Some(id), Some(secret), _) => (id, secret),
        (_, _, Some(pair)) => pair,
        _ => return message(400, "client_id and client_secret are required"),
    };
    if field("grant_type").is_some_and(|g| g != "client_credentials") {
        return message(400, "unsupported grant_type");
    }
    if id != sim.cfg.tailscale_client_id || secret != sim.cfg.tailscale_client_secret.expose() {
        return message(401, "invalid client credentials");
    }
    let now = Utc::now();
    let ttl =
        ChronoDuration::from_std(sim.cfg.tailscale_token_ttl).unwrap_or(ChronoDuration::hours(1));
    let access = format!("tskey-api-{}", random_alnum(32));
    let mut w = sim.world();
    // Expired tokens are dropped here, so the map stays as small as the live token set.
    w.ts_tokens.retain(|_, exp| *exp > now);
    w.ts_tokens.insert(access.clone(), now + ttl);
    Reply::json(
        200,
        &json!({
            "access_token": access, "token_type": "Bearer",
            "expires_in": sim.cfg.tailscale_token_ttl.as_secs(),
            "scope": "auth_keys devices:core",
            "tags": sim.cfg.tailscale_tags.join(" "),
        }),
    )
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct KeyBody {
    capabilities: Option<Caps>,
    expiry_seconds: Option<i64>,
    description: Option<String>,
}
#[derive(Deserialize, Default)]
#[serde(default)]
struct Caps {
    devices: Option<DeviceCaps>,
}
#[derive(Deserialize, Default)]
#[serde(default)]
struct DeviceCaps {
    create: Option<KeyCaps>,
}
#[derive(Deserialize, Default)]
#[serde(default)]
struct KeyCaps {
    reusable: bool,
    ephemeral: bool,
    preauthorized: bool,
    tags: Vec<String>,
}

fn create_key(
    sim: &Sim,
    keys: &mut std::collections::BTreeMap<String, SimKey>,
    req: &Req,
    now: chrono::DateTime<Utc>,
) -> Reply {
    let body: KeyBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return message(400, &format!("invalid request body: {e}")),
    };
    let caps = body
        .capabilities
        .and_then(|c| c.devices)
        .and_then(|d| d.create)
        .unwrap_or_default();
    // OAuth-minted keys are owned by the tailnet and must carry the client's full tag set.
    let wanted: BTreeSet<&str> = caps.tags.iter().map(String::as_str).collect();
    let allowed: BTreeSet<&str> = sim.cfg.tailscale_tags.iter().map(String::as_str).collect();
    if wanted.is_empty() || wanted != allowed {
        return message(
            400,
            &format!(
                "requested tags [{}] are invalid or not permitted",
                caps.tags.join(", ")
            ),
        );
    }
    let description = body.description.unwrap_or_default();
    if description.chars().count() > 50
        || !description
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ' ')
    {
        return message(
            400,
            "description must be at most 50 alphanumeric characters, hyphens and spaces",
        );
    }
    let expiry = body.expiry_seconds.unwrap_or(DEFAULT_KEY_EXPIRY_SECS);
    if !(1..=DEFAULT_KEY_EXPIRY_SECS).contains(&expiry) {
        return message(400, "expirySeconds must be between 1 and 90 days");
    }
    let id = format!("k{}CNTRL", random_alnum(12));
    let key = SimKey {
        secret: format!("tskey-auth-{id}-{}", random_alnum(24)),
        id: id.clone(),
        description,
        created: now,
        expires: now + ChronoDuration::seconds(expiry),
        reusable: caps.reusable,
        ephemeral: caps.ephemeral,
        preauthorized: caps.preauthorized,
        tags: caps.tags,
        revoked: None,
        uses: 0,
    };
    let v = key_json(&key, now, true);
    keys.insert(id, key);
    Reply::json(200, &v)
}

/// The key as the API shows it; the secret only in the response that minted it.
fn key_json(k: &SimKey, now: chrono::DateTime<Utc>, with_secret: bool) -> Value {
    let mut v = json!({
        "id": k.id, "keyType": "auth", "description": k.description,
        "created": rfc3339(k.created), "expires": rfc3339(k.expires),
        "invalid": k.invalid(now),
        "capabilities": {"devices": {"create": {
            "reusable": k.reusable, "ephemeral": k.ephemeral,
            "preauthorized": k.preauthorized, "tags": k.tags,
        }}},
        "tags": k.tags,
    });
    if let Some(r) = k.revoked {
        v["revoked"] = json!(rfc3339(r));
    }
    if with_secret {
        v["key"] = json!(k.secret);
    }
    v
}

/// Exact-match filters on top-level fields, AND-ed; `tags` is repeatable and every given tag
/// must be on the device. Unknown filters and `fields` are ignored.
fn device_matches(d: &SimDevice, req: &Req) -> bool {
    req.query.iter().all(|(k, v)| match k.as_str() {
        "hostname" => d.hostname == *v,
        "name" => d.name == *v,
        "nodeId" => d.node_id == *v,
        "id" => d.id == *v,
        "tags" => d.tags.contains(v),
        "isEphemeral" => d.is_ephemeral.to_string() == *v,
        "authorized" => d.authorized.to_string() == *v,
        _ => true,
    })
}

fn device_json(d: &SimDevice) -> Value {
    // `lastSeen` is omitted while the device is connected, as the real API does.
    json!({
        "addresses": d.addresses, "id": d.id, "nodeId": d.node_id,
        "user": "tagged-devices", "name": d.name, "hostname": d.hostname,
        "clientVersion": "1.80.0-sim", "updateAvailable": false, "os": "linux",
        "created": rfc3339(d.created), "connectedToControl": true,
        "keyExpiryDisabled": true, "expires": "0001-01-01T00:00:00Z",
        "authorized": d.authorized, "isExternal": false, "isEphemeral": d.is_ephemeral,
        "machineKey": "", "nodeKey": format!("nodekey:{}", d.node_id),
        "blocksIncomingConnections": false, "tags": d.tags,
        "tailnetLockError": "", "tailnetLockKey": "",
    })
}

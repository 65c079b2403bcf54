//! The simulated Hetzner Cloud API (`/v1`): servers, actions, server types, locations.
//!
//! Owns request validation, the catalogue (locations, server types with per-location
//! deprecation and availability, images), and rendering in the shapes of the public OpenAPI
//! description, minus `datacenter`, which the live API no longer sends. Errors use Hetzner's
//! envelope `{"error":{"code","message","details"}}` with the status each code comes with. Must
//! not rate-limit or count requests (the pipeline in `mod.rs` does) and must not panic on input.

use super::labels::Selector;
use super::world::{SimAction, SimServer, World};
use super::{Reply, Req, Sim, rfc3339};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

const MAX_PER_PAGE: usize = 50;
const DEFAULT_PER_PAGE: usize = 25;
const MAX_USER_DATA: usize = 32 * 1024;

pub(crate) fn error(status: u16, code: &str, message: &str) -> Reply {
    error_with(status, code, message, Value::Null)
}

fn error_with(status: u16, code: &str, message: &str, details: Value) -> Reply {
    Reply::json(
        status,
        &json!({"error": {"code": code, "message": message, "details": details}}),
    )
}

fn invalid_input(field: &str, message: &str) -> Reply {
    error_with(
        400,
        "invalid_input",
        &format!("invalid input in field '{field}': {message}"),
        json!({"fields": [{"name": field, "messages": [message]}]}),
    )
}

fn not_found() -> Reply {
    error(404, "not_found", "the requested resource was not found")
}

struct LocationDef {
    id: i64,
    name: &'static str,
    description: &'static str,
    city: &'static str,
    country: &'static str,
    latitude: f64,
    longitude: f64,
    network_zone: &'static str,
}

const LOCATIONS: [LocationDef; 6] = [
    LocationDef {
        id: 1,
        name: "fsn1",
        description: "Falkenstein DC Park 1",
        city: "Falkenstein",
        country: "DE",
        latitude: 50.47612,
        longitude: 12.370071,
        network_zone: "eu-central",
    },
    LocationDef {
        id: 2,
        name: "nbg1",
        description: "Nuremberg DC Park 1",
        city: "Nuremberg",
        country: "DE",
        latitude: 49.452102,
        longitude: 11.076665,
        network_zone: "eu-central",
    },
    LocationDef {
        id: 3,
        name: "hel1",
        description: "Helsinki DC Park 1",
        city: "Helsinki",
        country: "FI",
        latitude: 60.169855,
        longitude: 24.938379,
        network_zone: "eu-central",
    },
    LocationDef {
        id: 4,
        name: "ash",
        description: "Ashburn, VA",
        city: "Ashburn, VA",
        country: "US",
        latitude: 39.045821,
        longitude: -77.487073,
        network_zone: "us-east",
    },
    LocationDef {
        id: 5,
        name: "hil",
        description: "Hillsboro, OR",
        city: "Hillsboro, OR",
        country: "US",
        latitude: 45.54222,
        longitude: -122.951924,
        network_zone: "us-west",
    },
    LocationDef {
        id: 6,
        name: "sin",
        description: "Singapore",
        city: "Singapore",
        country: "SG",
        latitude: 1.283333,
        longitude: 103.833333,
        network_zone: "ap-southeast",
    },
];

const EU: &[&str] = &["fsn1", "nbg1", "hel1"];
const ALL: &[&str] = &["fsn1", "nbg1", "hel1", "ash", "hil", "sin"];

struct TypeDef {
    id: i64,
    name: &'static str,
    cores: u32,
    memory: f64,
    disk: u32,
    cpu_type: &'static str,
    architecture: &'static str,
    locations: &'static [&'static str],
    /// Deprecated (and no longer orderable) in these locations.
    deprecated_in: &'static [&'static str],
    hourly: &'static str,
    monthly: &'static str,
}

const SERVER_TYPES: [TypeDef; 7] = [
    TypeDef {
        id: 114,
        name: "cx23",
        cores: 2,
        memory: 4.0,
        disk: 40,
        cpu_type: "shared",
        architecture: "x86",
        locations: EU,
        deprecated_in: &[],
        hourly: "0.0056",
        monthly: "3.4900",
    },
    TypeDef {
        id: 115,
        name: "cx33",
        cores: 4,
        memory: 8.0,
        disk: 80,
        cpu_type: "shared",
        architecture: "x86",
        locations: EU,
        deprecated_in: &[],
        hourly: "0.0088",
        monthly: "5.4900",
    },
    TypeDef {
        id: 116,
        name: "cpx12",
        cores: 1,
        memory: 2.0,
        disk: 40,
        cpu_type: "shared",
        architecture: "x86",
        locations: ALL,
        deprecated_in: &["hil"],
        hourly: "0.0072",
        monthly: "4.4900",
    },
    TypeDef {
        id: 117,
        name: "cpx22",
        cores: 2,
        memory: 4.0,
        disk: 80,
        cpu_type: "shared",
        architecture: "x86",
        locations: ALL,
        deprecated_in: &[],
        hourly: "0.0104",
        monthly: "6.4900",
    },
    TypeDef {
        id: 45,
        name: "cax11",
        cores: 2,
        memory: 4.0,
        disk: 40,
        cpu_type: "shared",
        architecture: "arm",
        locations: EU,
        deprecated_in: &[],
        hourly: "0.0064",
        monthly: "3.9900",
    },
    TypeDef {
        id: 96,
        name: "ccx13",
        cores: 2,
        memory: 8.0,
        disk: 80,
        cpu_type: "dedicated",
        architecture: "x86",
        locations: ALL,
        deprecated_in: &[],
        hourly: "0.0200",
        monthly: "12.4900",
    },
    // The cx_2 family was deprecated in October 2025 and can no longer be ordered.
    TypeDef {
        id: 22,
        name: "cx22",
        cores: 2,
        memory: 4.0,
        disk: 40,
        cpu_type: "shared",
        architecture: "x86",
        locations: EU,
        deprecated_in: EU,
        hourly: "0.0060",
        monthly: "3.7900",
    },
];

const IMAGES: [(i64, &str, &str, &str, &str); 4] = [
    (161547269, "ubuntu-24.04", "Ubuntu 24.04", "ubuntu", "24.04"),
    (103908070, "ubuntu-22.04", "Ubuntu 22.04", "ubuntu", "22.04"),
    (114690387, "debian-12", "Debian 12", "debian", "12"),
    (246548003, "debian-13", "Debian 13", "debian", "13"),
];

fn location_def(name: &str) -> Option<&'static LocationDef> {
    LOCATIONS.iter().find(|l| l.name == name)
}

fn type_def(name: &str) -> Option<&'static TypeDef> {
    SERVER_TYPES.iter().find(|t| t.name == name)
}

fn location_json(l: &LocationDef) -> Value {
    json!({
        "id": l.id, "name": l.name, "description": l.description, "city": l.city,
        "country": l.country, "latitude": l.latitude, "longitude": l.longitude,
        "network_zone": l.network_zone,
    })
}

fn server_type_json(t: &TypeDef) -> Value {
    let deprecation = json!({
        "announced": "2025-10-16T00:00:00+00:00",
        "unavailable_after": "2026-01-01T00:00:00+00:00",
    });
    let locations: Vec<Value> = t
        .locations
        .iter()
        .filter_map(|n| location_def(n))
        .map(|l| {
            let deprecated = t.deprecated_in.contains(&l.name);
            json!({
                "id": l.id, "name": l.name,
                "deprecation": if deprecated { deprecation.clone() } else { Value::Null },
                "available": !deprecated, "recommended": !deprecated,
            })
        })
        .collect();
    let price = |v: &str| json!({"net": v, "gross": v});
    let prices: Vec<Value> = t
        .locations
        .iter()
        .map(|l| {
            json!({
                "location": l, "price_hourly": price(t.hourly), "price_monthly": price(t.monthly),
                "included_traffic": 21_990_232_555_520i64, "price_per_tb_traffic": price("1.0000"),
            })
        })
        .collect();
    let everywhere = t.deprecated_in.len() == t.locations.len();
    json!({
        "id": t.id, "name": t.name, "description": t.name.to_uppercase(), "category": "Shared vCPU",
        "cores": t.cores, "memory": t.memory, "disk": t.disk, "cpu_type": t.cpu_type,
        "architecture": t.architecture, "storage_type": "local",
        "deprecated": everywhere,
        "deprecation": if everywhere { deprecation } else { Value::Null },
        "locations": locations, "prices": prices,
    })
}

fn image_json(name: &str) -> Value {
    let (id, name, description, flavor, version) = IMAGES
        .iter()
        .find(|i| i.1 == name)
        .copied()
        .unwrap_or(IMAGES[0]);
    json!({
        "id": id, "type": "system", "status": "available", "name": name,
        "description": description, "image_size": null, "disk_size": 5,
        "created": "2024-04-25T00:00:00+00:00", "created_from": null, "bound_to": null,
        "os_flavor": flavor, "os_version": version, "rapid_deploy": true,
        "protection": {"delete": false}, "deprecated": null, "deleted": null,
        "labels": {}, "architecture": "x86",
    })
}

fn server_json(s: &SimServer) -> Value {
    let location = location_def(&s.location).unwrap_or(&LOCATIONS[0]);
    let stype = type_def(&s.server_type).unwrap_or(&SERVER_TYPES[0]);
    let ipv4 = s.ipv4.as_ref().map(|ip| {
        json!({"id": s.id + 7_000_000, "ip": ip, "blocked": false,
               "dns_ptr": format!("static.{ip}.clients.your-server.de")})
    });
    let ipv6 = s
        .ipv6
        .as_ref()
        .map(|ip| json!({"id": s.id + 8_000_000, "ip": ip, "blocked": false, "dns_ptr": []}));
    json!({
        "id": s.id, "name": s.name, "status": s.status, "created": rfc3339(s.created),
        "labels": s.labels,
        "public_net": {"ipv4": ipv4, "ipv6": ipv6, "floating_ips": [], "firewalls": []},
        "private_net": [], "server_type": server_type_json(stype),
        "location": location_json(location), "image": image_json(&s.image), "iso": null,
        "rescue_enabled": false, "locked": false, "backup_window": null,
        "outgoing_traffic": 0, "ingoing_traffic": 0, "included_traffic": 21_990_232_555_520i64,
        "protection": {"delete": false, "rebuild": false},
        "volumes": [], "load_balancers": [], "primary_disk_size": stype.disk,
        "placement_group": null,
    })
}

/// An action as of `now`; `fresh` renders it as just started (the 201 of a create shows its
/// actions `running` at 0 %, however fast the simulated work is).
fn action_json(a: &SimAction, now: DateTime<Utc>, fresh: bool) -> Value {
    let done = !fresh && now >= a.finishes;
    let progress = if done {
        100
    } else if fresh {
        0
    } else {
        let total = (a.finishes - a.started).num_milliseconds().max(1);
        ((now - a.started).num_milliseconds() * 100 / total).clamp(0, 99)
    };
    let status = match (done, a.fails) {
        (false, _) => "running",
        (true, false) => "success",
        (true, true) => "error",
    };
    json!({
        "id": a.id, "command": a.command, "status": status, "progress": progress,
        "started": rfc3339(a.started),
        "finished": if done { Value::String(rfc3339(a.finishes)) } else { Value::Null },
        "resources": [{"id": a.server_id, "type": "server"}],
        "error": if done && a.fails {
            json!({"code": "action_failed", "message": "Action failed"})
        } else {
            Value::Null
        },
    })
}

fn pagination(total: usize, page: usize, per_page: usize) -> Value {
    let last = total.div_ceil(per_page).max(1);
    json!({
        "page": page, "per_page": per_page,
        "previous_page": if page > 1 { json!(page - 1) } else { Value::Null },
        "next_page": if page < last { json!(page + 1) } else { Value::Null },
        "last_page": last, "total_entries": total,
    })
}

/// `page`/`per_page` as the API reads them: `per_page` at most 50.
fn paging(req: &Req) -> Result<(usize, usize), Reply> {
    let num = |k: &str, default: usize| -> Result<usize, Reply> {
        match req.query_one(k) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| invalid_input(k, "must be a positive integer")),
        }
    };
    let page = num("page", 1)?;
    let per_page = num("per_page", DEFAULT_PER_PAGE)?;
    if per_page > MAX_PER_PAGE {
        return Err(invalid_input("per_page", "must be at most 50"));
    }
    Ok((page, per_page))
}

fn page_of<T>(items: Vec<T>, page: usize, per_page: usize) -> (Vec<T>, Value) {
    let total = items.len();
    let meta = json!({"pagination": pagination(total, page, per_page)});
    let items = items
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .collect();
    (items, meta)
}

fn path_id(req: &Req, index: usize) -> Option<i64> {
    req.path.split('/').nth(index)?.parse().ok()
}

pub(crate) fn handle(sim: &Sim, route: &'static str, req: &Req, authenticated: bool) -> Reply {
    if route == "unknown /v1" {
        return not_found();
    }
    if !authenticated {
        return error(401, "unauthorized", "unable to authenticate");
    }
    let now = Utc::now();
    // Read-only catalogue routes need no world.
    match route {
        "GET /v1/locations" => return list_locations(req),
        "GET /v1/server_types" => return list_server_types(req),
        _ => {}
    }
    let mut w = sim.world();
    w.advance(now);
    // Path: "", "v1", "servers"|"actions", id, ...
    match route {
        "POST /v1/servers" => create_server(sim, &mut w, req, now),
        "GET /v1/servers" => list_servers(&w, req),
        "GET /v1/servers/{id}" => match path_id(req, 3).and_then(|id| w.servers.get(&id)) {
            Some(s) => Reply::json(200, &json!({"server": server_json(s)})),
            None => not_found(),
        },
        "DELETE /v1/servers/{id}" => {
            match path_id(req, 3).and_then(|id| w.delete_server(id, now)) {
                Some(a) => Reply::json(200, &json!({"action": action_json(&a, now, true)})),
                None => not_found(),
            }
        }
        "POST /v1/servers/{id}/actions/poweron" => {
            let Some(id) = path_id(req, 3).filter(|id| w.servers.contains_key(id)) else {
                return not_found();
            };
            if w.locked(id, now) {
                return error(
                    423,
                    "locked",
                    "server is locked: there is already an action running",
                );
            }
            match w.power_on(id, now) {
                Some(a) => Reply::json(201, &json!({"action": action_json(&a, now, true)})),
                None => not_found(),
            }
        }
        "GET /v1/actions" => list_actions(&w, req, now),
        "GET /v1/actions/{id}" => match path_id(req, 3).and_then(|id| w.actions.get(&id)) {
            Some(a) => Reply::json(200, &json!({"action": action_json(a, now, false)})),
            None => not_found(),
        },
        _ => not_found(),
    }
}

fn list_locations(req: &Req) -> Reply {
    let (page, per_page) = match paging(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let all: Vec<Value> = LOCATIONS
        .iter()
        .filter(|l| req.query_one("name").is_none_or(|n| n == l.name))
        .map(location_json)
        .collect();
    let (items, meta) = page_of(all, page, per_page);
    Reply::json(200, &json!({"locations": items, "meta": meta}))
}

fn list_server_types(req: &Req) -> Reply {
    let (page, per_page) = match paging(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let all: Vec<Value> = SERVER_TYPES
        .iter()
        .filter(|t| req.query_one("name").is_none_or(|n| n == t.name))
        .map(server_type_json)
        .collect();
    let (items, meta) = page_of(all, page, per_page);
    Reply::json(200, &json!({"server_types": items, "meta": meta}))
}

fn list_servers(w: &World, req: &Req) -> Reply {
    let (page, per_page) = match paging(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let selector = match req.query_one("label_selector").map(Selector::parse) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return invalid_input("label_selector", &e),
    };
    let statuses: Vec<&str> = req.query_all("status").collect();
    let name = req.query_one("name");
    let matching: Vec<&SimServer> = w
        .servers
        .values()
        .filter(|s| name.is_none_or(|n| n == s.name))
        .filter(|s| selector.as_ref().is_none_or(|sel| sel.matches(&s.labels)))
        .filter(|s| {
            statuses.is_empty()
                || serde_json::to_value(s.status)
                    .ok()
                    .and_then(|v| v.as_str().map(|st| statuses.contains(&st)))
                    .unwrap_or(false)
        })
        .collect();
    let (items, meta) = page_of(matching, page, per_page);
    let servers: Vec<Value> = items.into_iter().map(server_json).collect();
    Reply::json(200, &json!({"servers": servers, "meta": meta}))
}

fn list_actions(w: &World, req: &Req, now: DateTime<Utc>) -> Reply {
    let (page, per_page) = match paging(req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut ids = Vec::new();
    for v in req.query_all("id") {
        match v.parse::<i64>() {
            Ok(id) => ids.push(id),
            Err(_) => return invalid_input("id", "must be an integer"),
        }
    }
    let found: Vec<&SimAction> = if ids.is_empty() {
        w.actions.values().collect()
    } else {
        ids.iter().filter_map(|id| w.actions.get(id)).collect()
    };
    let (items, meta) = page_of(found, page, per_page);
    let actions: Vec<Value> = items
        .into_iter()
        .map(|a| action_json(a, now, false))
        .collect();
    Reply::json(200, &json!({"actions": actions, "meta": meta}))
}

#[derive(Deserialize)]
struct CreateBody {
    name: String,
    server_type: String,
    image: String,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    datacenter: Option<String>,
    #[serde(default)]
    start_after_create: Option<bool>,
    #[serde(default)]
    ssh_keys: Vec<Value>,
    #[serde(default)]
    user_data: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    public_net: Option<PublicNetBody>,
}

#[derive(Deserialize)]
struct PublicNetBody {
    #[serde(default = "yes")]
    enable_ipv4: bool,
    #[serde(default = "yes")]
    enable_ipv6: bool,
}

fn yes() -> bool {
    true
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn create_server(sim: &Sim, w: &mut World, req: &Req, now: DateTime<Utc>) -> Reply {
    let value: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return error(400, "json_error", &format!("invalid JSON: {e}")),
    };
    let body: CreateBody = match serde_json::from_value(value) {
        Ok(b) => b,
        Err(e) => {
            let msg = e.to_string();
            // Name the missing field the way the API does.
            let field = ["name", "server_type", "image"]
                .into_iter()
                .find(|f| msg.contains(&format!("`{f}`")))
                .unwrap_or("body");
            return invalid_input(field, &msg);
        }
    };
    if !valid_hostname(&body.name) {
        return invalid_input("name", "must be a valid hostname (RFC 1123)");
    }
    if body.datacenter.is_some() && body.location.is_some() {
        return invalid_input("location", "location and datacenter are mutually exclusive");
    }
    let labels = body.labels.unwrap_or_default();
    for (k, v) in &labels {
        if let Err(e) = super::labels::label_key_ok(k) {
            return invalid_input("labels", &e);
        }
        if !super::labels::label_value_ok(v) {
            return invalid_input("labels", &format!("label value '{v}' is invalid"));
        }
    }
    if body
        .user_data
        .as_ref()
        .is_some_and(|u| u.len() > MAX_USER_DATA)
    {
        return invalid_input("user_data", "is too long (at most 32 KiB)");
    }
    let Some(stype) = type_def(&body.server_type) else {
        return invalid_input(
            "server_type",
            &format!("server type '{}' not found", body.server_type),
        );
    };
    let Some(image) = IMAGES.iter().find(|i| i.1 == body.image) else {
        return invalid_input("image", &format!("image '{}' not found", body.image));
    };
    let location = match &body.location {
        Some(l) => match location_def(l) {
            Some(def) => def.name,
            None => return invalid_input("location", &format!("location '{l}' not found")),
        },
        // Without a location, the API picks one where the type can be ordered.
        None => match stype
            .locations
            .iter()
            .find(|l| !stype.deprecated_in.contains(l))
        {
            Some(l) => *l,
            None => return invalid_input("server_type", "server type is deprecated everywhere"),
        },
    };
    if !stype.locations.contains(&location) {
        return invalid_input("location", "unsupported location for server type");
    }
    if stype.deprecated_in.contains(&location) {
        return invalid_input(
            "server_type",
            &format!(
                "server type {} is deprecated and unavailable in {location}",
                stype.name
            ),
        );
    }
    if w.servers.values().any(|s| s.name == body.name) {
        return error_with(
            409,
            "uniqueness_error",
            "server name is already used",
            json!({"fields": [{"name": "name"}]}),
        );
    }
    if sim
        .cfg
        .server_limit
        .is_some_and(|max| w.servers.len() >= max)
    {
        return error_with(
            403,
            "resource_limit_exceeded",
            "server limit exceeded",
            json!({"limits": [{"name": "server_limit"}]}),
        );
    }
    if w.faults.unavailable_locations.iter().any(|l| l == location) {
        return error_with(
            412,
            "resource_unavailable",
            "error during placement",
            json!({}),
        );
    }
    let net = body.public_net.unwrap_or(PublicNetBody {
        enable_ipv4: true,
        enable_ipv6: true,
    });
    let root_password = body.ssh_keys.is_empty().then(|| {
        format!(
            "{:016x}{:08x}",
            rand::random::<u64>(),
            rand::random::<u32>()
        )
    });
    let (id, action, next) = w.create_server(
        now,
        body.name,
        labels,
        location.to_owned(),
        stype.name.to_owned(),
        image.1.to_owned(),
        body.user_data,
        net.enable_ipv4,
        net.enable_ipv6,
        body.start_after_create.unwrap_or(true),
    );
    let Some(server) = w.servers.get(&id) else {
        return error(500, "server_error", "server vanished");
    };
    Reply::json(
        201,
        &json!({
            "server": server_json(server),
            "action": action_json(&action, now, true),
            "next_actions": next.iter().map(|a| action_json(a, now, true)).collect::<Vec<_>>(),
            "root_password": root_password,
        }),
    )
}

//! The simulated world: servers, actions, auth keys, devices, and what happens to them over time.
//!
//! Owns all simulated state and its progress. Time advances lazily: every request first runs
//! [`World::advance`], which applies the scheduled events that are due (create finished, boot
//! finished, tailnet join, delete finished), so nothing runs in the background and an idle
//! simulator costs nothing. Action progress is computed from timestamps when rendered. Must not
//! know about HTTP; the API modules read and change this state under one lock.

use super::LatencyProfile;
use super::faults::Faults;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::HashMap;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Initializing,
    Starting,
    Running,
    Off,
    Deleting,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimServer {
    pub id: i64,
    pub name: String,
    pub status: Status,
    pub created: DateTime<Utc>,
    pub labels: BTreeMap<String, String>,
    pub location: String,
    pub server_type: String,
    pub image: String,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    #[serde(skip)]
    pub user_data: Option<String>,
    /// Set by the `fail_actions` fault: the server exists but never boots.
    #[serde(skip)]
    pub broken: bool,
    /// `start_after_create` was set.
    #[serde(skip)]
    pub starts: bool,
}

#[derive(Debug, Clone)]
pub struct SimAction {
    pub id: i64,
    pub command: &'static str,
    pub server_id: i64,
    pub started: DateTime<Utc>,
    pub finishes: DateTime<Utc>,
    pub fails: bool,
}

impl SimAction {
    pub fn running(&self, now: DateTime<Utc>) -> bool {
        now < self.finishes
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimKey {
    pub id: String,
    #[serde(skip)]
    pub secret: String,
    pub description: String,
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    pub reusable: bool,
    pub ephemeral: bool,
    pub preauthorized: bool,
    pub tags: Vec<String>,
    pub revoked: Option<DateTime<Utc>>,
    /// Devices that joined with this key; a single-use key is consumed by the first.
    pub uses: u32,
}

impl SimKey {
    pub fn invalid(&self, now: DateTime<Utc>) -> bool {
        self.revoked.is_some() || now >= self.expires || (!self.reusable && self.uses > 0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimDevice {
    pub id: String,
    pub node_id: String,
    pub hostname: String,
    pub name: String,
    pub addresses: Vec<String>,
    pub tags: Vec<String>,
    pub authorized: bool,
    pub is_ephemeral: bool,
    pub created: DateTime<Utc>,
    pub key_id: String,
    pub server_id: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    CreateDone(i64),
    BootDone(i64),
    Enroll(i64),
    DeleteDone(i64),
}

#[derive(Debug)]
pub struct World {
    pub latency: LatencyProfile,
    pub faults: Faults,
    pub servers: BTreeMap<i64, SimServer>,
    pub actions: BTreeMap<i64, SimAction>,
    pub keys: BTreeMap<String, SimKey>,
    pub devices: Vec<SimDevice>,
    /// Servers ever created, by name, and devices ever enrolled, by hostname: a duplicate shows
    /// here even after it was deleted again (the chaos suite counts them).
    pub creates_by_name: BTreeMap<String, u32>,
    pub enrollments_by_hostname: BTreeMap<String, u32>,
    /// Tailscale OAuth access tokens and when they expire.
    pub ts_tokens: HashMap<String, DateTime<Utc>>,
    events: BinaryHeap<Reverse<(DateTime<Utc>, u64, Event)>>,
    seq: u64,
    next_server_id: i64,
    next_action_id: i64,
    next_device: u32,
}

/// `t + d`, saturating: a silly configured duration means "never", not a panic.
fn later(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    ChronoDuration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl World {
    pub fn new(latency: LatencyProfile, faults: Faults) -> World {
        World {
            latency,
            faults,
            servers: BTreeMap::new(),
            actions: BTreeMap::new(),
            keys: BTreeMap::new(),
            devices: Vec::new(),
            creates_by_name: BTreeMap::new(),
            enrollments_by_hostname: BTreeMap::new(),
            ts_tokens: HashMap::new(),
            events: BinaryHeap::new(),
            seq: 0,
            // Ids in the range real ones have, so nobody relies on small numbers.
            next_server_id: 100_000_001,
            next_action_id: 500_000_001,
            next_device: 1,
        }
    }

    fn schedule(&mut self, at: DateTime<Utc>, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, e)));
    }

    pub fn new_action(
        &mut self,
        command: &'static str,
        server_id: i64,
        now: DateTime<Utc>,
        takes: Duration,
        fails: bool,
    ) -> SimAction {
        let a = SimAction {
            id: self.next_action_id,
            command,
            server_id,
            started: now,
            finishes: later(now, takes),
            fails,
        };
        self.next_action_id += 1;
        self.actions.insert(a.id, a.clone());
        a
    }

    /// Creates a server and its actions; returns (server id, create action, next actions).
    #[allow(clippy::too_many_arguments)]
    pub fn create_server(
        &mut self,
        now: DateTime<Utc>,
        name: String,
        labels: BTreeMap<String, String>,
        location: String,
        server_type: String,
        image: String,
        user_data: Option<String>,
        enable_ipv4: bool,
        enable_ipv6: bool,
        start_after_create: bool,
    ) -> (i64, SimAction, Vec<SimAction>) {
        let id = self.next_server_id;
        self.next_server_id += 1;
        let n = id - 100_000_000;
        let broken = self.faults.fail_actions;
        *self.creates_by_name.entry(name.clone()).or_default() += 1;
        self.servers.insert(
            id,
            SimServer {
                id,
                name,
                status: Status::Initializing,
                created: now,
                labels,
                location,
                server_type,
                image,
                // Documentation ranges (RFC 5737 / RFC 3849): never a real address.
                ipv4: enable_ipv4.then(|| format!("198.51.{}.{}", (n >> 8) & 0xff, n & 0xff)),
                ipv6: enable_ipv6.then(|| format!("2001:db8:{:x}::/64", n & 0xffff)),
                user_data,
                broken,
                starts: start_after_create,
            },
        );
        let create_time = self.latency.create;
        let boot_time = self.latency.boot;
        let create = self.new_action("create_server", id, now, create_time, broken);
        self.schedule(create.finishes, Event::CreateDone(id));
        let mut next = Vec::new();
        if start_after_create {
            let start = self.new_action("start_server", id, now, create_time + boot_time, broken);
            self.schedule(start.finishes, Event::BootDone(id));
            next.push(start);
        }
        (id, create, next)
    }

    /// Powers a server on; `None` if it does not exist.
    pub fn power_on(&mut self, id: i64, now: DateTime<Utc>) -> Option<SimAction> {
        let s = self.servers.get_mut(&id)?;
        let already = s.status == Status::Running;
        if !already && !s.broken {
            s.status = Status::Starting;
        }
        let broken = s.broken;
        let takes = if already {
            Duration::ZERO
        } else {
            self.latency.boot
        };
        let a = self.new_action("start_server", id, now, takes, broken);
        if !already {
            self.schedule(a.finishes, Event::BootDone(id));
        }
        Some(a)
    }

    /// Starts deleting a server; `None` if it does not exist.
    pub fn delete_server(&mut self, id: i64, now: DateTime<Utc>) -> Option<SimAction> {
        let s = self.servers.get_mut(&id)?;
        s.status = Status::Deleting;
        let a = self.new_action("delete_server", id, now, self.latency.delete, false);
        self.schedule(a.finishes, Event::DeleteDone(id));
        Some(a)
    }

    /// Whether an unfinished action holds the server (the API answers 423 `locked`).
    pub fn locked(&self, id: i64, now: DateTime<Utc>) -> bool {
        self.actions
            .values()
            .any(|a| a.server_id == id && a.running(now))
    }

    /// Applies every scheduled event that is due.
    pub fn advance(&mut self, now: DateTime<Utc>) {
        while let Some(Reverse((at, _, _))) = self.events.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, _, event))) = self.events.pop() else {
                break;
            };
            self.apply(at, event);
        }
    }

    fn apply(&mut self, at: DateTime<Utc>, event: Event) {
        match event {
            Event::CreateDone(id) => {
                if let Some(s) = self.servers.get_mut(&id)
                    && s.status == Status::Initializing
                {
                    // A broken create leaves a server that exists, is billed, and is off: the
                    // classic orphan. Without start_after_create it is simply off.
                    s.status = if s.starts && !s.broken {
                        Status::Starting
                    } else {
                        Status::Off
                    };
                }
            }
            Event::BootDone(id) => {
                let leave_off = self.faults.leave_off;
                let no_enrollment = self.faults.no_enrollment;
                let Some(s) = self.servers.get_mut(&id) else {
                    return;
                };
                if s.broken || !matches!(s.status, Status::Starting | Status::Initializing) {
                    return;
                }
                if leave_off {
                    s.status = Status::Off;
                    return;
                }
                s.status = Status::Running;
                if !no_enrollment {
                    let when = later(at, self.latency.enroll);
                    self.schedule(when, Event::Enroll(id));
                }
            }
            Event::Enroll(id) => self.enroll(id, at),
            Event::DeleteDone(id) => {
                // The device stays: ephemeral nodes are only cleaned up after they have been
                // offline for a long while, as in the real tailnet.
                self.servers.remove(&id);
            }
        }
    }

    /// Acts out `tailscale up` from the server's user_data.
    fn enroll(&mut self, server_id: i64, at: DateTime<Utc>) {
        let Some(s) = self.servers.get(&server_id) else {
            return;
        };
        if s.status != Status::Running {
            return;
        }
        let Some(up) = s.user_data.as_deref().and_then(parse_tailscale_up) else {
            return;
        };
        let hostname = up.hostname.unwrap_or_else(|| s.name.clone());
        let Some(key) = self.keys.values_mut().find(|k| k.secret == up.auth_key) else {
            return;
        };
        if key.invalid(at) {
            return;
        }
        key.uses += 1;
        *self
            .enrollments_by_hostname
            .entry(hostname.clone())
            .or_default() += 1;
        let (tags, ephemeral, authorized, key_id) = (
            key.tags.clone(),
            key.ephemeral,
            key.preauthorized,
            key.id.clone(),
        );
        let n = self.next_device;
        self.next_device += 1;
        // 100.64.0.0/10, skipping .0 and .255 host parts.
        let host = n + (n / 254) * 2 + 1;
        let ipv4 = format!(
            "100.{}.{}.{}",
            64 + ((host >> 16) & 0x3f),
            (host >> 8) & 0xff,
            host & 0xff
        );
        let ipv6 = format!("fd7a:115c:a1e0::{:x}:{:x}", host >> 16, host & 0xffff);
        let taken = self
            .devices
            .iter()
            .filter(|d| d.hostname == hostname)
            .count();
        let dns_label = if taken == 0 {
            hostname.clone()
        } else {
            format!("{hostname}-{taken}")
        };
        self.devices.push(SimDevice {
            id: format!("{}", 90_000_000_000u64 + u64::from(n)),
            node_id: format!("n{n:06}CNTRL"),
            name: format!("{dns_label}.tail-sim.ts.net"),
            hostname,
            addresses: vec![ipv4, ipv6],
            tags,
            authorized,
            is_ephemeral: ephemeral,
            created: at,
            key_id,
            server_id,
        });
    }
}

#[derive(Debug, PartialEq)]
struct TailscaleUp {
    auth_key: String,
    hostname: Option<String>,
}

/// Finds the arguments of `tailscale up` in user_data: `--auth-key`/`--authkey` and
/// `--hostname`, each with `=` or a space. Quotes around values are stripped.
fn parse_tailscale_up(user_data: &str) -> Option<TailscaleUp> {
    // A shell or YAML comment that mentions the command is not the command.
    let line = user_data
        .lines()
        .find(|l| l.contains("tailscale up") && !l.trim_start().starts_with('#'))?;
    let args = &line[line.find("tailscale up")? + "tailscale up".len()..];
    let words: Vec<&str> = args
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| !w.is_empty())
        .collect();
    let value = |names: &[&str]| -> Option<String> {
        for (i, w) in words.iter().enumerate() {
            let w = w.trim_matches(|c| c == '"' || c == '\'');
            for n in names {
                if let Some(v) = w.strip_prefix(n).and_then(|r| r.strip_prefix('=')) {
                    return Some(v.trim_matches(|c| c == '"' || c == '\'').to_owned());
                }
                if w == *n {
                    return words
                        .get(i + 1)
                        .map(|v| v.trim_matches(|c| c == '"' || c == '\'').to_owned());
                }
            }
        }
        None
    };
    Some(TailscaleUp {
        auth_key: value(&["--auth-key", "--authkey"])?,
        hostname: value(&["--hostname"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_mentioning_tailscale_up_are_not_the_command() {
        let ud =
            "# retry `tailscale up` until it works\n  tailscale up --auth-key=k9 --hostname=h9";
        let up = parse_tailscale_up(ud).unwrap();
        assert_eq!(
            (up.auth_key.as_str(), up.hostname.as_deref()),
            ("k9", Some("h9"))
        );
    }

    #[test]
    fn tailscale_up_is_found_in_every_spelling() {
        let cases = [
            (
                "tailscale up --auth-key=tskey-auth-1 --hostname=job-1",
                "tskey-auth-1",
                Some("job-1"),
            ),
            (
                "runcmd:\n  - tailscale up --authkey tskey-auth-2",
                "tskey-auth-2",
                None,
            ),
            (
                "- [tailscale, up]\n- sudo tailscale up --authkey='k3' --hostname \"h3\"",
                "k3",
                Some("h3"),
            ),
        ];
        for (ud, key, host) in cases {
            let up = parse_tailscale_up(ud).unwrap();
            assert_eq!(up.auth_key, key, "{ud}");
            assert_eq!(up.hostname.as_deref(), host, "{ud}");
        }
        assert_eq!(parse_tailscale_up("#cloud-config\nruncmd: []"), None);
        assert_eq!(parse_tailscale_up("tailscale up --hostname=x"), None);
    }
}

//! Fault injection for the simulator: what can go wrong, on which route, how often.
//!
//! Owns the fault set (settable from flags and from `POST /_sim/faults`) and the decision, per
//! request, whether a fault fires. Must not know how a fault is rendered; the API modules turn
//! a [`FaultKind`] into each API's own error shape.

use rand::RngExt;
use serde::{Deserialize, Serialize};

/// Everything the simulator can be told to get wrong.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Errors and hangs on routes, checked in order; the first that fires wins.
    pub rules: Vec<FaultRule>,
    /// Creates in these locations fail with 412 `resource_unavailable` ("error during placement").
    pub unavailable_locations: Vec<String>,
    /// Create (and start) actions end in `error` / `action_failed`; the server is left `off`.
    pub fail_actions: bool,
    /// Servers come up `off` after a successful create and need a power-on.
    pub leave_off: bool,
    /// Booted servers never join the tailnet, whatever their key.
    pub no_enrollment: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// A route key as shown in `/_sim/state` (e.g. `POST /v1/servers`,
    /// `GET /v1/servers/{id}`), or `*` for every API route.
    pub route: String,
    pub fault: FaultKind,
    /// Fire on the next N matching requests, then stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// Fire with this probability (0..=1). Without `times` or `probability`: always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 429 `rate_limit_exceeded` (Tailscale: 429 with `Retry-After: 1`).
    #[serde(rename = "429")]
    RateLimited,
    /// 409 `conflict`: "the resource has changed during the request, please retry".
    Conflict,
    #[serde(rename = "500")]
    ServerError,
    #[serde(rename = "502")]
    BadGateway,
    #[serde(rename = "503")]
    Unavailable,
    #[serde(rename = "504")]
    GatewayTimeout,
    /// Do the work, then hold the answer for the configured hang time (past any sane client
    /// timeout), so the caller cannot tell whether it happened.
    Timeout,
}

impl std::str::FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
            format!("unknown fault {s:?} (429, conflict, 500, 502, 503, 504, timeout)")
        })
    }
}

impl std::str::FromStr for FaultRule {
    type Err = String;
    /// `ROUTE=KIND`, `ROUTE=KIND*N` (N times) or `ROUTE=KIND@P` (probability), e.g.
    /// `POST /v1/servers=502*2` or `*=timeout@0.05`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (route, spec) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("fault {s:?} is not ROUTE=KIND[*N|@P]"))?;
        let (kind, times, probability) = if let Some((k, n)) = spec.split_once('*') {
            let n = n.parse().map_err(|_| format!("bad count in fault {s:?}"))?;
            (k, Some(n), None)
        } else if let Some((k, p)) = spec.split_once('@') {
            let p: f64 = p
                .parse()
                .map_err(|_| format!("bad probability in fault {s:?}"))?;
            (k, None, Some(p))
        } else {
            (spec, None, None)
        };
        Ok(FaultRule {
            route: route.trim().to_owned(),
            fault: kind.trim().parse()?,
            times,
            probability,
        })
    }
}

impl Faults {
    /// The fault to act out for this request, if any; counts down `times`.
    pub fn fire(&mut self, route: &str) -> Option<FaultKind> {
        for rule in &mut self.rules {
            if rule.route != "*" && rule.route != route {
                continue;
            }
            if let Some(p) = rule.probability
                && !rand::rng().random_bool(p.clamp(0.0, 1.0))
            {
                continue;
            }
            match &mut rule.times {
                Some(0) => continue,
                Some(n) => *n -= 1,
                None => {}
            }
            return Some(rule.fault);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_from_flags_and_count_down() {
        let mut f = Faults {
            rules: vec!["POST /v1/servers=502*2".parse().unwrap()],
            ..Faults::default()
        };
        assert_eq!(f.fire("GET /v1/servers"), None);
        assert_eq!(f.fire("POST /v1/servers"), Some(FaultKind::BadGateway));
        assert_eq!(f.fire("POST /v1/servers"), Some(FaultKind::BadGateway));
        assert_eq!(f.fire("POST /v1/servers"), None);
        let r: FaultRule = "*=timeout@0.5".parse().unwrap();
        assert_eq!(
            (r.route.as_str(), r.fault, r.probability),
            ("*", FaultKind::Timeout, Some(0.5))
        );
        assert!("nonsense".parse::<FaultRule>().is_err());
        let mut never = Faults {
            rules: vec!["*=500@0".parse().unwrap()],
            ..Faults::default()
        };
        let mut always = Faults {
            rules: vec!["*=500@1".parse().unwrap()],
            ..Faults::default()
        };
        for _ in 0..50 {
            assert_eq!(never.fire("GET /v1/servers"), None);
            assert_eq!(always.fire("GET /v1/servers"), Some(FaultKind::ServerError));
        }
        assert!("*=418".parse::<FaultRule>().is_err());
    }
}

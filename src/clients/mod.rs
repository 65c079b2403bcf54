//! HTTP clients for the Hetzner Cloud and Tailscale APIs (issue #3).
//!
//! Owns the wire protocol of both services: requests, lenient response models, error
//! classification, retries of idempotent calls (through the one loop in [`retry`]), and
//! Hetzner's per-project rate budget. Must not know about jobs, the database or the step
//! machine, and must never retry a non-idempotent call (server create, auth-key create) on its
//! own: the caller resolves an unknown outcome by looking the resource up.

pub mod hetzner;
pub mod rate_budget;
pub mod retry;
pub mod tailscale;

/// The metrics label of a request path: ids become placeholders, so that the label set stays
/// bounded (`/servers/42/actions/poweron` → `/servers/{id}/actions/poweron`,
/// `/tailnet/example.com/keys/k123` → `/tailnet/{tailnet}/keys/{id}`).
pub(crate) fn endpoint_label(path: &str) -> String {
    let mut out = Vec::new();
    let mut prev = "";
    for seg in path.split('/') {
        let label = if prev == "tailnet" {
            "{tailnet}"
        } else if seg.bytes().any(|b| b.is_ascii_digit()) {
            "{id}"
        } else {
            seg
        };
        out.push(label);
        prev = seg;
    }
    out.join("/")
}

/// The metrics code of a failed transport: what went wrong, never the message.
pub(crate) fn transport_code(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

#[cfg(test)]
mod label_tests {
    use super::endpoint_label;

    #[test]
    fn ids_never_reach_a_label() {
        assert_eq!(
            endpoint_label("/servers/42/actions/poweron"),
            "/servers/{id}/actions/poweron"
        );
        assert_eq!(endpoint_label("/actions"), "/actions");
        assert_eq!(
            endpoint_label("/tailnet/-/keys/kAbC1CNTRL"),
            "/tailnet/{tailnet}/keys/{id}"
        );
        assert_eq!(
            endpoint_label("/tailnet/example.com/devices"),
            "/tailnet/{tailnet}/devices"
        );
        assert_eq!(endpoint_label("/device/n0001CNTRL"), "/device/{id}");
    }
}

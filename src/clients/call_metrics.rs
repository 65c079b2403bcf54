//! How a client call is named in metrics: the endpoint label (ids become placeholders, so the
//! label set stays bounded) and the code of a failed transport. Must not put an id, a message
//! or a URL into a label.

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
mod tests {
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

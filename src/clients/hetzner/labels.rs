//! The client's own check of a create request against Hetzner's documented rules (label keys
//! and values, the server name, the `user_data` size), so that a create the API would reject
//! is refused before it costs an attempt. The simulator judges requests by rules of its own
//! (`sim/labels.rs`), so a wrong rule here is caught by the tests rather than agreed with.

use super::error::HetznerError;
use super::models::CreateServerRequest;

/// `user_data` is stored by Hetzner and limited to 32 KiB.
const MAX_USER_DATA: usize = 32 * 1024;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}

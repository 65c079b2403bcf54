//! What client text may reach PostgreSQL. A `text` or `jsonb` value with a NUL (`\u0000`) is
//! refused by PostgreSQL itself; left to the database that is an error after the request was
//! accepted, which would be a 503, and Stripe and the runners retry a 5xx for days. So every
//! string from a request that is stored passes through here first and is decided per field:
//! an identifier (ids, IPs, event types) with a control character is malformed input, a 400;
//! free text meant for a human (a runner's error message) is kept, with each NUL replaced.
//! Must not: log the value.

use super::error::ApiError;

/// `value` as an identifier for `field`: non-empty-or-not is the caller's business, but no
/// control character (NUL above all) is ever accepted.
pub fn identifier<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{field} contains a control character"
        )));
    }
    Ok(value)
}

/// The optional identifier `value` for `field`, checked as [`identifier`].
pub fn opt_identifier<'a>(
    field: &str,
    value: Option<&'a str>,
) -> Result<Option<&'a str>, ApiError> {
    value.map(|v| identifier(field, v)).transpose()
}

/// Free text a human reads later: stored as sent, except that NUL (which PostgreSQL cannot
/// store) becomes U+FFFD, so the message is not lost.
pub fn free_text(value: String) -> String {
    if value.contains('\0') {
        value.replace('\0', "\u{FFFD}")
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_refused_in_identifiers_and_replaced_in_free_text() {
        assert!(identifier("server_id", "4711").is_ok());
        assert!(identifier("server_id", "47\u{0}11").is_err());
        assert!(identifier("server_id", "47\n11").is_err());
        assert_eq!(free_text("disk\u{0}full".into()), "disk\u{FFFD}full");
        assert_eq!(free_text("line one\nline two".into()), "line one\nline two");
    }
}

//! What a failed Hetzner call means: [`HetznerError`] and its [`ErrorClass`], decided by the
//! API's `error.code` (never by HTTP status alone: 409 is both `conflict` and
//! `uniqueness_error`), and whether the client itself may repeat the call.
//! Must not: do I/O.

use crate::clients::retry::Verdict;
use std::time::Duration;

/// What the caller should do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient: try again later (the client already retried idempotent calls).
    Retryable,
    /// `uniqueness_error`: the server exists already; look it up and take it over.
    Adopt,
    /// `resource_unavailable` / `placement_error`: try another location or type.
    Relocate,
    /// The resource does not exist (for a delete: done).
    NotFound,
    /// Retrying cannot help (bad input, auth, quota, protection).
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum HetznerError {
    /// The API answered with an error (its envelope, or a bare status when there was none).
    #[error("hetzner api: {message} ({code}, HTTP {status}, correlation-id {})", correlation_id.as_deref().unwrap_or("-"))]
    Api {
        status: u16,
        /// `error.code`, or empty when the body had no envelope (e.g. a proxy's 502).
        code: String,
        message: String,
        correlation_id: Option<String>,
    },
    /// No usable response: connect error, timeout, broken connection.
    /// `outcome_unknown` is true when the request may have reached the API, which for a create
    /// means the server may exist: adopt by label before creating again.
    #[error("hetzner request failed: {message} (outcome unknown: {outcome_unknown})")]
    Transport {
        message: String,
        timed_out: bool,
        outcome_unknown: bool,
    },
    /// A 2xx whose body we could not read.
    #[error("hetzner response unreadable: {message} (correlation-id {})", correlation_id.as_deref().unwrap_or("-"))]
    Decode {
        message: String,
        correlation_id: Option<String>,
    },
    /// Refused before sending: the API would reject it, and create must not waste an attempt.
    #[error("invalid hetzner request: {0}")]
    InvalidRequest(String),
}

impl HetznerError {
    pub fn class(&self) -> ErrorClass {
        match self {
            HetznerError::Api { status, code, .. } => class_of(*status, code),
            HetznerError::Transport { .. } => ErrorClass::Retryable,
            // The API accepted the call; what happened is unclear, so look again later.
            HetznerError::Decode { .. } => ErrorClass::Retryable,
            HetznerError::InvalidRequest(_) => ErrorClass::Fatal,
        }
    }

    /// The API's `error.code`, if it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            HetznerError::Api { code, .. } if !code.is_empty() => Some(code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            HetznerError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            HetznerError::Api { correlation_id, .. }
            | HetznerError::Decode { correlation_id, .. } => correlation_id.as_deref(),
            _ => None,
        }
    }

    /// True when a create may have taken effect although we got no usable answer: no response
    /// (after the request may have left), or a 2xx we could not read. Adopt by label before
    /// creating again.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            HetznerError::Transport {
                outcome_unknown: true,
                ..
            } | HetznerError::Decode { .. }
        )
    }

    /// Whether the client itself may repeat an idempotent call. Wider than hcloud-go's policy
    /// (which leaves out 503 `unavailable`, 500 and `locked`): for a call that is safe to
    /// repeat, a passing fault of the service must cost a retry, not a job attempt.
    pub(super) fn retry_verdict(&self) -> Verdict {
        match self {
            // The budget already waits for the next token; a backoff on top would only stall.
            HetznerError::Api { status: 429, .. } => Verdict::After(Duration::ZERO),
            HetznerError::Api { .. } | HetznerError::Transport { .. }
                if self.class() == ErrorClass::Retryable =>
            {
                Verdict::Backoff
            }
            _ => Verdict::Stop,
        }
    }
}

fn class_of(status: u16, code: &str) -> ErrorClass {
    match code {
        "conflict" | "rate_limit_exceeded" | "bad_gateway" | "timeout" => ErrorClass::Retryable,
        // Not retried inside the client (hcloud-go does not either), but for the step machine
        // these are passing states of the service or the resource, not a verdict on the job.
        "unavailable" | "maintenance" | "server_error" | "service_error" | "locked"
        | "resource_locked" | "robot_unavailable" => ErrorClass::Retryable,
        "uniqueness_error" => ErrorClass::Adopt,
        "resource_unavailable" | "placement_error" => ErrorClass::Relocate,
        "not_found" => ErrorClass::NotFound,
        "" => match status {
            404 => ErrorClass::NotFound,
            429 | 500..=599 => ErrorClass::Retryable,
            _ => ErrorClass::Fatal,
        },
        // invalid_input, json_error, unauthorized, forbidden, token_readonly, protected,
        // resource_limit_exceeded (a 403 that is a quota, not a rate limit), and codes we do
        // not know: a person has to look.
        _ => ErrorClass::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_class_follows_the_code_not_the_status() {
        let cases = [
            (409, "conflict", ErrorClass::Retryable),
            (409, "uniqueness_error", ErrorClass::Adopt),
            (412, "resource_unavailable", ErrorClass::Relocate),
            (412, "placement_error", ErrorClass::Relocate),
            (403, "resource_limit_exceeded", ErrorClass::Fatal),
            (403, "forbidden", ErrorClass::Fatal),
            (423, "locked", ErrorClass::Retryable),
            (423, "protected", ErrorClass::Fatal),
            (429, "rate_limit_exceeded", ErrorClass::Retryable),
            (404, "not_found", ErrorClass::NotFound),
            (502, "", ErrorClass::Retryable),
            (400, "invalid_input", ErrorClass::Fatal),
            (401, "unauthorized", ErrorClass::Fatal),
        ];
        for (status, code, want) in cases {
            assert_eq!(class_of(status, code), want, "{status} {code}");
        }
    }

    #[test]
    fn client_retries_every_transient_answer_but_no_verdict() {
        let api = |status: u16, code: &str| HetznerError::Api {
            status,
            code: code.into(),
            message: String::new(),
            correlation_id: None,
        };
        for e in [
            api(409, "conflict"),
            api(500, "server_error"),
            api(500, ""),
            api(502, ""),
            api(503, "unavailable"),
            api(504, "timeout"),
            api(423, "locked"),
        ] {
            assert_eq!(e.retry_verdict(), Verdict::Backoff, "{e}");
        }
        assert_eq!(
            api(429, "rate_limit_exceeded").retry_verdict(),
            Verdict::After(Duration::ZERO),
            "the rate budget does the waiting"
        );
        for e in [
            api(409, ""),
            api(409, "uniqueness_error"),
            api(401, "unauthorized"),
            api(423, "protected"),
            api(404, "not_found"),
            api(412, "resource_unavailable"),
        ] {
            assert_eq!(e.retry_verdict(), Verdict::Stop, "{e}");
        }
    }
}

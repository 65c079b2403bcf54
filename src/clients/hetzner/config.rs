//! Hetzner client configuration: where the API is, the token, timeouts and retry patience.
//! Must not: print the token (it is a [`Secret`]).

use crate::secret::Secret;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
pub struct HetznerConfig {
    /// e.g. `https://api.hetzner.cloud/v1`, or the simulator's `http://127.0.0.1:PORT/v1`.
    #[serde(default = "default_base_url")]
    pub base_url: url::Url,
    pub token: Secret,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of idempotent calls after the first attempt (hcloud-go uses 5).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First backoff step; doubles per retry, capped at 60 s, full jitter.
    #[serde(default = "default_retry_base", with = "humantime_serde")]
    pub retry_base: Duration,
}

fn default_base_url() -> url::Url {
    // A constant that parses; covered by `default_config_parses`.
    url::Url::parse("https://api.hetzner.cloud/v1").unwrap_or_else(|_| unreachable!())
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_retries() -> u32 {
    5
}
fn default_retry_base() -> Duration {
    Duration::from_secs(1)
}

impl HetznerConfig {
    pub fn new(base_url: url::Url, token: Secret) -> Self {
        HetznerConfig {
            base_url,
            token,
            request_timeout: default_request_timeout(),
            max_retries: default_max_retries(),
            retry_base: default_retry_base(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses() {
        assert_eq!(default_base_url().as_str(), "https://api.hetzner.cloud/v1");
    }
}

//! The HTTP surface's settings (`[http]` with its secrets read from their files) and the state
//! every handler shares. Must not: print a secret (they are [`Secret`]s).

use crate::config::{HttpConfig, Regions};
use crate::queue::Queue;
use crate::secret::Secret;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot read {key} {path}: {source}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path} is empty")]
    EmptySecret { key: &'static str, path: PathBuf },
    #[error("http.default_region {0:?} is not a configured region")]
    UnknownDefaultRegion(String),
    #[error("cannot listen on {addr:?}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// `[http]` with its secrets read from their files.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub admin_token: Option<Secret>,
    pub stripe_secret: Option<Secret>,
    pub stripe_tolerance: Duration,
    pub runner_secret: Option<Secret>,
    pub runner_require_timestamp: bool,
    pub runner_timestamp_tolerance: Duration,
    pub body_limit: usize,
    pub default_region: String,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub readiness_timeout: Duration,
}

fn read_secret(key: &'static str, path: Option<&Path>) -> Result<Option<Secret>, HttpError> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|source| HttpError::SecretFile {
        key,
        path: path.to_owned(),
        source,
    })?;
    let value = text.trim();
    if value.is_empty() {
        // An empty key would make every HMAC trivially forgeable by anyone who guesses it.
        return Err(HttpError::EmptySecret {
            key,
            path: path.to_owned(),
        });
    }
    Ok(Some(Secret::new(value)))
}

impl HttpSettings {
    /// Reads the secret files named in `config` (systemd credentials).
    pub fn from_config(config: &HttpConfig, regions: &Regions) -> Result<Self, HttpError> {
        if !regions.contains(&config.default_region) {
            return Err(HttpError::UnknownDefaultRegion(
                config.default_region.clone(),
            ));
        }
        Ok(HttpSettings {
            admin_token: read_secret("http.admin_token_file", config.admin_token_file.as_deref())?,
            stripe_secret: read_secret(
                "http.stripe_webhook_secret_file",
                config.stripe_webhook_secret_file.as_deref(),
            )?,
            stripe_tolerance: config.stripe_tolerance,
            runner_secret: read_secret(
                "http.runner_secret_file",
                config.runner_secret_file.as_deref(),
            )?,
            runner_require_timestamp: config.runner_require_timestamp,
            runner_timestamp_tolerance: config.runner_timestamp_tolerance,
            body_limit: config.body_limit,
            default_region: config.default_region.clone(),
            header_read_timeout: config.header_read_timeout,
            body_read_timeout: config.body_read_timeout,
            max_connections: config.max_connections,
            readiness_timeout: config.readiness_timeout,
        })
    }
}

/// What the handlers share.
pub struct HttpState {
    pub queue: Queue,
    pub settings: HttpSettings,
    pub regions: Regions,
    /// For the one pending-migrations check (it needs its own connection).
    database_url: Secret,
    connect_timeout: Duration,
    /// Whether migrations are pending, checked once (at start, or by the first probe after a
    /// failed check) and then remembered: schema changes only come with a new binary, and an
    /// unauthenticated probe must not cost a connection of its own.
    migrations_checked: tokio::sync::OnceCell<bool>,
}

impl HttpState {
    pub fn new(
        queue: Queue,
        settings: HttpSettings,
        regions: Regions,
        database_url: Secret,
        connect_timeout: Duration,
    ) -> Self {
        HttpState {
            queue,
            settings,
            regions,
            database_url,
            connect_timeout,
            migrations_checked: tokio::sync::OnceCell::new(),
        }
    }

    /// Whether this binary's migrations are pending; asks the database only until it answered.
    pub(super) async fn migrations_pending(&self) -> Result<bool, crate::db::DbError> {
        self.migrations_checked
            .get_or_try_init(|| {
                crate::db::pending_migrations(&self.database_url, self.connect_timeout)
            })
            .await
            .copied()
    }
}

//! The HTTP surface: Stripe webhooks, runner callbacks, the status API, the
//! admin API, health, metrics and the OpenAPI document, served by warp.
//!
//! Layout: `routes` (the route table and the one filter), `webhooks` and `api` (handlers, which
//! build their own replies), `signatures` (HMAC and bearer checks), `steps` (the web app's
//! progress steps), `text` (what client text may be stored), `error` (the one error → JSON
//! mapping), `server` (the accept loop: connection cap, header timeout). Must not: do slow work
//! inside a request (webhooks enqueue and return), write anything for a rejected request, or
//! log a secret, signature or body.

mod api;
mod error;
mod routes;
mod server;
mod signatures;
mod steps;
mod text;
mod webhooks;

pub use api::OPENAPI;
pub use routes::ROUTES;

use crate::config::{HttpConfig, Regions};
use crate::queue::Queue;
use crate::secret::Secret;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    async fn migrations_pending(&self) -> Result<bool, crate::db::DbError> {
        self.migrations_checked
            .get_or_try_init(|| {
                crate::db::pending_migrations(&self.database_url, self.connect_timeout)
            })
            .await
            .copied()
    }
}

/// A listener with a backlog of 1024 (the std default is 128): connections beyond the cap wait
/// there in arrival order instead of having their SYNs dropped and retried out of order.
async fn bind(listen: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address to listen on")))
}

/// Binds `listen` (port 0 picks a free port) and serves until `shutdown` fires; in-flight
/// requests finish first. Returns the bound address and the server task.
pub async fn serve(
    state: HttpState,
    listen: &str,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), HttpError> {
    let bind_err = |source| HttpError::Bind {
        addr: listen.to_owned(),
        source,
    };
    let listener = bind(listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    if let Err(e) = state.migrations_pending().await {
        tracing::warn!(error = %e, "cannot check migrations now; /readyz will ask again");
    }
    let limits = server::Limits {
        max_connections: state.settings.max_connections,
        header_read_timeout: state.settings.header_read_timeout,
    };
    tracing::info!(%addr, max_connections = limits.max_connections, "http listening");
    Ok((
        addr,
        tokio::spawn(server::run(listener, Arc::new(state), limits, shutdown)),
    ))
}

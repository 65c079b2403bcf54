//! The HTTP surface (DESIGN.md §7): Stripe webhooks, runner callbacks, the status API, the
//! admin API, health, metrics and the OpenAPI document, served by warp.
//!
//! Layout: `routes` (the route table and the one filter), `webhooks` and `api` (handlers, which
//! build their own replies), `signatures` (HMAC and bearer checks), `steps` (the web app's
//! progress steps), `error` (the one error → JSON mapping). Must not: do slow work inside a
//! request (webhooks enqueue and return), write anything for a rejected request, or log a
//! secret, signature or body.

mod api;
mod error;
mod routes;
mod signatures;
mod steps;
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
        })
    }
}

/// What the handlers share.
pub struct HttpState {
    pub queue: Queue,
    pub settings: HttpSettings,
    pub regions: Regions,
    /// For the readiness check's pending-migrations query.
    pub database_url: Secret,
    pub connect_timeout: Duration,
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
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let server = warp::serve(routes::all(Arc::new(state)))
        .incoming(listener)
        .graceful(shutdown.cancelled_owned())
        .run();
    tracing::info!(%addr, "http listening");
    Ok((addr, tokio::spawn(server)))
}

//! The HTTP surface: Stripe webhooks, runner callbacks, the status API, the
//! admin API, health, metrics and the OpenAPI document, served by warp.
//!
//! Layout: `routes` (the route table and the one filter), `request` (what a handler gets),
//! `webhooks` and `api` (handlers, which build their own replies), `state` (settings and what
//! the handlers share), `signatures` (HMAC and bearer checks), `text` (what client text may be
//! stored), `error` (the one error → JSON mapping), `server` (the accept loop: connection cap,
//! header timeout). The web app's progress steps are the domain's (`domain::Step`). Must not: do slow work
//! inside a request (webhooks enqueue and return), write anything for a rejected request, or
//! log a secret, signature or body.

mod api;
mod error;
mod request;
mod routes;
mod server;
mod signatures;
mod state;
mod text;
mod webhooks;

pub use api::OPENAPI;
pub use routes::ROUTES;
pub use state::{HttpError, HttpSettings, HttpState};

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

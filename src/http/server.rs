//! The accept loop: how many connections are served at once, how long a connection may take to
//! send its request headers, and graceful shutdown. It serves the routes' warp filter through
//! hyper's HTTP/1.1 connection directly, because warp's own `run` has no connection cap and no
//! header timeout (its hyper runs without a timer, so a client that sends nothing holds a file
//! descriptor forever).
//!
//! Policy: at most `max_connections` connections are open. When one more arrives at the cap, the
//! oldest connection that is not answering a request is closed to make room, once it has been
//! open for a short grace (one that is answering is never cut; if every connection is busy,
//! accepting waits). So a flood of idle or
//! half-open connections costs the attacker their own connections, not `/healthz`'s. Every
//! connection must complete its request headers within `header_read_timeout` of being accepted
//! or of its previous response (hyper's timer), so a trickling client is closed too. HTTP/1.1
//! only: our clients (Stripe, runners, Prometheus, the web app) speak it, and hyper's h2 has no
//! header timeout. Must not: look into requests (that is the routes' filter), or log a peer's
//! request data.

use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What bounds a hostile client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// The open connections, oldest first, each with its count of requests being answered.
struct Connections {
    permits: Arc<Semaphore>,
    table: Mutex<BTreeMap<u64, Entry>>,
    next_id: AtomicUsize,
}

struct Entry {
    activity: Arc<Activity>,
    close: CancellationToken,
    accepted: Instant,
}

/// Requests being answered on one connection, and requests it has started ever.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    started: AtomicUsize,
}

/// One admitted connection; dropping it frees its place.
struct Slot {
    id: u64,
    conns: Arc<Connections>,
    activity: Arc<Activity>,
    close: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.table.lock().expect("poisoned").remove(&self.id);
    }
}

impl Connections {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Connections {
            permits: Arc::new(Semaphore::new(max)),
            table: Mutex::new(BTreeMap::new()),
            next_id: AtomicUsize::new(0),
        })
    }

    /// A place for a new connection: free, or made by closing the oldest idle connection once
    /// it has had [`EVICTION_GRACE`], or (every connection busy) the first one that frees up.
    async fn admit(self: &Arc<Self>, shutdown: &CancellationToken) -> Slot {
        let permit = loop {
            if let Ok(p) = self.permits.clone().try_acquire_owned() {
                break p;
            }
            let freed = self.permits.clone().acquire_owned();
            match self.close_oldest_idle() {
                Eviction::Closed | Eviction::NoneIdle => {
                    break freed.await.expect("the semaphore is never closed");
                }
                Eviction::NotBefore(at) => tokio::select! {
                    p = freed => break p.expect("the semaphore is never closed"),
                    _ = tokio::time::sleep_until(at) => continue,
                },
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let activity = Arc::new(Activity::default());
        let close = shutdown.child_token();
        self.table.lock().expect("poisoned").insert(
            id,
            Entry {
                activity: activity.clone(),
                close: close.clone(),
                accepted: Instant::now(),
            },
        );
        Slot {
            id,
            conns: self.clone(),
            activity,
            close,
            _permit: permit,
        }
    }

    fn close_oldest_idle(&self) -> Eviction {
        let table = self.table.lock().expect("poisoned");
        let victim = table
            .values()
            .find(|e| !e.close.is_cancelled() && e.activity.in_flight.load(Ordering::Acquire) == 0);
        let Some(e) = victim else {
            return Eviction::NoneIdle;
        };
        let evictable_at = e.accepted + EVICTION_GRACE;
        if evictable_at > Instant::now() {
            return Eviction::NotBefore(evictable_at);
        }
        crate::metrics::http_connection_evicted();
        e.close.cancel();
        Eviction::Closed
    }
}

/// How long a new connection is safe from eviction: long enough for any real client to send
/// its request headers, so a flood of new connections cannot close a legitimate one before it
/// had a chance (the flood's own connections are then recycled at `max_connections` per grace).
const EVICTION_GRACE: Duration = Duration::from_secs(1);

enum Eviction {
    Closed,
    /// The oldest idle connection becomes evictable then.
    NotBefore(Instant),
    NoneIdle,
}

/// Counts a request as being answered while it lives.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::AcqRel);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves the routes on `listener` until `shutdown` fires, then lets every connection finish
/// the request it is answering and waits for them.
pub async fn run(
    listener: TcpListener,
    state: Arc<super::state::HttpState>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let filter = super::routes::all(state);
    let conns = Connections::new(limits.max_connections);
    let mut tasks = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    accept_error(e, &shutdown).await;
                    continue;
                }
            },
        };
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = conns.admit(&shutdown) => slot,
        };
        let warp_service =
            hyper_util::service::TowerToHyperService::new(warp::service(filter.clone()));
        let activity = slot.activity.clone();
        let service = hyper::service::service_fn(move |req| {
            let busy = Busy::new(&activity);
            let answer = hyper::service::Service::call(&warp_service, req);
            async move {
                let response = answer.await;
                drop(busy);
                response
            }
        });
        tasks.spawn(serve_connection(stream, slot, service, limits));
        // Reap finished tasks so the set does not grow with every connection ever served.
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

async fn accept_error(e: std::io::Error, shutdown: &CancellationToken) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    // EMFILE and friends: the cap keeps us below LimitNOFILE, so this means something else
    // holds descriptors. Back off briefly instead of spinning.
    tracing::warn!(error = %e, "http accept failed");
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        _ = shutdown.cancelled() => {}
    }
}

async fn serve_connection<S>(stream: TcpStream, slot: Slot, service: S, limits: Limits)
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = stream.set_nodelay(true);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    // A header timeout or a client gone mid-request: the client's doing.
                    tracing::debug!(error = %e, "http connection ended");
                }
                break;
            }
            // Evicted at the cap, or shutting down. A connection that never started a request
            // (nothing sent, or half its headers) is dropped at once: hyper's graceful shutdown
            // would wait for its first request to finish, i.e. for the header timeout. One that
            // has answered before is shut down gracefully: hyper finishes a response in
            // progress and closes an idle keep-alive connection at once.
            _ = slot.close.cancelled(), if !closing => {
                if slot.activity.started.load(Ordering::Acquire) == 0 {
                    break;
                }
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
    drop(slot);
}

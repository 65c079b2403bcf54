//! The route table, the one warp filter that serves it, and the per-request frame: body limit,
//! one tracing span, the method/path match, and 404/405 for requests no route takes.
//!
//! Why one filter over a table instead of one filter per route: the table is the single list of
//! what the server answers. The OpenAPI test compares it with `openapi.json`, so the document
//! cannot drift from the routes; and a rejection can never leak out as a non-JSON reply.
//! Must not: log a header value or a body; do the work of a handler.

use super::error::ApiError;
use super::request::Request;
use super::state::HttpState;
use super::{api, webhooks};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use std::sync::Arc;
use tracing::Instrument;
use warp::Filter;
use warp::http::{HeaderMap, Method};
use warp::reply::{Reply, Response};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    StripeWebhook,
    RunnerCallback,
    AgentInstance,
    CreateJob,
    ListJobs,
    GetJob,
    RetryJob,
    CancelJob,
    Sweep,
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
}

/// Every route the server answers: method, path template (`{x}` is one segment), handler.
pub const ROUTES: &[(&str, &str, RouteId)] = &[
    ("POST", "/api/webhooks/stripe", RouteId::StripeWebhook),
    ("POST", "/api/webhooks/github", RouteId::RunnerCallback),
    ("GET", "/api/agents/{id}/instance", RouteId::AgentInstance),
    ("POST", "/api/jobs", RouteId::CreateJob),
    ("GET", "/api/jobs", RouteId::ListJobs),
    ("GET", "/api/jobs/{id}", RouteId::GetJob),
    ("POST", "/api/jobs/{id}/retry", RouteId::RetryJob),
    ("POST", "/api/jobs/{id}/cancel", RouteId::CancelJob),
    ("POST", "/api/admin/sweep", RouteId::Sweep),
    ("GET", "/healthz", RouteId::Healthz),
    ("GET", "/readyz", RouteId::Readyz),
    ("GET", "/metrics", RouteId::Metrics),
    ("GET", "/openapi.json", RouteId::OpenApi),
];

/// Matches `path` against a template; returns the `{x}` segment's value (or "" without one).
fn match_template<'a>(template: &str, path: &'a str) -> Option<Option<&'a str>> {
    let mut param = None;
    let mut got = path.split('/');
    for want in template.split('/') {
        let seg = got.next()?;
        if want.starts_with('{') {
            if seg.is_empty() {
                return None;
            }
            param = Some(seg);
        } else if want != seg {
            return None;
        }
    }
    got.next().is_none().then_some(param)
}

/// The route for `method` and `path`: `Ok` with its parameter, or the 404/405 to answer.
fn find_route<'a>(
    method: &Method,
    path: &'a str,
) -> Result<(&'static str, RouteId, Option<&'a str>), ApiError> {
    let mut allowed: Vec<&str> = Vec::new();
    for (m, template, id) in ROUTES {
        if let Some(param) = match_template(template, path) {
            if *m == method.as_str() {
                return Ok((template, *id, param));
            }
            allowed.push(m);
        }
    }
    if !allowed.is_empty() {
        Err(ApiError::MethodNotAllowed {
            allow: allowed.join(", "),
        })
    } else {
        Err(ApiError::NotFound("no such route".into()))
    }
}

/// Reads the body up to `limit` bytes within `deadline`. A declared or actual length over the
/// limit is a 413, decided before anything is parsed; a body still incomplete at the deadline
/// is a 408 (a client trickling its body must not hold a connection and a handler forever).
async fn read_body<S, B>(
    headers: &HeaderMap,
    stream: S,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<Bytes, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>> + Unpin,
    B: bytes::Buf,
{
    tokio::time::timeout(deadline, read_limited(headers, stream, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout)?
}

async fn read_limited<S, B>(headers: &HeaderMap, stream: S, limit: usize) -> Result<Bytes, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>> + Unpin,
    B: bytes::Buf,
{
    let declared = headers
        .get(warp::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut stream = stream;
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(|_| ApiError::bad_request("unreadable request body"))?;
        if body.len() + chunk.remaining() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            body.extend_from_slice(part);
            chunk.advance(n);
        }
    }
    Ok(body.freeze())
}

/// The whole HTTP surface as one warp filter.
pub fn all(
    state: Arc<HttpState>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::method()
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::any().map(move || state.clone()))
        .then(
            |method: Method,
             path: warp::path::FullPath,
             query: String,
             headers: HeaderMap,
             stream,
             state: Arc<HttpState>| async move {
                let route = find_route(&method, path.as_str());
                let template = route.as_ref().map_or("-", |(t, _, _)| *t);
                let span = tracing::info_span!(
                    "http",
                    method = %method,
                    route = template,
                    status = tracing::field::Empty
                );
                let started = std::time::Instant::now();
                async move {
                    let response = match route {
                        Err(e) => e.into_response(),
                        Ok((_, id, param)) => {
                            let param = param.map(str::to_owned);
                            let settings = &state.settings;
                            let (limit, deadline) =
                                (settings.body_limit, settings.body_read_timeout);
                            match read_body(&headers, Box::pin(stream), limit, deadline).await {
                                Err(e) => e.into_response(),
                                Ok(body) => {
                                    let request = Request {
                                        param,
                                        query,
                                        headers,
                                        body,
                                    };
                                    dispatch(&state, id, request).await
                                }
                            }
                        }
                    };
                    let status = response.status().as_u16();
                    tracing::Span::current().record("status", status);
                    tracing::debug!(
                        latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "request done"
                    );
                    response
                }
                .instrument(span)
                .await
            },
        )
        // Only reached if warp itself refuses a request before our handler runs; the answer is
        // still JSON.
        .recover(|_: warp::Rejection| async {
            Ok::<_, std::convert::Infallible>(
                ApiError::bad_request("unreadable request").into_response(),
            )
        })
        .unify()
}

async fn dispatch(state: &HttpState, id: RouteId, request: Request) -> Response {
    let result = match id {
        RouteId::StripeWebhook => webhooks::stripe(state, request).await,
        RouteId::RunnerCallback => webhooks::runner(state, request).await,
        RouteId::AgentInstance => api::agent_instance(state, request).await,
        RouteId::CreateJob => api::create_job(state, request).await,
        RouteId::ListJobs => api::list_jobs(state, request).await,
        RouteId::GetJob => api::get_job(state, request).await,
        RouteId::RetryJob => api::retry_job(state, request).await,
        RouteId::CancelJob => api::cancel_job(state, request).await,
        RouteId::Sweep => api::sweep(state, request).await,
        RouteId::Healthz => Ok(api::healthz()),
        RouteId::Readyz => api::readyz(state).await,
        RouteId::Metrics => Ok(api::metrics(state).await),
        RouteId::OpenApi => Ok(api::openapi()),
    };
    result.unwrap_or_else(Reply::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_whole_paths_only() {
        assert_eq!(match_template("/api/jobs", "/api/jobs"), Some(None));
        assert_eq!(
            match_template("/api/jobs/{id}", "/api/jobs/x"),
            Some(Some("x"))
        );
        assert_eq!(match_template("/api/jobs/{id}", "/api/jobs/"), None);
        assert_eq!(match_template("/api/jobs/{id}", "/api/jobs/x/y"), None);
        assert_eq!(match_template("/api/jobs", "/api/jobs/"), None);
        assert!(matches!(
            find_route(&Method::DELETE, "/api/jobs"),
            Err(ApiError::MethodNotAllowed { allow }) if allow == "POST, GET"
        ));
        assert!(matches!(
            find_route(&Method::GET, "/nope"),
            Err(ApiError::NotFound(_))
        ));
    }
}

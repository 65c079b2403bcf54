//! Handlers of the status API, the admin API, health, metrics and the OpenAPI document.
//!
//! The status and admin routes need the bearer token from `http.admin_token_file`; without one
//! configured they answer 503 (off), never open. Must not: log the token or a body; write
//! anything before the request is authenticated and validated.

use super::error::{ApiError, json};
use super::request::Request;
use super::signatures::bearer_matches;
use super::state::HttpState;
use crate::db::models::{AgentInstance, Job};
use crate::domain::{Executor, JobStatus, valid_business_key, valid_region_name};
use crate::metrics;
use crate::queue::NewJob;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

/// The OpenAPI document of this server, kept true by `tests/integration/http_openapi.rs`.
pub const OPENAPI: &str = include_str!("openapi.json");

fn authorize(state: &HttpState, req: &Request) -> Result<(), ApiError> {
    let token = state
        .settings
        .admin_token
        .as_ref()
        .ok_or(ApiError::Unready(
            "the admin API is disabled: http.admin_token_file is not configured",
        ))?;
    if bearer_matches(req.header("authorization"), token.expose()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "missing or wrong bearer token".into(),
        ))
    }
}

fn id_param(req: &Request) -> Result<Uuid, ApiError> {
    req.param
        .as_deref()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| ApiError::bad_request("the id in the path is not a UUID"))
}

/// Admin routes take no body except `POST /api/jobs`; anything else sent is refused, not ignored.
fn no_body(req: &Request) -> Result<(), ApiError> {
    if req.body.is_empty() || req.body.iter().all(u8::is_ascii_whitespace) {
        Ok(())
    } else {
        Err(ApiError::bad_request("this route takes no request body"))
    }
}

/// The seed's instance row, in the web app's camelCase.
fn instance_json(i: &AgentInstance) -> serde_json::Value {
    json!({
        "id": i.id, "agentId": i.agent_id, "jobId": i.job_id, "status": i.status,
        "serverId": i.server_id, "serverIp": i.server_ip, "tailscaleIp": i.tailscale_ip,
        "region": i.region, "currentStep": i.current_step, "startedAt": i.started_at,
        "createdAt": i.created_at, "updatedAt": i.updated_at,
    })
}

/// `GET /api/agents/{id}/instance`: the seed's `{instance, steps}`, plus the job behind it.
/// The one-job timeout check runs first, as the seed's dashboard did.
pub async fn agent_instance(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    authorize(state, &req)?;
    no_body(&req)?;
    let agent_id = id_param(&req)?;
    let mut job = state.queue.latest_job_for_agent(agent_id).await?;
    if let Some(j) = &job
        && state.queue.check_job_timeout(j.id).await?
    {
        job = state.queue.get(j.id).await?;
    }
    let instance = state
        .queue
        .instance_for_agent(agent_id, job.as_ref().map(|j| j.id))
        .await?;
    let Some(job) = job else {
        return Err(ApiError::NotFound(
            "No provisioning job for this agent".into(),
        ));
    };
    let step = match job.status() {
        JobStatus::Failed | JobStatus::Cancelled => job.failed_step.as_deref(),
        _ => None,
    }
    .or(instance.as_ref().and_then(|i| i.current_step.as_deref()))
    .or(job.current_step.as_deref());
    Ok(json(
        StatusCode::OK,
        &json!({
            "instance": instance.as_ref().map(instance_json),
            "job": {
                "id": job.id, "status": job.status(), "error": job.error,
                "failedStep": job.failed_step, "currentStep": job.current_step,
            },
            "steps": crate::domain::ui_steps(job.status(), step),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob {
    agent_id: Uuid,
    user_id: Uuid,
    region: Option<String>,
    business_key: Option<String>,
    #[serde(default)]
    executor: Option<Executor>,
    max_retries: Option<i32>,
}

/// `POST /api/jobs`: 201 with a new job, 200 with the one already enqueued for the same key.
pub async fn create_job(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    authorize(state, &req)?;
    let body: CreateJob = serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::bad_request(format!("invalid job: {e}")))?;
    let region = body
        .region
        .unwrap_or_else(|| state.settings.default_region.clone());
    if !valid_region_name(&region) || !state.regions.contains(&region) {
        return Err(ApiError::bad_request(format!(
            "unknown region {region:?}; configured: {}",
            state.regions.names().join(", ")
        )));
    }
    if let Some(key) = &body.business_key
        && !valid_business_key(key)
    {
        return Err(ApiError::bad_request(
            "business_key must be 1-255 of [A-Za-z0-9_-.:]",
        ));
    }
    if body.max_retries.is_some_and(|n| !(0..=100).contains(&n)) {
        return Err(ApiError::bad_request(
            "max_retries must be between 0 and 100",
        ));
    }
    let enqueued = state
        .queue
        .enqueue(&NewJob {
            agent_id: body.agent_id,
            user_id: body.user_id,
            region,
            stripe_event_id: None,
            business_key: body.business_key,
            executor: body.executor.unwrap_or(Executor::Daemon),
            max_retries: body.max_retries,
        })
        .await?;
    let status = if enqueued.created() {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, enqueued.job()))
}

/// Query values stay text until the field that owns them parses them, so `?status=1` is an
/// unknown status (not "an integer where a string was expected") and `?limit=abc` names the
/// limit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
}

/// `GET /api/jobs?status=&limit=`: newest first.
pub async fn list_jobs(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    authorize(state, &req)?;
    no_body(&req)?;
    let q: ListQuery = serde_urlencoded_query(&req.query)?;
    let status = q
        .status
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<JobStatus>())
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let limit = match q.limit.as_deref() {
        None | Some("") => 50,
        Some(text) => text.parse::<i64>().unwrap_or(0),
    };
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let jobs = state.queue.list(status, limit).await?;
    Ok(json(StatusCode::OK, &json!({ "jobs": jobs })))
}

/// The query string as `T` (whose fields take every value as text), with a 400 naming what was
/// wrong. A repeated key is refused rather than silently resolved.
fn serde_urlencoded_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let mut map = serde_json::Map::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()).into_owned() {
        if map.insert(k.clone(), json!(v)).is_some() {
            return Err(ApiError::bad_request(format!(
                "invalid query: {k} is given twice"
            )));
        }
    }
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

/// `GET /api/jobs/{id}`: the job and its timeline.
pub async fn get_job(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    authorize(state, &req)?;
    no_body(&req)?;
    let id = id_param(&req)?;
    let job = state
        .queue
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound("Job not found".into()))?;
    let events = state.queue.events(id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({ "job": job, "events": events }),
    ))
}

/// `POST /api/jobs/{id}/retry`.
pub async fn retry_job(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    authorize(state, &req)?;
    no_body(&req)?;
    let job: Job = state.queue.retry_now(id_param(&req)?).await?;
    tracing::info!(job.id = %job.id, "operator retry");
    Ok(json(StatusCode::OK, &job))
}

/// `POST /api/jobs/{id}/cancel`: queued jobs only.
pub async fn cancel_job(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    authorize(state, &req)?;
    no_body(&req)?;
    let job = state.queue.cancel(id_param(&req)?).await?;
    tracing::info!(job.id = %job.id, "operator cancel");
    Ok(json(StatusCode::OK, &job))
}

/// `POST /api/admin/sweep`: what the sweep retried and failed.
pub async fn sweep(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    authorize(state, &req)?;
    no_body(&req)?;
    let report = state.queue.sweep().await?;
    Ok(json(StatusCode::OK, &report))
}

/// `GET /healthz`: the process answers.
pub fn healthz() -> Response {
    json(StatusCode::OK, &json!({ "status": "ok" }))
}

/// `GET /readyz`: the database answers a pooled query within `http.readiness_timeout` and no
/// migration is pending (checked once, see [`HttpState`]). No probe opens a connection of its
/// own, so unauthenticated probes cannot exhaust the database's sessions.
pub async fn readyz(state: &HttpState) -> Result<Response, ApiError> {
    let check = async {
        state.queue.ping().await?;
        let pending = state.migrations_pending().await.map_err(|e| {
            tracing::warn!(error = %e, "readiness: migration check failed");
            ApiError::Unavailable
        })?;
        Ok::<_, ApiError>(pending)
    };
    let pending = tokio::time::timeout(state.settings.readiness_timeout, check)
        .await
        .map_err(|_| {
            tracing::warn!("readiness: the database did not answer in time");
            ApiError::Unavailable
        })??;
    if pending {
        return Err(ApiError::Unready("migrations are pending"));
    }
    Ok(json(StatusCode::OK, &json!({ "status": "ready" })))
}

/// `GET /metrics`: the registry, with the job gauges read from the database now. If the
/// database does not answer, the process metrics are still served (the gauges keep their last
/// values), so a scrape shows the outage instead of failing.
pub async fn metrics(state: &HttpState) -> Response {
    match state.queue.count_by_status().await {
        Ok(counts) => metrics::set_jobs_by_status(&counts),
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count jobs"),
    }
    match state.queue.oldest_queued_age().await {
        Ok(age) => metrics::set_oldest_queued_age(age),
        Err(e) => tracing::warn!(error = %e, "metrics: cannot read queue age"),
    }
    warp::reply::with_header(
        metrics::encode_text(),
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
    .into_response()
}

/// `GET /openapi.json`.
pub fn openapi() -> Response {
    warp::reply::with_header(OPENAPI, "content-type", "application/json").into_response()
}

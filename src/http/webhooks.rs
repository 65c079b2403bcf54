//! Handlers of the two inbound webhooks: Stripe's payment events and the runners' HMAC status
//! callbacks (the seed's protocol, byte-compatible: seeds 001, 000, 004).
//!
//! Order in both: verify the signature over the raw bytes first, parse second, write last, so an
//! unauthentic or malformed request changes nothing. Must not: do slow work (enqueue and
//! return), log a body, a header value or a secret.

use super::error::{ApiError, json};
use super::request::Request;
use super::signatures::{self, SignatureError};
use super::state::HttpState;
use super::text;
use crate::domain::{Executor, Step, valid_business_key};
use crate::metrics;
use crate::queue::{
    Enqueued, ExternalEnd, Fence, NewJob, QueueError, StripeEventRecord, VmMetadata,
};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The event types that pay for a VM.
const COMPLETED: &str = "checkout.session.completed";
const ASYNC_SUCCEEDED: &str = "checkout.session.async_payment_succeeded";

#[derive(Deserialize)]
struct StripeEvent {
    id: String,
    /// Missing is treated as an unhandled type (acknowledged and recorded), not malformed.
    #[serde(rename = "type", default)]
    event_type: String,
    #[serde(default)]
    data: Option<StripeData>,
}

#[derive(Deserialize)]
struct StripeData {
    object: serde_json::Value,
}

/// `POST /api/webhooks/stripe`.
pub async fn stripe(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    let secret = state
        .settings
        .stripe_secret
        .as_ref()
        .ok_or(ApiError::Unready(
            "Stripe webhooks are disabled: http.stripe_webhook_secret_file is not configured",
        ))?;
    if let Err(e) = signatures::verify_stripe(
        req.header("stripe-signature"),
        &req.body,
        secret.expose(),
        state.settings.stripe_tolerance,
        now_unix(),
    ) {
        metrics::webhook("stripe", "bad_signature");
        tracing::info!(reason = %e, "stripe webhook refused");
        return Err(match e {
            SignatureError::Missing | SignatureError::Malformed => {
                ApiError::bad_request(e.to_string())
            }
            _ => ApiError::Unauthorized(e.to_string()),
        });
    }
    let event: StripeEvent = serde_json::from_slice(&req.body).map_err(|_| {
        metrics::webhook("stripe", "bad_json");
        ApiError::bad_request("Invalid JSON")
    })?;
    if event.id.is_empty() || event.id.len() > 255 || event.id.chars().any(char::is_control) {
        return Err(ApiError::bad_request("invalid event id"));
    }
    text::identifier("type", &event.event_type)?;
    if let Some(seen) = state.queue.find_stripe_event(&event.id).await? {
        metrics::webhook("stripe", "duplicate");
        return Ok(reply(&seen, true));
    }
    let session = event.data.as_ref().map(|d| &d.object);
    // Kept for lookups only when it is a well-formed id (an ill-formed one is not actionable
    // anyway, and may hold a NUL that PostgreSQL refuses).
    let session_id = session
        .and_then(|s| s.get("id"))
        .and_then(|v| v.as_str())
        .filter(|s| valid_business_key(s))
        .map(str::to_owned);
    let record = |outcome: &str, reason: Option<String>, job_id: Option<Uuid>| StripeEventRecord {
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        outcome: outcome.to_owned(),
        reason,
        job_id,
    };
    let record = match order_from(state, &event, session) {
        Decision::Ignore => record("ignored", Some("event type not handled".into()), None),
        Decision::NotActionable(reason) => {
            tracing::warn!(event.id = %event.id, reason = %reason, "authentic Stripe event not actionable");
            record("not_actionable", Some(reason), None)
        }
        Decision::Enqueue(job) => match state.queue.enqueue(&job).await {
            Ok(Enqueued::Created(job)) => {
                tracing::info!(event.id = %event.id, job.id = %job.id, "paid order enqueued");
                record("enqueued", None, Some(job.id))
            }
            Ok(Enqueued::Existing(job)) => record(
                "duplicate",
                Some("this purchase is already enqueued".into()),
                Some(job.id),
            ),
            // Refused orders are acknowledged (2xx) and kept with their reason: Stripe would
            // retry a non-2xx for days, and the agent would still not exist; the paid order stays
            // visible in stripe_events for an operator, who can enqueue it once it is fixed.
            Err(
                e @ (QueueError::AgentOfAnotherUser { .. }
                | QueueError::UnknownAgent { .. }
                | QueueError::UnknownUser { .. }),
            ) => {
                let reason = match e {
                    QueueError::AgentOfAnotherUser { .. } => {
                        "metadata.agent_id belongs to another user".to_owned()
                    }
                    QueueError::UnknownAgent { agent } => {
                        format!("metadata.agent_id {agent} does not exist")
                    }
                    _ => format!("metadata.user_id {} does not exist", job.user_id),
                };
                tracing::warn!(event.id = %event.id, reason = %reason, "paid order refused");
                record("not_actionable", Some(reason), None)
            }
            Err(e) => return Err(e.into()),
        },
    };
    state
        .queue
        .record_stripe_event(&record, session_id.as_deref())
        .await?;
    metrics::webhook("stripe", &record.outcome);
    Ok(reply(&record, false))
}

fn reply(record: &StripeEventRecord, duplicate_delivery: bool) -> Response {
    json(
        StatusCode::OK,
        &json!({
            "received": true,
            "outcome": if duplicate_delivery { "duplicate" } else { record.outcome.as_str() },
            "reason": record.reason,
            "job_id": record.job_id,
        }),
    )
}

enum Decision {
    Ignore,
    NotActionable(String),
    Enqueue(NewJob),
}

/// What a verified event asks for. Metadata keys: `agent_id`, `user_id`, optional `region`.
fn order_from(
    state: &HttpState,
    event: &StripeEvent,
    session: Option<&serde_json::Value>,
) -> Decision {
    if event.event_type != COMPLETED && event.event_type != ASYNC_SUCCEEDED {
        return Decision::Ignore;
    }
    let Some(session) = session else {
        return Decision::NotActionable("event has no data.object".into());
    };
    let text =
        |v: &serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_str()).map(str::to_owned);
    if event.event_type == COMPLETED && text(session, "payment_status").as_deref() != Some("paid") {
        return Decision::NotActionable(
            "payment_status is not paid; waiting for async_payment_succeeded".into(),
        );
    }
    let Some(session_id) = text(session, "id").filter(|s| valid_business_key(s)) else {
        return Decision::NotActionable("session id missing or malformed".into());
    };
    let meta = session.get("metadata").cloned().unwrap_or_default();
    let uuid = |key: &str| text(&meta, key).and_then(|s| s.parse::<Uuid>().ok());
    let (Some(agent_id), Some(user_id)) = (uuid("agent_id"), uuid("user_id")) else {
        return Decision::NotActionable(
            "metadata.agent_id or metadata.user_id missing or not a UUID".into(),
        );
    };
    let region = text(&meta, "region").unwrap_or_else(|| state.settings.default_region.clone());
    if !state.regions.contains(&region) {
        return Decision::NotActionable(format!(
            "metadata.region {region:?} is not a configured region"
        ));
    }
    Decision::Enqueue(NewJob {
        agent_id,
        user_id,
        region,
        stripe_event_id: Some(event.id.clone()),
        business_key: Some(session_id),
        executor: Executor::Daemon,
        max_retries: None,
    })
}

/// The seed's callback payload. Every field is optional here so that the seed's own messages
/// ("Missing job_id", "Missing status or type") can be given.
#[derive(Deserialize)]
struct Callback {
    job_id: Option<String>,
    status: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    workflow_run_id: Option<String>,
    error: Option<String>,
    failed_step: Option<String>,
    step: Option<String>,
    server_id: Option<String>,
    server_ip: Option<String>,
    tailscale_ip: Option<String>,
}

/// `POST /api/webhooks/github`: seed 004's routing order is heartbeat → step → running with
/// metadata → status.
pub async fn runner(state: &HttpState, req: Request) -> Result<Response, ApiError> {
    let secret = state
        .settings
        .runner_secret
        .as_ref()
        .ok_or(ApiError::Unready(
            "runner callbacks are disabled: http.runner_secret_file is not configured",
        ))?;
    if let Err(e) = signatures::verify_runner(
        req.header("x-signature"),
        req.header("x-signature-timestamp"),
        &req.body,
        secret.expose(),
        state.settings.runner_require_timestamp,
        state.settings.runner_timestamp_tolerance,
        now_unix(),
    ) {
        metrics::webhook("runner", "bad_signature");
        tracing::info!(reason = %e, "runner callback refused");
        return Err(ApiError::Unauthorized("Invalid signature".into()));
    }
    let cb: Callback = serde_json::from_slice(&req.body).map_err(|_| {
        metrics::webhook("runner", "bad_json");
        ApiError::bad_request("Invalid JSON")
    })?;
    let job_id = match cb.job_id.as_deref() {
        None | Some("") => return Err(ApiError::bad_request("Missing job_id")),
        Some(id) => id
            .parse::<Uuid>()
            .map_err(|_| ApiError::bad_request("Invalid job_id"))?,
    };
    // Identifiers with a NUL or another control character are malformed (PostgreSQL would
    // refuse the NUL); the free-text fields keep their message.
    let workflow_run_id = text::opt_identifier("workflow_run_id", cb.workflow_run_id.as_deref())?;
    for (field, value) in [
        ("server_id", &cb.server_id),
        ("server_ip", &cb.server_ip),
        ("tailscale_ip", &cb.tailscale_ip),
    ] {
        text::opt_identifier(field, value.as_deref())?;
    }
    let status = cb.status.as_deref();
    let outcome = if cb.kind.as_deref() == Some("heartbeat") {
        state
            .queue
            .external_heartbeat(job_id)
            .await
            .map(|_| "heartbeat")
    } else if let (Some(step), None | Some("provisioning")) = (cb.step.as_deref(), status) {
        if Step::parse(step).is_none() {
            return Err(ApiError::bad_request("Unknown step"));
        }
        // A step at or before the job's current one is a replay (or a duplicate delivery):
        // acknowledged, and nothing moves or is recorded.
        state
            .queue
            .external_step(job_id, step, &Step::names())
            .await
            .map(|advanced| {
                if advanced.is_some() {
                    "step"
                } else {
                    "stale_step"
                }
            })
    } else {
        match (status, &cb.server_id, &cb.server_ip, &cb.tailscale_ip) {
            (Some("running"), Some(server_id), Some(server_ip), Some(tailscale_ip))
                if !server_id.is_empty() && !server_ip.is_empty() && !tailscale_ip.is_empty() =>
            {
                let meta = VmMetadata {
                    server_id: server_id.clone(),
                    server_ip: server_ip.clone(),
                    tailscale_ip: tailscale_ip.clone(),
                };
                state
                    .queue
                    .complete_with_metadata(job_id, Fence::External, &meta)
                    .await
                    .map(|_| "completed")
            }
            (Some("provisioning"), ..) => state
                .queue
                .start_external(job_id, workflow_run_id)
                .await
                .map(|_| "started"),
            (Some("running"), ..) => state
                .queue
                .end_external(job_id, &ExternalEnd::Running)
                .await
                .map(|_| "running"),
            (Some("failed"), ..) => {
                let end = ExternalEnd::Failed {
                    error: text::free_text(
                        cb.error.unwrap_or_else(|| "runner reported failure".into()),
                    ),
                    failed_step: cb.failed_step.map(text::free_text),
                };
                state
                    .queue
                    .end_external(job_id, &end)
                    .await
                    .map(|_| "failed")
            }
            (Some(_), ..) => return Err(ApiError::bad_request("Invalid status")),
            (None, ..) => return Err(ApiError::bad_request("Missing status or type")),
        }
    };
    match outcome {
        Ok(what) => {
            metrics::webhook("runner", what);
            tracing::info!(job.id = %job_id, callback = what, "runner callback applied");
            Ok(json(StatusCode::OK, &json!({ "received": true })))
        }
        Err(e) => {
            metrics::webhook("runner", "refused");
            Err(e.into())
        }
    }
}

//! The one mapping from what went wrong to an HTTP status and a `{"error": "..."}` body.
//!
//! Must not: put a secret, signature, token or request body in a message. Database trouble is a
//! 503 (the request may be retried), never a 500 blamed on the input.

use crate::queue::QueueError;
use serde::Serialize;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    /// The path exists with other methods, which the `Allow` header lists.
    #[error("method not allowed")]
    MethodNotAllowed { allow: String },
    #[error("{0}")]
    Conflict(String),
    /// Well-formed, but it names something that does not exist (an adopted database's agent or
    /// user): retrying the same request cannot succeed.
    #[error("{0}")]
    Unprocessable(String),
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The body did not arrive within `http.body_read_timeout`; the connection is closed.
    #[error("request body not received in time")]
    RequestTimeout,
    /// Not ready to serve this: a feature whose secret is not configured, or pending migrations.
    #[error("{0}")]
    Unready(&'static str),
    #[error("database unavailable, try again")]
    Unavailable,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unready(_) | ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::NotFound(_) => ApiError::NotFound("Job not found".into()),
            QueueError::IllegalTransition { .. } | QueueError::AgentOfAnotherUser { .. } => {
                ApiError::Conflict(e.to_string())
            }
            QueueError::UnknownAgent { .. } | QueueError::UnknownUser { .. } => {
                ApiError::Unprocessable(e.to_string())
            }
            // A lease error cannot come from the HTTP paths (they write unfenced or as external).
            QueueError::LeaseLost(_) => ApiError::Conflict(e.to_string()),
            QueueError::Db(db) => {
                tracing::warn!(error = %db, "database error while serving a request");
                ApiError::Unavailable
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let mut response = warp::reply::with_status(
            warp::reply::json(&ErrorBody { error: &message }),
            self.status(),
        )
        .into_response();
        use warp::http::{HeaderValue, header};
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    headers.insert(header::ALLOW, v);
                }
            }
            // The rest of the body may still be trickling in; this connection is done.
            ApiError::RequestTimeout => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// A JSON reply with `status`.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

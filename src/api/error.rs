//! The management API's one error type and its JSON body `{"error": {"message", "code"}}`.
//!
//! Every handler returns `Result<_, ApiError>`; this is the only place an error becomes an HTTP
//! response, so statuses and codes stay consistent. Bad input is always a 4xx with a message
//! that says what to fix; 5xx is reserved for the server's own failures, whose details are
//! logged rather than returned.
//!
//! Not here: deciding who may do what (`api::auth`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::failures::Throttled;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed query parameters, `q` terms, cursors, ids or non-JSON bodies.
    #[error("{0}")]
    BadRequest(String),
    /// No usable Tollgate key.
    #[error("a valid Tollgate key is required: send `Authorization: Bearer tg_...`")]
    Unauthorized,
    /// The caller's address failed authentication too often; its key was not looked up.
    #[error("{0}")]
    TooManyRequests(Throttled),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// No route at this path (as opposed to a missing record).
    #[error("no API route {0}")]
    NoRoute(String),
    #[error("{0}")]
    Conflict(String),
    /// Well-formed JSON whose content cannot be accepted.
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    /// The server's fault; the detail goes to the log, not to the client.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::NoRoute(_) => "no_route",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unprocessable(_) => "invalid",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn admin_only() -> ApiError {
        ApiError::Forbidden("this route is for admins only".into())
    }
}

/// The error body of every non-2xx response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, for a person.
    pub message: String,
    /// `bad_request`, `unauthorized`, `too_many_requests`, `forbidden`, `not_found`,
    /// `no_route`, `conflict`, `invalid`, `unavailable` or `internal`.
    pub code: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "management API request failed");
        }
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                code: self.code().to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::TooManyRequests(throttled) = &self {
            let secs = throttled.retry_after.as_secs().max(1);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(what) => ApiError::Conflict(format!("{what} already exists")),
            StoreError::Invalid(msg) => ApiError::Unprocessable(msg),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

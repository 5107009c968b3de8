//! Operational routes of the admin listener: `/metrics`, `/healthz`, `/readyz`, the proxy's CA
//! certificate and the OpenAPI document.
//!
//! `/metrics`, `/healthz`, `/readyz` and the CA certificate need no key (scrapers, probes and
//! clients installing the CA have none; nothing there is secret). The OpenAPI document is under
//! `/api/v2` and, like the rest of it, needs a key.
//!
//! Not here: the document's contents (generated from the handlers' annotations in `api`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use crate::app::AppState;
use crate::front_door::descriptors::{self, DescriptorPlan, DescriptorUsage};
use crate::telemetry;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `ready` or `unavailable`.
    pub status: String,
    /// Why the database is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Why interceptions are not being written (held in memory or spilled to disk meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorder: Option<String>,
    /// File descriptors: the open-file limit, how many are open, the headroom between them,
    /// and what the listeners' capacities need at most (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub descriptors: Option<DescriptorUsage>,
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security(()),
    responses((status = 200, content_type = "text/plain", body = String))
)]
pub async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::prometheus().render(),
    )
        .into_response()
}

/// Liveness.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        database: None,
        recorder: None,
        descriptors: None,
    })
}

/// Readiness: the database answers, the schema is in place, and the recorder can write (a
/// replica whose writes fail, e.g. a locked or full SQLite file, should get no new traffic).
/// The body also reports the descriptor headroom (informational: it does not change the
/// status; the listeners refuse connections before the limit is reached).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, body = Health),
        (status = 503, body = Health),
    )
)]
pub async fn readyz(
    State(state): State<Arc<AppState>>,
    plan: Option<Extension<DescriptorPlan>>,
) -> Response {
    let fds = plan.and_then(|Extension(plan)| descriptors::usage(&plan));
    let database =
        match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("timed out".to_string()),
        };
    let recorder = state.recorder.problem();
    if database.is_none() && recorder.is_none() {
        return Json(Health {
            status: "ready".into(),
            database: None,
            recorder: None,
            descriptors: fds,
        })
        .into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(Health {
            status: "unavailable".into(),
            database,
            recorder,
            descriptors: fds,
        }),
    )
        .into_response()
}

/// The proxy front door's CA certificate (PEM), for clients to trust.
#[utoipa::path(
    get,
    path = "/api/v2/aibridge/proxy/ca-cert.pem",
    tag = "proxy",
    security(()),
    responses(
        (status = 200, content_type = "application/x-pem-file", body = String),
        (status = 404, description = "The proxy is not enabled", body = ErrorBody),
        (status = 503, description = "The certificate file cannot be read", body = ErrorBody),
    )
)]
pub async fn ca_cert(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let proxy = &state.config().proxy;
    if !proxy.enabled {
        return Err(ApiError::NotFound(
            "the proxy front door is not enabled (proxy.enabled = false), so there is no CA certificate to serve".into(),
        ));
    }
    match tokio::fs::read(&proxy.ca_cert).await {
        Ok(pem) => Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response()),
        Err(e) => {
            tracing::warn!(path = %proxy.ca_cert.display(), error = %e, "cannot read proxy.ca_cert");
            Err(ApiError::Unavailable(
                "the proxy CA certificate cannot be read (see the server log)".into(),
            ))
        }
    }
}

/// This API's OpenAPI 3 document.
#[utoipa::path(
    get,
    path = "/api/v2/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "OpenAPI 3 document", content_type = "application/json", body = Object),
        (status = 401, body = ErrorBody),
    )
)]
pub async fn openapi(_caller: Caller, Extension(doc): Extension<OpenApiJson>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], doc.0).into_response()
}

/// The OpenAPI document, rendered once when the router is built.
#[derive(Clone, Debug)]
pub struct OpenApiJson(pub Bytes);

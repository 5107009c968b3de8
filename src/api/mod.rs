//! The admin listener: management REST API, `/metrics`, `/healthz`, `/readyz`.
//!
//! Runs on Tollgate's background runtime (not on the proxy threads), so a slow admin query
//! never competes with provider traffic for a worker.
//!
//! Not here: provider traffic (gateway) and the queries themselves (store).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::gateway::GatewayState;
use crate::telemetry;

/// Builds the admin router.
pub fn router(state: Arc<GatewayState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::prometheus().render(),
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when the database answers and the schema is in place.
async fn readyz(State(state): State<Arc<GatewayState>>) -> Response {
    match tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unavailable", "database": e.to_string() })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unavailable", "database": "timed out" })),
        )
            .into_response(),
    }
}

//! `GET /api/v2/seats`: AI seat use against the licensed limit, and who holds the seats.
//!
//! A user holds a seat from their first interception for as long as they stay active (an
//! interception within the last `seats.active_days` days). The status and its message come from
//! `governance::seats`.
//!
//! Not here: recording seat holders (the recorder) or the seat metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::Uri;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::extract::Params;
use super::interceptions::Initiator;
use crate::app::AppState;
use crate::governance::seats::seat_status;

#[derive(Debug, Serialize, ToSchema)]
pub struct SeatHolder {
    pub user: Initiator,
    pub first_used_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SeatsReport {
    /// Licensed seats (`seats.limit`); null = unlimited.
    pub limit: Option<u32>,
    /// Users holding a seat.
    pub actual: u32,
    /// ⌊actual × 100 / limit⌋; null when unlimited.
    pub percent: Option<u32>,
    /// `ok`, `warning` (≥ 90 %) or `over` (above the limit).
    pub state: String,
    pub message: Option<String>,
    /// Earliest seat first.
    pub holders: Vec<SeatHolder>,
}

/// Seat use and holders.
#[utoipa::path(
    get,
    path = "/api/v2/seats",
    tag = "seats",
    responses(
        (status = 200, body = SeatsReport),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub async fn seats(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    uri: Uri,
) -> Result<Json<SeatsReport>, ApiError> {
    Params::from_uri(&uri, &[])?;
    let since = Utc::now() - chrono::Duration::days(i64::from(state.config().seats.active_days));
    let holders = state.store.queries().seat_holders(since).await?;
    let actual = u32::try_from(holders.len()).unwrap_or(u32::MAX);
    let status = seat_status(state.config().seats.limit, actual);
    Ok(Json(SeatsReport {
        limit: status.limit,
        actual: status.actual,
        percent: status.percent,
        state: status.state.as_str().to_string(),
        message: status.message,
        holders: holders
            .into_iter()
            .map(|h| SeatHolder {
                user: Initiator::new(h.user_id, h.username),
                first_used_at: h.first_used_at,
                last_used_at: h.last_used_at,
            })
            .collect(),
    }))
}

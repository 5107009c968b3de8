//! `GET /api/v2/usage`: token and cost rollups per user, group, model, provider, client or UTC
//! day, over interceptions started in `[from, to)`. Sums are exact integers (nano-USD, tokens).
//!
//! Not here: budgets or what a user may still spend (`/api/v2/users/me/budget`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::Uri;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_time_or_date, Params};
use super::interceptions::{Initiator, TokenUsage};
use super::query::resolve_initiator;
use crate::app::AppState;
use crate::store::{UsageFilter, UsageGroupBy};

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageGroupRef {
    pub id: Uuid,
    pub name: String,
}

/// Usage of one group key.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageRollup {
    /// User id, group id, model, provider, client or `YYYY-MM-DD` (UTC).
    pub key: String,
    /// For `group_by=user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Initiator>,
    /// For `group_by=group`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<UsageGroupRef>,
    pub token_usage: TokenUsage,
    pub cost_usd: String,
    pub cost_nano_usd: i64,
    pub interception_count: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    /// `user`, `group`, `model`, `provider`, `client` or `day`.
    pub group_by: String,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Number of rollups.
    pub count: usize,
    /// Ordered by key.
    pub results: Vec<UsageRollup>,
}

fn group_by(text: &str) -> Result<UsageGroupBy, ApiError> {
    Ok(match text {
        "user" => UsageGroupBy::User,
        "group" => UsageGroupBy::Group,
        "model" => UsageGroupBy::Model,
        "provider" => UsageGroupBy::Provider,
        "client" => UsageGroupBy::Client,
        "day" => UsageGroupBy::Day,
        other => {
            return Err(ApiError::BadRequest(format!(
                "group_by `{other}` must be one of user, group, model, provider, client, day"
            )))
        }
    })
}

/// Usage rollups.
///
/// Members see only their own usage (`user` may only name themselves). In the `group` rollup a
/// user in several groups counts in each, and users in no group are left out.
#[utoipa::path(
    get,
    path = "/api/v2/usage",
    tag = "usage",
    params(
        ("group_by" = Option<String>, Query, description = "user (default), group, model, provider, client or day."),
        ("from" = Option<String>, Query, description = "Interceptions started at or after: RFC 3339, or YYYY-MM-DD (that day's start, UTC)."),
        ("to" = Option<String>, Query, description = "Interceptions started before: RFC 3339, or YYYY-MM-DD (inclusive: up to the next day's start)."),
        ("user" = Option<String>, Query, description = "User id, username or `me`."),
        ("model" = Option<String>, Query, description = "Only this model."),
    ),
    responses(
        (status = 200, body = UsageReport),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub async fn usage(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    uri: Uri,
) -> Result<Json<UsageReport>, ApiError> {
    let params = Params::from_uri(&uri, &["group_by", "from", "to", "user", "model"])?;
    let group_name = params.get("group_by").unwrap_or("user");
    let grouping = group_by(group_name)?;
    let from = params
        .get("from")
        .map(|t| parse_time_or_date("from", t, false))
        .transpose()?;
    let to = params
        .get("to")
        .map(|t| parse_time_or_date("to", t, true))
        .transpose()?;
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            return Err(ApiError::BadRequest("from must be earlier than to".into()));
        }
    }
    let filter = UsageFilter {
        from,
        to,
        user_id: resolve_initiator(&caller, params.get("user"), &state.store).await?,
        model: params.get("model").map(str::to_string),
    };
    let rows = state.store.queries().usage(grouping, &filter).await?;
    let results: Vec<UsageRollup> = rows
        .into_iter()
        .map(|r| {
            let id = uuid::Uuid::parse_str(&r.key).ok();
            UsageRollup {
                user: match (grouping, id) {
                    (UsageGroupBy::User, Some(id)) => Some(Initiator::new(id, r.label.clone())),
                    _ => None,
                },
                group: match (grouping, id) {
                    (UsageGroupBy::Group, Some(id)) => Some(UsageGroupRef {
                        id,
                        name: r.label.clone().unwrap_or_default(),
                    }),
                    _ => None,
                },
                key: r.key,
                token_usage: r.usage.into(),
                cost_usd: r.cost.to_usd_string(),
                cost_nano_usd: r.cost.0,
                interception_count: r.interception_count,
            }
        })
        .collect();
    Ok(Json(UsageReport {
        group_by: group_name.to_string(),
        from,
        to,
        count: results.len(),
        results,
    }))
}

//! The caller's own governance state: `GET /api/v2/users/me/budget` and the write-only personal
//! provider keys under `/api/v2/users/me/provider-keys`.
//!
//! Any authenticated user may use these, for themselves only. A stored key is encrypted at rest
//! (`governance::keyvault`) and is never returned: only its provider, masked hint and time.
//!
//! Not here: deciding which key a request uses (the gateway's key policy) or cap arithmetic
//! (`governance`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath};
use crate::app::AppState;
use crate::store::mask_secret;

/// The caller's spend cap for the current period.
#[derive(Debug, Serialize, ToSchema)]
pub struct MyBudget {
    /// `day`, `week` or `month` (UTC calendar).
    pub period: String,
    pub period_start: DateTime<Utc>,
    /// When the period resets (RFC 3339).
    pub reset_at: DateTime<Utc>,
    /// The cap as a decimal USD string; null = no cap.
    pub limit_usd: Option<String>,
    pub limit_nano_usd: Option<i64>,
    pub spent_usd: String,
    pub spent_nano_usd: i64,
    /// Reserved by requests in flight right now.
    pub reserved_nano_usd: i64,
    /// Null = no cap.
    pub remaining_usd: Option<String>,
    pub remaining_nano_usd: Option<i64>,
    /// Which cap applies: `user`, `group`, `default`, or `none`.
    pub scope: String,
    /// The group whose cap applies, when `scope` is `group`.
    pub group: Option<String>,
}

/// The caller's cap, spend, remaining budget, winning scope and reset time.
#[utoipa::path(
    get,
    path = "/api/v2/users/me/budget",
    tag = "budgets",
    responses((status = 200, body = MyBudget), (status = 401, body = ErrorBody))
)]
pub async fn my_budget(State(state): State<Arc<AppState>>, Caller(me): Caller) -> Json<MyBudget> {
    let view = state
        .governance
        .budget_view(me.user_id, &me.group_ids, Utc::now());
    let (scope, group) = match &view.scope {
        None => ("none".to_string(), None),
        Some(s) => (
            s.as_str().to_string(),
            match s {
                crate::governance::budget::LimitScope::Group(name) => Some(name.clone()),
                _ => None,
            },
        ),
    };
    let period = match state.config().budgets.period {
        crate::config::BudgetPeriod::Day => "day",
        crate::config::BudgetPeriod::Week => "week",
        crate::config::BudgetPeriod::Month => "month",
    };
    let remaining = view.remaining();
    Json(MyBudget {
        period: period.to_string(),
        period_start: view.period_start,
        reset_at: view.reset,
        limit_usd: view.cap.map(|c| c.to_usd_string()),
        limit_nano_usd: view.cap.map(|c| c.0),
        spent_usd: view.spent.to_usd_string(),
        spent_nano_usd: view.spent.0,
        reserved_nano_usd: view.reserved.0,
        remaining_usd: remaining.map(|r| r.to_usd_string()),
        remaining_nano_usd: remaining.map(|r| r.0),
        scope,
        group,
    })
}

/// A stored personal provider key, as it may be shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoredKey {
    pub provider: String,
    /// Masked: `sk-…abcd`.
    pub hint: String,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StoredKeyList {
    pub count: usize,
    pub keys: Vec<StoredKey>,
}

/// The caller's stored provider keys (hints only).
#[utoipa::path(
    get,
    path = "/api/v2/users/me/provider-keys",
    tag = "users",
    responses((status = 200, body = StoredKeyList), (status = 401, body = ErrorBody))
)]
pub async fn list_provider_keys(
    State(state): State<Arc<AppState>>,
    Caller(me): Caller,
) -> Result<Json<StoredKeyList>, ApiError> {
    let keys: Vec<StoredKey> = state
        .store
        .provider_key_hints(me.user_id)
        .await?
        .into_iter()
        .map(|(provider, hint, updated_at)| StoredKey {
            provider,
            hint,
            updated_at,
        })
        .collect();
    Ok(Json(StoredKeyList {
        count: keys.len(),
        keys,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetProviderKey {
    /// The provider API key; stored encrypted, never shown again.
    pub api_key: String,
}

/// Stores (or replaces) the caller's own key for a provider. Write-only.
#[utoipa::path(
    put,
    path = "/api/v2/users/me/provider-keys/{provider}",
    tag = "users",
    params(("provider" = String, Path, description = "Provider route name")),
    request_body = SetProviderKey,
    responses(
        (status = 200, body = StoredKey),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
pub async fn put_provider_key(
    State(state): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(provider): ApiPath<String>,
    ApiJson(body): ApiJson<SetProviderKey>,
) -> Result<Json<StoredKey>, ApiError> {
    let route = state
        .provider(&provider)
        .ok_or_else(|| ApiError::NotFound(format!("no provider {provider:?}")))?;
    if route.kind == crate::providers::ProviderKind::Copilot {
        return Err(ApiError::Conflict(
            "copilot always uses the client's own GitHub token; nothing to store".into(),
        ));
    }
    let vault = state.vault.as_ref().ok_or_else(|| {
        ApiError::Conflict("personal provider keys are not allowed by this gateway's key policy (keys.allow_user_api_key = false)".into())
    })?;
    let key = body.api_key.trim();
    if key.is_empty() || key.len() > 4096 || key.chars().any(|c| c.is_control() || c == ' ') {
        return Err(ApiError::Unprocessable(
            "api_key must be a non-empty key without spaces".into(),
        ));
    }
    if crate::store::contains_tollgate_key(key) {
        return Err(ApiError::Unprocessable(
            "api_key is a Tollgate key, not a provider key: store the key the provider issued you"
                .into(),
        ));
    }
    let sealed = vault.seal(&me.user_id.to_string(), &provider, key);
    let hint = mask_secret(key);
    state
        .store
        .put_provider_key(
            me.user_id,
            &provider,
            &sealed.nonce,
            &sealed.ciphertext,
            &hint,
        )
        .await?;
    state.stored_key_changed();
    Ok(Json(StoredKey {
        provider,
        hint,
        updated_at: Utc::now(),
    }))
}

/// Deletes the caller's stored key for a provider.
#[utoipa::path(
    delete,
    path = "/api/v2/users/me/provider-keys/{provider}",
    tag = "users",
    params(("provider" = String, Path, description = "Provider route name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody))
)]
pub async fn delete_provider_key(
    State(state): State<Arc<AppState>>,
    Caller(me): Caller,
    ApiPath(provider): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if state
        .store
        .delete_provider_key(me.user_id, &provider)
        .await?
    {
        state.stored_key_changed();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "no stored key for provider {provider:?}"
        )))
    }
}

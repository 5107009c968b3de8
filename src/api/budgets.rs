//! Admin CRUD of spend limits (`spend_limits`: one per default, group or user scope) and of
//! operator price overrides (`pricing`, shown over the shipped price book).
//!
//! Amounts travel as exact decimal USD strings and are stored as integer nano-USD. Every write
//! ends with `governance_changed`, so caps and prices apply without a restart.
//!
//! Not here: resolving which cap applies to a user, or pricing an interception (`governance`).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, ApiJson, ApiPath, Params};
use crate::app::AppState;
use crate::governance::pricing::{ModelPrice, PriceBook};
use crate::money::NanoUsd;
use crate::store::{SpendLimitEntry, SpendScope};

/// A spend limit per budget period.
#[derive(Debug, Serialize, ToSchema)]
pub struct Budget {
    /// `default`, `group` or `user`.
    pub scope: String,
    /// The group or user id; absent for the default.
    pub scope_id: Option<Uuid>,
    /// The group's or user's name.
    pub scope_name: Option<String>,
    /// Decimal USD per budget period.
    pub limit_usd: String,
    pub limit_nano_usd: i64,
    pub updated_at: DateTime<Utc>,
}

impl From<SpendLimitEntry> for Budget {
    fn from(e: SpendLimitEntry) -> Budget {
        Budget {
            scope: e.scope,
            scope_id: e.scope_id,
            scope_name: e.scope_name,
            limit_usd: e.limit.to_usd_string(),
            limit_nano_usd: e.limit.0,
            updated_at: e.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetList {
    pub count: usize,
    /// Default first, then groups, then users, by name.
    pub budgets: Vec<Budget>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBudget {
    /// `default`, `group` or `user`.
    pub scope: String,
    /// The group or user id; omit for `default`.
    #[serde(default)]
    pub scope_id: Option<Uuid>,
    /// Decimal USD, zero or more (e.g. "250.00").
    pub limit_usd: String,
}

fn scope_of(scope: &str, id: Option<Uuid>) -> Result<SpendScope, String> {
    match (scope, id) {
        ("default", None) => Ok(SpendScope::Default),
        ("default", Some(_)) => Err("scope_id: the default limit has no scope_id".into()),
        ("group", Some(id)) => Ok(SpendScope::Group(id)),
        ("user", Some(id)) => Ok(SpendScope::User(id)),
        ("group" | "user", None) => {
            Err(format!("scope_id: a {scope} limit needs the {scope}'s id"))
        }
        (other, _) => Err(format!(
            "scope `{other}` must be one of default, group, user"
        )),
    }
}

/// Lists the stored spend limits.
#[utoipa::path(
    get,
    path = "/api/v2/budgets",
    tag = "budgets",
    responses(
        (status = 200, body = BudgetList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub async fn list_budgets(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    uri: Uri,
) -> Result<Json<BudgetList>, ApiError> {
    Params::from_uri(&uri, &[])?;
    let budgets: Vec<Budget> = state
        .store
        .queries()
        .spend_limits()
        .await?
        .into_iter()
        .map(Budget::from)
        .collect();
    Ok(Json(BudgetList {
        count: budgets.len(),
        budgets,
    }))
}

async fn set_budget(state: &AppState, body: SetBudget) -> Result<Json<Budget>, ApiError> {
    let scope = scope_of(&body.scope, body.scope_id).map_err(ApiError::Unprocessable)?;
    let limit = NanoUsd::parse_non_negative_usd(&body.limit_usd)
        .map_err(|e| ApiError::Unprocessable(format!("limit_usd: {e}")))?;
    let entry = state.store.queries().set_spend_limit(scope, limit).await?;
    state.governance_changed().await;
    Ok(Json(entry.into()))
}

/// Creates or replaces a spend limit.
#[utoipa::path(
    put,
    path = "/api/v2/budgets",
    tag = "budgets",
    request_body = SetBudget,
    responses(
        (status = 200, body = Budget),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such group or user", body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
pub async fn put_budget(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiJson(body): ApiJson<SetBudget>,
) -> Result<Json<Budget>, ApiError> {
    set_budget(&state, body).await
}

/// Creates or replaces a spend limit (same as PUT).
#[utoipa::path(
    post,
    path = "/api/v2/budgets",
    tag = "budgets",
    request_body = SetBudget,
    responses(
        (status = 200, body = Budget),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such group or user", body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
pub async fn post_budget(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiJson(body): ApiJson<SetBudget>,
) -> Result<Json<Budget>, ApiError> {
    set_budget(&state, body).await
}

async fn delete_budget(state: &AppState, scope: SpendScope) -> Result<StatusCode, ApiError> {
    if !state.store.queries().delete_spend_limit(scope).await? {
        return Err(ApiError::NotFound("no such spend limit".into()));
    }
    state.governance_changed().await;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes the default spend limit (`scope` = `default`).
#[utoipa::path(
    delete,
    path = "/api/v2/budgets/{scope}",
    tag = "budgets",
    params(("scope" = String, Path, description = "`default` (group and user limits need an id)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn delete_default_budget(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(scope): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let scope = scope_of(&scope, None).map_err(ApiError::BadRequest)?;
    delete_budget(&state, scope).await
}

/// Deletes a group's or user's spend limit.
#[utoipa::path(
    delete,
    path = "/api/v2/budgets/{scope}/{scope_id}",
    tag = "budgets",
    params(
        ("scope" = String, Path, description = "`group` or `user`"),
        ("scope_id" = Uuid, Path, description = "Group or user id"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn delete_scoped_budget(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath((scope, scope_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id("scope_id", &scope_id)?;
    let scope = scope_of(&scope, Some(id)).map_err(ApiError::BadRequest)?;
    delete_budget(&state, scope).await
}

// ---- pricing ---------------------------------------------------------------------------------

/// The shipped price book, parsed once (it is compiled in and never changes).
fn shipped_prices() -> &'static PriceBook {
    static BOOK: OnceLock<PriceBook> = OnceLock::new();
    BOOK.get_or_init(PriceBook::builtin)
}

/// A model's effective price, per million tokens.
#[derive(Debug, Serialize, ToSchema)]
pub struct Price {
    pub model: String,
    pub provider: String,
    /// Decimal USD per million non-cached input tokens.
    pub input: String,
    pub output: String,
    pub cache_read: String,
    pub cache_write: String,
    pub output_limit: Option<u64>,
    /// `builtin` (the shipped price book) or `override` (set through this API).
    pub source: String,
    /// When the override was last set; absent for builtin prices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

impl Price {
    fn new(
        model: &str,
        provider: &str,
        p: &ModelPrice,
        source: &str,
        updated_at: Option<DateTime<Utc>>,
    ) -> Price {
        Price {
            model: model.to_string(),
            provider: provider.to_string(),
            input: p.input.to_usd_string(),
            output: p.output.to_usd_string(),
            cache_read: p.cache_read.to_usd_string(),
            cache_write: p.cache_write.to_usd_string(),
            output_limit: p.output_limit,
            source: source.to_string(),
            updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PriceList {
    pub count: usize,
    /// Ordered by model.
    pub prices: Vec<Price>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPrice {
    /// Defaults to the shipped book's provider for this model, else empty.
    #[serde(default)]
    pub provider: Option<String>,
    /// Decimal USD per million tokens, zero or more (e.g. "2.50").
    pub input: String,
    pub output: String,
    pub cache_read: String,
    pub cache_write: String,
    #[serde(default)]
    pub output_limit: Option<u64>,
}

/// Effective prices: the shipped price book with operator overrides on top.
#[utoipa::path(
    get,
    path = "/api/v2/pricing",
    tag = "pricing",
    responses(
        (status = 200, body = PriceList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub async fn list_prices(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    uri: Uri,
) -> Result<Json<PriceList>, ApiError> {
    Params::from_uri(&uri, &[])?;
    let builtin = shipped_prices();
    let mut prices: BTreeMap<String, Price> = builtin
        .iter()
        .map(|l| {
            (
                l.model.to_string(),
                Price::new(l.model, l.provider, l.price, "builtin", None),
            )
        })
        .collect();
    for o in state.store.queries().price_overrides().await? {
        let price = Price::new(
            &o.model,
            &o.provider,
            &o.price,
            "override",
            Some(o.updated_at),
        );
        prices.insert(o.model, price);
    }
    let prices: Vec<Price> = prices.into_values().collect();
    Ok(Json(PriceList {
        count: prices.len(),
        prices,
    }))
}

/// Sets the price override of a model (creates or replaces).
#[utoipa::path(
    put,
    path = "/api/v2/pricing/{model}",
    tag = "pricing",
    params(("model" = String, Path, description = "Model id as clients send it")),
    request_body = SetPrice,
    responses(
        (status = 200, body = Price),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
pub async fn put_price(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(model): ApiPath<String>,
    ApiJson(body): ApiJson<SetPrice>,
) -> Result<Json<Price>, ApiError> {
    let amount = |field: &str, text: &str| {
        NanoUsd::parse_non_negative_usd(text)
            .map_err(|e| ApiError::Unprocessable(format!("{field}: {e}")))
    };
    let price = ModelPrice {
        input: amount("input", &body.input)?,
        output: amount("output", &body.output)?,
        cache_read: amount("cache_read", &body.cache_read)?,
        cache_write: amount("cache_write", &body.cache_write)?,
        output_limit: body.output_limit,
    };
    let provider = match body.provider {
        Some(p) => p,
        None => shipped_prices()
            .iter()
            .find(|l| l.model == model)
            .map(|l| l.provider.to_string())
            .unwrap_or_default(),
    };
    let saved = state
        .store
        .queries()
        .set_price_override(&model, &provider, &price)
        .await?;
    state.governance_changed().await;
    Ok(Json(Price::new(
        &saved.model,
        &saved.provider,
        &saved.price,
        "override",
        Some(saved.updated_at),
    )))
}

/// Removes a model's override (the shipped price, if any, applies again).
#[utoipa::path(
    delete,
    path = "/api/v2/pricing/{model}",
    tag = "pricing",
    params(("model" = String, Path, description = "Model id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No override for this model", body = ErrorBody),
    )
)]
pub async fn delete_price(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(model): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if !state.store.queries().delete_price_override(&model).await? {
        return Err(ApiError::NotFound(format!(
            "model {model:?} has no price override"
        )));
    }
    state.governance_changed().await;
    Ok(StatusCode::NO_CONTENT)
}

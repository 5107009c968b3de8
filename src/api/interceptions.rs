//! `GET /api/v2/aibridge/interceptions` and `/{id}`: recorded provider calls with usage, cost,
//! prompts, tool usages (and thoughts on the single and session views), in the contract's field names
//! (`docs/contract.md#resources`).
//!
//! Not here: the `q` language (`api::query`) or the SQL (`store::Queries`).

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
use super::extract::{parse_id, ApiPath, Params};
use super::query::filter_for;
use crate::app::AppState;
use crate::store::{InterceptionRow, UsageSums};

/// The user who made a call.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct Initiator {
    pub id: Uuid,
    /// Empty when the user has been deleted since.
    pub username: String,
}

impl Initiator {
    pub fn new(id: Uuid, username: Option<String>) -> Initiator {
        Initiator {
            id,
            username: username.unwrap_or_default(),
        }
    }
}

/// Token counts: `input_tokens` is non-cached input; `reasoning_tokens` is already inside
/// `output_tokens`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_write_input_tokens: u64,
    pub reasoning_tokens: u64,
}

impl From<UsageSums> for TokenUsage {
    fn from(u: UsageSums) -> TokenUsage {
        TokenUsage {
            input_tokens: u.input,
            output_tokens: u.output,
            cache_read_input_tokens: u.cache_read,
            cache_write_input_tokens: u.cache_write,
            reasoning_tokens: u.reasoning,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserPrompt {
    pub prompt: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolUsage {
    pub tool_call_id: String,
    pub tool: String,
    /// The call's arguments as JSON text, as the model produced them.
    pub input: String,
    pub injected: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelThought {
    pub content: String,
    /// `thinking` or `reasoning_summary`.
    pub source: String,
    pub created_at: DateTime<Utc>,
}

/// One interception.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Interception {
    pub id: Uuid,
    pub api_key_id: Option<Uuid>,
    pub initiator: Initiator,
    pub provider: String,
    pub model: String,
    pub client: String,
    /// The session key: `{user id}:{client session id}`, else thread root id, else this
    /// interception's id.
    pub session_id: String,
    pub thread_root_id: Option<Uuid>,
    /// `central` or `byok`.
    pub credential_kind: String,
    /// `completed`, `upstream_error`, `client_aborted`, `upstream_aborted` or `timeout`.
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub token_usage: TokenUsage,
    /// Where `token_usage` comes from: `reported` by the provider, `estimated` by Tollgate (the
    /// response ended without a usage report), or `none` (nothing reached a model).
    pub usage_source: String,
    /// Exact decimal USD.
    pub cost_usd: String,
    pub cost_nano_usd: i64,
    pub user_prompts: Vec<UserPrompt>,
    pub tool_usages: Vec<ToolUsage>,
    /// Only on the single-interception and session views.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_thoughts: Option<Vec<ModelThought>>,
    pub upstream_status: Option<u16>,
    pub client_session_id: Option<String>,
    pub thread_parent_id: Option<Uuid>,
    /// Masked provider key (`sk-…abcd`), never the key.
    pub credential_hint: Option<String>,
    pub streaming: bool,
    /// False when the model had no price.
    pub priced: bool,
    pub response_model: Option<String>,
    pub error: Option<String>,
}

impl Interception {
    pub fn from_row(r: InterceptionRow, with_thoughts: bool) -> Interception {
        Interception {
            id: r.id,
            api_key_id: r.api_key_id,
            initiator: Initiator::new(r.user_id, r.username),
            provider: r.provider,
            model: r.model,
            client: r.client,
            session_id: r.session_key,
            thread_root_id: r.thread_root_id,
            credential_kind: r.credential_kind,
            status: r.status,
            started_at: r.started_at,
            ended_at: r.ended_at,
            token_usage: r.usage.into(),
            usage_source: r.usage_source,
            cost_usd: r.cost.to_usd_string(),
            cost_nano_usd: r.cost.0,
            user_prompts: r
                .prompts
                .into_iter()
                .map(|p| UserPrompt {
                    prompt: p.prompt,
                    created_at: p.created_at,
                })
                .collect(),
            tool_usages: r
                .tool_usages
                .into_iter()
                .map(|t| ToolUsage {
                    tool_call_id: t.tool_call_id,
                    tool: t.tool,
                    input: t.input,
                    injected: t.injected,
                    created_at: t.created_at,
                })
                .collect(),
            model_thoughts: with_thoughts.then(|| {
                r.thoughts
                    .into_iter()
                    .map(|t| ModelThought {
                        content: t.content,
                        source: t.source,
                        created_at: t.created_at,
                    })
                    .collect()
            }),
            upstream_status: r.upstream_status,
            client_session_id: r.client_session_id,
            thread_parent_id: r.thread_parent_id,
            credential_hint: r.credential_hint,
            streaming: r.streaming,
            priced: r.priced,
            response_model: r.response_model,
            error: r.error,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InterceptionList {
    /// Interceptions matching the filter in total (not just this page).
    pub count: i64,
    pub results: Vec<Interception>,
}

/// Lists interceptions, newest first.
///
/// Members see only their own. Page with `after_id` = the last id of the previous page.
#[utoipa::path(
    get,
    path = "/api/v2/aibridge/interceptions",
    tag = "interceptions",
    params(
        ("q" = Option<String>, Query, description = "Space-separated key:value terms: initiator (user id, username or `me`), provider, model, client, session_id, started_after, started_before (RFC 3339)."),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)."),
        ("after_id" = Option<Uuid>, Query, description = "Return interceptions older than this one (the last id of the previous page)."),
    ),
    responses(
        (status = 200, body = InterceptionList),
        (status = 400, description = "Malformed q, limit or after_id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "A member asked for someone else's records", body = ErrorBody),
    )
)]
pub async fn list_interceptions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    uri: Uri,
) -> Result<Json<InterceptionList>, ApiError> {
    let params = Params::from_uri(&uri, &["q", "limit", "after_id"])?;
    let limit = params.limit()?;
    let after = params
        .get("after_id")
        .map(|a| parse_id("after_id", a))
        .transpose()?;
    let filter = filter_for(&caller, params.get("q"), &state.store).await?;
    let page = state
        .store
        .queries()
        .list_interceptions(&filter, after, limit)
        .await?;
    Ok(Json(InterceptionList {
        count: page.count,
        results: page
            .rows
            .into_iter()
            .map(|r| Interception::from_row(r, false))
            .collect(),
    }))
}

/// One interception, with its model thoughts.
#[utoipa::path(
    get,
    path = "/api/v2/aibridge/interceptions/{id}",
    tag = "interceptions",
    params(("id" = Uuid, Path, description = "Interception id")),
    responses(
        (status = 200, body = Interception),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Another user's interception (members)", body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn get_interception(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Interception>, ApiError> {
    let id = parse_id("interception id", &id)?;
    let row = state
        .store
        .queries()
        .interception(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("interception {id} not found")))?;
    if !caller.is_admin() && row.user_id != caller.0.user_id {
        return Err(ApiError::Forbidden(
            "this interception belongs to another user".into(),
        ));
    }
    Ok(Json(Interception::from_row(row, true)))
}

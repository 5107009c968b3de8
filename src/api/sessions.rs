//! `GET /api/v2/aibridge/sessions` and `/{id}`: interceptions grouped by their stored session
//! key (client session id, else thread root, else the interception itself), with aggregates,
//! and for one session its threads of interceptions.
//!
//! Not here: computing session keys (done when an interception is recorded) or the SQL.

use std::collections::{BTreeSet, HashMap};
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
use super::extract::{ApiPath, Params};
use super::interceptions::{Initiator, Interception, TokenUsage};
use super::query::filter_for;
use crate::app::AppState;
use crate::money::NanoUsd;
use crate::store::{InterceptionRow, SessionSummary, UsageSums};

/// A session: the interceptions sharing one session key (those passing the list's filter).
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    /// The session key.
    pub id: String,
    /// The user of the session's latest interception.
    pub initiator: Initiator,
    pub providers: Vec<String>,
    pub models: Vec<String>,
    /// The client of the session's latest interception.
    pub client: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    /// When the session's latest interception ended; the list's sort key.
    pub last_active_at: DateTime<Utc>,
    /// Distinct threads (an interception outside any tool-call thread is its own).
    pub threads: i64,
    pub interception_count: i64,
    pub token_usage_summary: TokenUsage,
    pub cost_usd: String,
    pub cost_nano_usd: i64,
    /// The latest interception's last user prompt.
    pub last_prompt: Option<String>,
}

impl From<SessionSummary> for Session {
    fn from(s: SessionSummary) -> Session {
        Session {
            id: s.key,
            initiator: Initiator::new(s.user_id, s.username),
            providers: s.providers,
            models: s.models,
            client: s.client,
            started_at: s.started_at,
            ended_at: s.ended_at,
            last_active_at: s.ended_at,
            threads: s.threads,
            interception_count: s.interception_count,
            token_usage_summary: s.usage.into(),
            cost_usd: s.cost.to_usd_string(),
            cost_nano_usd: s.cost.0,
            last_prompt: s.last_prompt,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// Sessions matching the filter in total (not just this page).
    pub count: i64,
    pub sessions: Vec<Session>,
}

/// A thread: an interception and the follow-ups that answered its tool calls, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct Thread {
    /// The thread's root interception id.
    pub id: Uuid,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub interception_count: i64,
    pub token_usage: TokenUsage,
    pub cost_usd: String,
    pub cost_nano_usd: i64,
    pub interceptions: Vec<Interception>,
}

/// A session with its threads.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionDetail {
    pub id: String,
    pub initiator: Initiator,
    pub providers: Vec<String>,
    pub models: Vec<String>,
    pub client: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub last_active_at: DateTime<Utc>,
    pub interception_count: i64,
    pub token_usage_summary: TokenUsage,
    pub cost_usd: String,
    pub cost_nano_usd: i64,
    pub last_prompt: Option<String>,
    /// Ordered by their first interception.
    pub threads: Vec<Thread>,
}

/// Lists sessions by last activity, newest first.
///
/// Filters apply to interceptions before grouping. Page with `after_id` = the id of the last
/// session of the previous page; a session that gains activity meanwhile moves to the top.
#[utoipa::path(
    get,
    path = "/api/v2/aibridge/sessions",
    tag = "sessions",
    params(
        ("q" = Option<String>, Query, description = "Same terms as the interception list; applied to interceptions before grouping."),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)."),
        ("after_id" = Option<String>, Query, description = "The id of the last session of the previous page."),
    ),
    responses(
        (status = 200, body = SessionList),
        (status = 400, description = "Malformed q or limit, or after_id is not a session of this listing", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub async fn list_sessions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    uri: Uri,
) -> Result<Json<SessionList>, ApiError> {
    let params = Params::from_uri(&uri, &["q", "limit", "after_id"])?;
    let limit = params.limit()?;
    let filter = filter_for(&caller, params.get("q"), &state.store).await?;
    let queries = state.store.queries();
    let cursor = match params.get("after_id") {
        None => None,
        Some(key) => Some(queries.session_cursor(&filter, key).await?.ok_or_else(|| {
            ApiError::BadRequest(format!("after_id `{key}` is not a session of this listing"))
        })?),
    };
    let page = queries
        .list_sessions(&filter, cursor.as_ref(), limit)
        .await?;
    Ok(Json(SessionList {
        count: page.count,
        sessions: page.sessions.into_iter().map(Session::from).collect(),
    }))
}

/// One session with its threads, each with its interceptions oldest first.
#[utoipa::path(
    get,
    path = "/api/v2/aibridge/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "Session id (session key)")),
    responses(
        (status = 200, body = SessionDetail),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Another user's session (members)", body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn get_session(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<SessionDetail>, ApiError> {
    let mut rows = state.store.queries().session_interceptions(&key).await?;
    if rows.is_empty() {
        return Err(ApiError::NotFound(format!("session {key:?} not found")));
    }
    if !caller.is_admin() {
        rows.retain(|r| r.user_id == caller.0.user_id);
        if rows.is_empty() {
            return Err(ApiError::Forbidden(
                "this session belongs to another user".into(),
            ));
        }
    }
    Ok(Json(session_detail(key, rows)))
}

/// Sums in exact integers (saturating: a sum past i64/u64 is past any meaning anyway).
fn add_usage(total: &mut UsageSums, u: &UsageSums) {
    total.input = total.input.saturating_add(u.input);
    total.output = total.output.saturating_add(u.output);
    total.cache_read = total.cache_read.saturating_add(u.cache_read);
    total.cache_write = total.cache_write.saturating_add(u.cache_write);
    total.reasoning = total.reasoning.saturating_add(u.reasoning);
}

/// Builds the detail from the session's interceptions, oldest first (non-empty).
fn session_detail(key: String, rows: Vec<InterceptionRow>) -> SessionDetail {
    let mut usage = UsageSums::default();
    let mut cost = NanoUsd::ZERO;
    let mut providers = BTreeSet::new();
    let mut models = BTreeSet::new();
    let started_at = rows.iter().map(|r| r.started_at).min().unwrap_or_default();
    let ended_at = rows.iter().map(|r| r.ended_at).max().unwrap_or_default();
    let latest = rows.last();
    let initiator = latest
        .map(|r| Initiator::new(r.user_id, r.username.clone()))
        .unwrap_or_else(|| Initiator::new(Uuid::nil(), None));
    let client = latest.map(|r| r.client.clone()).unwrap_or_default();
    let last_prompt = rows
        .iter()
        .rev()
        .find_map(|r| r.prompts.last().map(|p| p.prompt.clone()));
    let interception_count = rows.len() as i64;

    let mut threads: Vec<Thread> = Vec::new();
    let mut thread_of: HashMap<Uuid, usize> = HashMap::new();
    let mut thread_usage: Vec<(UsageSums, NanoUsd)> = Vec::new();
    for r in rows {
        add_usage(&mut usage, &r.usage);
        cost = cost.saturating_add(r.cost);
        providers.insert(r.provider.clone());
        models.insert(r.model.clone());
        let root = r.thread_root_id.unwrap_or(r.id);
        let n = *thread_of.entry(root).or_insert_with(|| {
            threads.push(Thread {
                id: root,
                started_at: r.started_at,
                ended_at: r.ended_at,
                interception_count: 0,
                token_usage: TokenUsage::default(),
                cost_usd: String::new(),
                cost_nano_usd: 0,
                interceptions: Vec::new(),
            });
            thread_usage.push((UsageSums::default(), NanoUsd::ZERO));
            threads.len() - 1
        });
        let t = &mut threads[n];
        t.started_at = t.started_at.min(r.started_at);
        t.ended_at = t.ended_at.max(r.ended_at);
        t.interception_count += 1;
        add_usage(&mut thread_usage[n].0, &r.usage);
        thread_usage[n].1 = thread_usage[n].1.saturating_add(r.cost);
        t.interceptions.push(Interception::from_row(r, true));
    }
    for (t, (u, c)) in threads.iter_mut().zip(thread_usage) {
        t.token_usage = u.into();
        t.cost_usd = c.to_usd_string();
        t.cost_nano_usd = c.0;
    }
    SessionDetail {
        id: key,
        initiator,
        providers: providers.into_iter().collect(),
        models: models.into_iter().collect(),
        client,
        started_at,
        ended_at,
        last_active_at: ended_at,
        interception_count,
        token_usage_summary: usage.into(),
        cost_usd: cost.to_usd_string(),
        cost_nano_usd: cost.0,
        last_prompt,
        threads,
    }
}

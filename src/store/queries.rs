//! The queries behind the management API: reading interceptions, sessions and usage rollups, and
//! the CRUD of users, groups, keys, spend limits, price overrides and seat holders.
//!
//! Everything is reached through [`Store::queries`], which returns a [`Queries`] view of the
//! pool; keeping these methods off `Store` itself leaves its namespace to the gateway's own
//! queries. Lists are keyset-paginated and every child table is fetched for a whole page with
//! one `IN (...)` query per table (never one query per row).
//!
//! Not here: who may see what (the API layer filters by caller before it asks), HTTP shapes, or
//! writing interceptions (the recorder).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use super::{from_millis, millis, parse_uuid, validate_name, Store, StoreError, User};
use crate::governance::pricing::ModelPrice;
use crate::money::NanoUsd;
use crate::providers::TokenUsage;

/// Ids bound per `IN (...)` list: a whole page (at most 1000) in one query per child table,
/// far below SQLite's bound-parameter limit (32766) even with filters.
const IN_CHUNK: usize = 1000;

/// Conditions on interceptions, shared by the interception list, the session list (applied
/// before grouping) and the session cursor. `None` means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterceptionFilter {
    pub user_id: Option<Uuid>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub client: Option<String>,
    /// The stored session key (client session id, else thread root, else own id).
    pub session_key: Option<String>,
    /// Inclusive lower bound on `started_at`.
    pub started_after: Option<DateTime<Utc>>,
    /// Exclusive upper bound on `started_at`.
    pub started_before: Option<DateTime<Utc>>,
}

impl InterceptionFilter {
    /// Appends ` AND ...` for every set condition, on the table aliased `alias`.
    fn push(&self, qb: &mut QueryBuilder<'_, Sqlite>, alias: &str) {
        self.push_terms(qb, alias, "");
    }

    /// As [`InterceptionFilter::push`], but with provider, model and client terms written
    /// `+alias.column` (SQLite's way of saying "do not use an index for this term"), so a walk
    /// in `ORDER BY` order keeps to its ordered index instead of collecting and sorting every
    /// row of, say, one model.
    fn push_unindexed_attributes(&self, qb: &mut QueryBuilder<'_, Sqlite>, alias: &str) {
        self.push_terms(qb, alias, "+");
    }

    fn push_terms(&self, qb: &mut QueryBuilder<'_, Sqlite>, alias: &str, attribute_prefix: &str) {
        if let Some(u) = self.user_id {
            qb.push(format!(" AND {alias}.user_id = "))
                .push_bind(u.to_string());
        }
        for (column, value) in [
            ("provider", &self.provider),
            ("model", &self.model),
            ("client", &self.client),
        ] {
            if let Some(v) = value {
                qb.push(format!(" AND {attribute_prefix}{alias}.{column} = "))
                    .push_bind(v.clone());
            }
        }
        if let Some(v) = &self.session_key {
            qb.push(format!(" AND {alias}.session_key = "))
                .push_bind(v.clone());
        }
        if let Some(t) = self.started_after {
            qb.push(format!(" AND {alias}.started_at >= "))
                .push_bind(millis(t));
        }
        if let Some(t) = self.started_before {
            qb.push(format!(" AND {alias}.started_at < "))
                .push_bind(millis(t));
        }
    }
}

/// Token counts as stored (and summed): exact integers.
pub type UsageSums = TokenUsage;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRow {
    pub prompt: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolUsageRow {
    pub tool_call_id: String,
    pub tool: String,
    /// The arguments as JSON text, as the model sent them.
    pub input: String,
    pub injected: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThoughtRow {
    pub content: String,
    pub source: String,
    pub created_at: DateTime<Utc>,
}

/// One recorded interception with its child rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptionRow {
    pub id: Uuid,
    pub user_id: Uuid,
    /// `None` when the user has been deleted since.
    pub username: Option<String>,
    pub api_key_id: Option<Uuid>,
    pub provider: String,
    pub model: String,
    pub response_model: Option<String>,
    pub client: String,
    pub client_session_id: Option<String>,
    pub session_key: String,
    pub thread_parent_id: Option<Uuid>,
    pub thread_root_id: Option<Uuid>,
    pub credential_kind: String,
    pub credential_hint: Option<String>,
    pub status: String,
    pub upstream_status: Option<u16>,
    pub error: Option<String>,
    pub streaming: bool,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub ttfb_ms: Option<u64>,
    pub usage: UsageSums,
    pub cost: NanoUsd,
    pub priced: bool,
    pub prompts: Vec<PromptRow>,
    pub tool_usages: Vec<ToolUsageRow>,
    /// Filled only where asked for (single interception, session detail).
    pub thoughts: Vec<ThoughtRow>,
}

/// A page of interceptions and the number matching the filter overall.
#[derive(Debug, Clone)]
pub struct InterceptionPage {
    pub count: i64,
    pub rows: Vec<InterceptionRow>,
}

/// Where a session list page starts: strictly after this (last activity, session key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCursor {
    pub last_active_ms: i64,
    pub key: String,
}

/// A session's aggregates over the interceptions that passed the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub key: String,
    /// The user and client of the session's latest interception.
    pub user_id: Uuid,
    pub username: Option<String>,
    pub client: String,
    pub providers: Vec<String>,
    pub models: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub threads: i64,
    pub interception_count: i64,
    pub usage: UsageSums,
    pub cost: NanoUsd,
    pub last_prompt: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SessionPage {
    pub count: i64,
    pub sessions: Vec<SessionSummary>,
}

/// What usage is rolled up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroupBy {
    User,
    Group,
    Model,
    Provider,
    Client,
    /// UTC calendar day of `started_at`.
    Day,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageFilter {
    /// Inclusive lower bound on `started_at`.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound on `started_at`.
    pub to: Option<DateTime<Utc>>,
    pub user_id: Option<Uuid>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// User id, group id, model, provider, client, or `YYYY-MM-DD`.
    pub key: String,
    /// Username or group name, for the user and group rollups.
    pub label: Option<String>,
    pub usage: UsageSums,
    pub cost: NanoUsd,
    pub interception_count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRef {
    pub id: Uuid,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDetail {
    pub user: User,
    pub groups: Vec<GroupRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDetail {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// (user id, username), ordered by username.
    pub members: Vec<(Uuid, String)>,
}

/// One row of `spend_limits`, with the name of the user or group it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendLimitEntry {
    pub scope: String,
    /// `None` for the default scope.
    pub scope_id: Option<Uuid>,
    pub scope_name: Option<String>,
    pub limit: NanoUsd,
    pub updated_at: DateTime<Utc>,
}

/// Which `spend_limits` row: the default, a group's or a user's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendScope {
    Default,
    Group(Uuid),
    User(Uuid),
}

impl SpendScope {
    fn columns(self) -> (&'static str, String) {
        match self {
            SpendScope::Default => ("default", String::new()),
            SpendScope::Group(id) => ("group", id.to_string()),
            SpendScope::User(id) => ("user", id.to_string()),
        }
    }
}

/// An operator price override (`pricing` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceOverride {
    pub model: String,
    pub provider: String,
    pub price: ModelPrice,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatHolderRow {
    pub user_id: Uuid,
    pub username: Option<String>,
    pub first_used_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
}

/// The API's view of the store; see the module docs.
#[derive(Clone, Copy)]
pub struct Queries<'a> {
    pool: &'a SqlitePool,
}

impl Store {
    pub fn queries(&self) -> Queries<'_> {
        Queries { pool: &self.pool }
    }
}

const INTERCEPTION_COLUMNS: &str =
    "i.id, i.user_id, u.username, i.api_key_id, i.provider, i.model, \
     i.response_model, i.client, i.client_session_id, i.session_key, i.thread_parent_id, \
     i.thread_root_id, i.credential_kind, i.credential_hint, i.status, i.upstream_status, i.error, \
     i.streaming, i.started_at, i.ended_at, i.ttfb_ms, i.input_tokens, i.output_tokens, \
     i.cache_read_input_tokens, i.cache_write_input_tokens, i.reasoning_tokens, i.cost_nano_usd, \
     i.priced";

fn opt_uuid(row: &SqliteRow, column: &str) -> Result<Option<Uuid>, StoreError> {
    row.try_get::<Option<String>, _>(column)?
        .map(|s| parse_uuid(&s))
        .transpose()
}

fn uuid_col(row: &SqliteRow, column: &str) -> Result<Uuid, StoreError> {
    parse_uuid(&row.try_get::<String, _>(column)?)
}

fn time_col(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
    Ok(from_millis(row.try_get::<i64, _>(column)?))
}

fn count_col(row: &SqliteRow, column: &str) -> Result<u64, StoreError> {
    Ok(u64::try_from(row.try_get::<Option<i64>, _>(column)?.unwrap_or(0)).unwrap_or(0))
}

/// Reads the five token columns (or their sums) named `prefix` + column name.
fn usage_cols(row: &SqliteRow, prefix: &str) -> Result<UsageSums, StoreError> {
    Ok(TokenUsage {
        input: count_col(row, &format!("{prefix}input_tokens"))?,
        output: count_col(row, &format!("{prefix}output_tokens"))?,
        cache_read: count_col(row, &format!("{prefix}cache_read_input_tokens"))?,
        cache_write: count_col(row, &format!("{prefix}cache_write_input_tokens"))?,
        reasoning: count_col(row, &format!("{prefix}reasoning_tokens"))?,
    })
}

const USAGE_SUMS: &str =
    "SUM(i.input_tokens) AS input_tokens, SUM(i.output_tokens) AS output_tokens, \
     SUM(i.cache_read_input_tokens) AS cache_read_input_tokens, \
     SUM(i.cache_write_input_tokens) AS cache_write_input_tokens, \
     SUM(i.reasoning_tokens) AS reasoning_tokens, SUM(i.cost_nano_usd) AS cost_nano_usd, \
     COUNT(*) AS interception_count";

fn interception_from_row(row: &SqliteRow) -> Result<InterceptionRow, StoreError> {
    Ok(InterceptionRow {
        id: uuid_col(row, "id")?,
        user_id: uuid_col(row, "user_id")?,
        username: row.try_get("username")?,
        api_key_id: opt_uuid(row, "api_key_id")?,
        provider: row.try_get("provider")?,
        model: row.try_get("model")?,
        response_model: row.try_get("response_model")?,
        client: row.try_get("client")?,
        client_session_id: row.try_get("client_session_id")?,
        session_key: row.try_get("session_key")?,
        thread_parent_id: opt_uuid(row, "thread_parent_id")?,
        thread_root_id: opt_uuid(row, "thread_root_id")?,
        credential_kind: row.try_get("credential_kind")?,
        credential_hint: row.try_get("credential_hint")?,
        status: row.try_get("status")?,
        upstream_status: row
            .try_get::<Option<i64>, _>("upstream_status")?
            .and_then(|s| u16::try_from(s).ok()),
        error: row.try_get("error")?,
        streaming: row.try_get("streaming")?,
        started_at: time_col(row, "started_at")?,
        ended_at: time_col(row, "ended_at")?,
        ttfb_ms: row
            .try_get::<Option<i64>, _>("ttfb_ms")?
            .and_then(|v| u64::try_from(v).ok()),
        usage: usage_cols(row, "")?,
        cost: NanoUsd(row.try_get("cost_nano_usd")?),
        priced: row.try_get("priced")?,
        prompts: Vec::new(),
        tool_usages: Vec::new(),
        thoughts: Vec::new(),
    })
}

fn user_from_row(row: &SqliteRow) -> Result<User, StoreError> {
    Ok(User {
        id: uuid_col(row, "id")?,
        username: row.try_get("username")?,
        is_admin: row.try_get("is_admin")?,
        created_at: time_col(row, "created_at")?,
    })
}

/// Pushes `(?, ?, ...)` binding each value.
fn push_in_list<'a, T>(qb: &mut QueryBuilder<'a, Sqlite>, values: impl IntoIterator<Item = T>)
where
    T: 'a + sqlx::Encode<'a, Sqlite> + sqlx::Type<Sqlite> + Send,
{
    qb.push("(");
    let mut sep = qb.separated(", ");
    for v in values {
        sep.push_bind(v);
    }
    sep.push_unseparated(")");
}

/// Pushes `(VALUES (?), (?), ...)` binding each key: a one-column table named `column1`.
fn push_values_table(qb: &mut QueryBuilder<'_, Sqlite>, keys: &[String]) {
    qb.push("(VALUES ");
    let mut sep = qb.separated(", ");
    for k in keys {
        sep.push("(")
            .push_bind_unseparated(k.clone())
            .push_unseparated(")");
    }
    sep.push_unseparated(")");
}

impl<'a> Queries<'a> {
    // ---- interceptions ----------------------------------------------------------------------

    /// Newest first (ids are UUIDv7, so id order is start order), strictly older than `after`.
    pub async fn list_interceptions(
        &self,
        filter: &InterceptionFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<InterceptionPage, StoreError> {
        let mut count =
            QueryBuilder::<Sqlite>::new("SELECT COUNT(*) FROM interceptions i WHERE 1=1");
        filter.push(&mut count, "i");
        let count: i64 = count.build_query_scalar().fetch_one(self.pool).await?;

        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {INTERCEPTION_COLUMNS} FROM interceptions i LEFT JOIN users u ON u.id = i.user_id WHERE 1=1"
        ));
        // Walk the id index (newest first) rather than sort every row of a model or client.
        filter.push_unindexed_attributes(&mut qb, "i");
        if let Some(after) = after {
            qb.push(" AND i.id < ").push_bind(after.to_string());
        }
        qb.push(" ORDER BY i.id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(self.pool).await?;
        let mut rows = rows
            .iter()
            .map(interception_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.attach_children(&mut rows, false).await?;
        Ok(InterceptionPage { count, rows })
    }

    /// One interception with prompts, tool usages and thoughts.
    pub async fn interception(&self, id: Uuid) -> Result<Option<InterceptionRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {INTERCEPTION_COLUMNS} FROM interceptions i LEFT JOIN users u ON u.id = i.user_id WHERE i.id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut rows = vec![interception_from_row(&row)?];
        self.attach_children(&mut rows, true).await?;
        Ok(rows.pop())
    }

    /// Fills prompts, tool usages (and thoughts if asked) with one query per child table per
    /// chunk of ids, in insertion order.
    async fn attach_children(
        &self,
        rows: &mut [InterceptionRow],
        thoughts: bool,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let index: HashMap<String, usize> = rows
            .iter()
            .enumerate()
            .map(|(n, r)| (r.id.to_string(), n))
            .collect();
        let ids: Vec<String> = index.keys().cloned().collect();
        for chunk in ids.chunks(IN_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT interception_id, prompt, created_at FROM user_prompts WHERE interception_id IN ",
            );
            push_in_list(&mut qb, chunk.iter().cloned());
            qb.push(" ORDER BY id");
            for r in qb.build().fetch_all(self.pool).await? {
                let owner: String = r.try_get("interception_id")?;
                if let Some(&n) = index.get(&owner) {
                    rows[n].prompts.push(PromptRow {
                        prompt: r.try_get("prompt")?,
                        created_at: time_col(&r, "created_at")?,
                    });
                }
            }

            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT interception_id, tool_call_id, tool, input, injected, created_at FROM tool_usages WHERE interception_id IN ",
            );
            push_in_list(&mut qb, chunk.iter().cloned());
            qb.push(" ORDER BY id");
            for r in qb.build().fetch_all(self.pool).await? {
                let owner: String = r.try_get("interception_id")?;
                if let Some(&n) = index.get(&owner) {
                    rows[n].tool_usages.push(ToolUsageRow {
                        tool_call_id: r.try_get("tool_call_id")?,
                        tool: r.try_get("tool")?,
                        input: r.try_get("input")?,
                        injected: r.try_get("injected")?,
                        created_at: time_col(&r, "created_at")?,
                    });
                }
            }

            if thoughts {
                let mut qb = QueryBuilder::<Sqlite>::new(
                    "SELECT interception_id, content, source, created_at FROM model_thoughts WHERE interception_id IN ",
                );
                push_in_list(&mut qb, chunk.iter().cloned());
                qb.push(" ORDER BY id");
                for r in qb.build().fetch_all(self.pool).await? {
                    let owner: String = r.try_get("interception_id")?;
                    if let Some(&n) = index.get(&owner) {
                        rows[n].thoughts.push(ThoughtRow {
                            content: r.try_get("content")?,
                            source: r.try_get("source")?,
                            created_at: time_col(&r, "created_at")?,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    // ---- sessions ---------------------------------------------------------------------------

    /// The list position of session `key` under `filter`, for use as a cursor; `None` when no
    /// interception of that session passes the filter.
    pub async fn session_cursor(
        &self,
        filter: &InterceptionFilter,
        key: &str,
    ) -> Result<Option<SessionCursor>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT MAX(i.ended_at) FROM interceptions i INDEXED BY interceptions_session_id WHERE i.session_key = ",
        );
        qb.push_bind(key.to_string());
        filter.push(&mut qb, "i");
        let last: Option<i64> = qb.build_query_scalar().fetch_one(self.pool).await?;
        Ok(last.map(|last_active_ms| SessionCursor {
            last_active_ms,
            key: key.to_string(),
        }))
    }

    /// Sessions (interceptions passing `filter`, grouped by session key), ordered by last
    /// activity (latest `ended_at`) then key, newest first, strictly after `after`.
    ///
    /// Instead of aggregating every session to sort them, this walks the `(ended_at,
    /// session_key)` index backwards: the order in which session keys first appear in that walk
    /// is exactly the session order, so a page costs a few hundred index entries plus the
    /// aggregates of the sessions on it. Past a cursor, a session first met below the cursor may
    /// still have later activity above it (it was listed on an earlier page); those are
    /// recognised by their true last activity and skipped.
    pub async fn list_sessions(
        &self,
        filter: &InterceptionFilter,
        after: Option<&SessionCursor>,
        limit: u32,
    ) -> Result<SessionPage, StoreError> {
        // Grouping (rather than COUNT(DISTINCT)) lets SQLite stream over an index ordered by
        // session key instead of building a temporary b-tree; unfiltered, that index is
        // (session_key, id), which the planner does not pick by itself.
        let unfiltered = *filter == InterceptionFilter::default();
        let mut count = QueryBuilder::<Sqlite>::new(if unfiltered {
            "SELECT COUNT(*) FROM (SELECT 1 FROM interceptions i INDEXED BY interceptions_session_id WHERE 1=1"
        } else {
            "SELECT COUNT(*) FROM (SELECT 1 FROM interceptions i WHERE 1=1"
        });
        filter.push(&mut count, "i");
        count.push(" GROUP BY i.session_key)");
        let count: i64 = count.build_query_scalar().fetch_one(self.pool).await?;

        let limit = limit as usize;
        let batch: i64 = (limit as i64 * 4).clamp(256, 4096);
        let mut position: Option<(i64, String)> = after.map(|c| (c.last_active_ms, c.key.clone()));
        let mut seen: HashSet<String> = HashSet::new();
        let mut page: Vec<SessionSummary> = Vec::with_capacity(limit);
        while page.len() < limit {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT i.ended_at, i.session_key FROM interceptions i WHERE 1=1",
            );
            filter.push_unindexed_attributes(&mut qb, "i");
            if let Some((at, key)) = &position {
                qb.push(" AND i.ended_at <= ")
                    .push_bind(*at)
                    .push(" AND (i.ended_at < ")
                    .push_bind(*at)
                    .push(" OR i.session_key < ")
                    .push_bind(key.clone())
                    .push(")");
            }
            qb.push(" ORDER BY i.ended_at DESC, i.session_key DESC LIMIT ")
                .push_bind(batch);
            let rows = qb.build().fetch_all(self.pool).await?;
            let exhausted = (rows.len() as i64) < batch;
            let mut candidates: Vec<(i64, String)> = Vec::new();
            for r in &rows {
                let at: i64 = r.try_get(0)?;
                let key: String = r.try_get(1)?;
                if seen.insert(key.clone()) {
                    candidates.push((at, key.clone()));
                }
                position = Some((at, key));
            }
            if !candidates.is_empty() {
                let keys: Vec<String> = candidates.iter().map(|(_, k)| k.clone()).collect();
                let mut summaries = self.session_summaries(filter, &keys).await?;
                for (first_seen, key) in candidates {
                    let Some(s) = summaries.remove(&key) else {
                        continue;
                    };
                    // Activity later than where the walk met it: listed before the cursor.
                    if after.is_some() && millis(s.ended_at) != first_seen {
                        continue;
                    }
                    page.push(s);
                    if page.len() == limit {
                        break;
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        Ok(SessionPage {
            count,
            sessions: page,
        })
    }

    /// Aggregates of the given sessions over the interceptions passing `filter`.
    async fn session_summaries(
        &self,
        filter: &InterceptionFilter,
        keys: &[String],
    ) -> Result<HashMap<String, SessionSummary>, StoreError> {
        // Every query here names its sessions, so it must walk (session_key, id): given a
        // `user_id` term SQLite would otherwise pick the user's index and read all of a heavy
        // user's interceptions per session (measured: 230 ms instead of a few).
        let mut out = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(IN_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(format!(
                "SELECT i.session_key, MIN(i.started_at) AS started_at, MAX(i.ended_at) AS ended_at, \
                 COUNT(DISTINCT COALESCE(i.thread_root_id, i.id)) AS threads, \
                 json_group_array(DISTINCT i.provider) AS providers, \
                 json_group_array(DISTINCT i.model) AS models, {USAGE_SUMS} \
                 FROM interceptions i INDEXED BY interceptions_session_id WHERE i.session_key IN "
            ));
            push_in_list(&mut qb, chunk.iter().cloned());
            filter.push(&mut qb, "i");
            qb.push(" GROUP BY i.session_key");
            for r in qb.build().fetch_all(self.pool).await? {
                let key: String = r.try_get("session_key")?;
                let list = |column: &str| -> Result<Vec<String>, StoreError> {
                    let text: String = r.try_get(column)?;
                    let mut v: Vec<String> = serde_json::from_str(&text).map_err(|e| {
                        StoreError::Invalid(format!("bad {column} aggregate in database: {e}"))
                    })?;
                    v.sort();
                    Ok(v)
                };
                out.insert(
                    key.clone(),
                    SessionSummary {
                        key,
                        user_id: Uuid::nil(),
                        username: None,
                        client: String::new(),
                        providers: list("providers")?,
                        models: list("models")?,
                        started_at: time_col(&r, "started_at")?,
                        ended_at: time_col(&r, "ended_at")?,
                        threads: r.try_get("threads")?,
                        interception_count: r.try_get("interception_count")?,
                        usage: usage_cols(&r, "")?,
                        cost: NanoUsd(r.try_get("cost_nano_usd")?),
                        last_prompt: None,
                    },
                );
            }

            // The initiator, client and last prompt come from the latest interception (the
            // latest one with a prompt, for the prompt): one index probe per session on
            // (session_key, id).
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT k.column1 AS session_key, i.user_id, u.username, i.client, \
                 (SELECT p.prompt FROM interceptions x INDEXED BY interceptions_session_id JOIN user_prompts p ON p.interception_id = x.id \
                  WHERE x.session_key = k.column1",
            );
            filter.push(&mut qb, "x");
            qb.push(" ORDER BY x.id DESC, p.id DESC LIMIT 1) AS last_prompt FROM ");
            push_values_table(&mut qb, chunk);
            qb.push(
                " AS k JOIN interceptions i ON i.id = (SELECT x.id FROM interceptions x INDEXED BY interceptions_session_id WHERE x.session_key = k.column1",
            );
            filter.push(&mut qb, "x");
            qb.push(" ORDER BY x.id DESC LIMIT 1) LEFT JOIN users u ON u.id = i.user_id");
            for r in qb.build().fetch_all(self.pool).await? {
                let key: String = r.try_get("session_key")?;
                if let Some(s) = out.get_mut(&key) {
                    s.user_id = uuid_col(&r, "user_id")?;
                    s.username = r.try_get("username")?;
                    s.client = r.try_get("client")?;
                    s.last_prompt = r.try_get("last_prompt")?;
                }
            }
        }
        Ok(out)
    }

    /// Every interception of a session, oldest first, with all child rows.
    pub async fn session_interceptions(
        &self,
        key: &str,
    ) -> Result<Vec<InterceptionRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {INTERCEPTION_COLUMNS} FROM interceptions i LEFT JOIN users u ON u.id = i.user_id \
             WHERE i.session_key = ? ORDER BY i.id"
        ))
        .bind(key)
        .fetch_all(self.pool)
        .await?;
        let mut rows = rows
            .iter()
            .map(interception_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.attach_children(&mut rows, true).await?;
        Ok(rows)
    }

    // ---- usage ------------------------------------------------------------------------------

    /// Exact integer sums per group key, ordered by key. A user in several groups counts in
    /// each; users in no group do not appear in the group rollup.
    pub async fn usage(
        &self,
        group_by: UsageGroupBy,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let (key, label, from) = match group_by {
            UsageGroupBy::User => (
                "i.user_id",
                "MAX(u.username)",
                "interceptions i LEFT JOIN users u ON u.id = i.user_id",
            ),
            UsageGroupBy::Group => (
                "g.id",
                "MAX(g.name)",
                "interceptions i JOIN group_members gm ON gm.user_id = i.user_id JOIN groups g ON g.id = gm.group_id",
            ),
            UsageGroupBy::Model => ("i.model", "NULL", "interceptions i"),
            UsageGroupBy::Provider => ("i.provider", "NULL", "interceptions i"),
            UsageGroupBy::Client => ("i.client", "NULL", "interceptions i"),
            UsageGroupBy::Day => (
                "strftime('%Y-%m-%d', i.started_at / 1000, 'unixepoch')",
                "NULL",
                "interceptions i",
            ),
        };
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {key} AS k, {label} AS label, {USAGE_SUMS} FROM {from} WHERE 1=1"
        ));
        if let Some(t) = filter.from {
            qb.push(" AND i.started_at >= ").push_bind(millis(t));
        }
        if let Some(t) = filter.to {
            qb.push(" AND i.started_at < ").push_bind(millis(t));
        }
        if let Some(u) = filter.user_id {
            qb.push(" AND i.user_id = ").push_bind(u.to_string());
        }
        if let Some(m) = &filter.model {
            qb.push(" AND i.model = ").push_bind(m.clone());
        }
        qb.push(" GROUP BY k ORDER BY k");
        let mut out = Vec::new();
        for r in qb.build().fetch_all(self.pool).await? {
            out.push(UsageRow {
                key: r.try_get::<Option<String>, _>("k")?.unwrap_or_default(),
                label: r.try_get("label")?,
                usage: usage_cols(&r, "")?,
                cost: NanoUsd(r.try_get::<Option<i64>, _>("cost_nano_usd")?.unwrap_or(0)),
                interception_count: r.try_get("interception_count")?,
            });
        }
        Ok(out)
    }

    // ---- users ------------------------------------------------------------------------------

    /// A user by id, or by username when `reference` is not a UUID.
    pub async fn find_user_ref(&self, reference: &str) -> Result<Option<User>, StoreError> {
        let row = match Uuid::parse_str(reference) {
            Ok(id) => {
                sqlx::query("SELECT id, username, is_admin, created_at FROM users WHERE id = ?")
                    .bind(id.to_string())
                    .fetch_optional(self.pool)
                    .await?
            }
            Err(_) => {
                sqlx::query(
                    "SELECT id, username, is_admin, created_at FROM users WHERE username = ?",
                )
                .bind(reference)
                .fetch_optional(self.pool)
                .await?
            }
        };
        row.as_ref().map(user_from_row).transpose()
    }

    pub async fn user(&self, id: Uuid) -> Result<Option<UserDetail>, StoreError> {
        let row = sqlx::query("SELECT id, username, is_admin, created_at FROM users WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let user = user_from_row(&row)?;
        let mut groups = self.groups_of(&[user.id]).await?;
        Ok(Some(UserDetail {
            groups: groups.remove(&user.id).unwrap_or_default(),
            user,
        }))
    }

    /// Group memberships of several users, each list ordered by group name.
    async fn groups_of(&self, users: &[Uuid]) -> Result<HashMap<Uuid, Vec<GroupRef>>, StoreError> {
        let mut out: HashMap<Uuid, Vec<GroupRef>> = HashMap::new();
        for chunk in users.chunks(IN_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT gm.user_id, g.id, g.name FROM group_members gm JOIN groups g ON g.id = gm.group_id WHERE gm.user_id IN ",
            );
            push_in_list(&mut qb, chunk.iter().map(Uuid::to_string));
            qb.push(" ORDER BY g.name");
            for r in qb.build().fetch_all(self.pool).await? {
                out.entry(uuid_col(&r, "user_id")?)
                    .or_default()
                    .push(GroupRef {
                        id: uuid_col(&r, "id")?,
                        name: r.try_get("name")?,
                    });
            }
        }
        Ok(out)
    }

    /// Where a user list page starts: the (created_at, id) of user `id`, if it exists.
    pub async fn user_cursor(&self, id: Uuid) -> Result<Option<(i64, Uuid)>, StoreError> {
        let at: Option<i64> = sqlx::query_scalar("SELECT created_at FROM users WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(self.pool)
            .await?;
        Ok(at.map(|at| (at, id)))
    }

    /// Users newest first (created_at, then id), strictly after `after`, and the total count.
    pub async fn list_users(
        &self,
        after: Option<(i64, Uuid)>,
        limit: u32,
    ) -> Result<(i64, Vec<UserDetail>), StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(self.pool)
            .await?;
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT id, username, is_admin, created_at FROM users WHERE 1=1",
        );
        if let Some((at, id)) = after {
            qb.push(" AND (created_at < ")
                .push_bind(at)
                .push(" OR (created_at = ")
                .push_bind(at)
                .push(" AND id < ")
                .push_bind(id.to_string())
                .push("))");
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let users = qb
            .build()
            .fetch_all(self.pool)
            .await?
            .iter()
            .map(user_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<Uuid> = users.iter().map(|u| u.id).collect();
        let mut groups = self.groups_of(&ids).await?;
        let users = users
            .into_iter()
            .map(|user| UserDetail {
                groups: groups.remove(&user.id).unwrap_or_default(),
                user,
            })
            .collect();
        Ok((count, users))
    }

    /// Sets a user's admin flag; `None` when there is no such user.
    pub async fn set_user_admin(
        &self,
        id: Uuid,
        is_admin: bool,
    ) -> Result<Option<UserDetail>, StoreError> {
        let res = sqlx::query("UPDATE users SET is_admin = ?, updated_at = ? WHERE id = ?")
            .bind(is_admin)
            .bind(millis(Utc::now()))
            .bind(id.to_string())
            .execute(self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Ok(None);
        }
        self.user(id).await
    }

    /// Deletes a user with their keys, memberships, stored provider keys and spend limit.
    /// Their interceptions stay (history is not rewritten). False when there is no such user.
    pub async fn delete_user(&self, id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM spend_limits WHERE scope = 'user' AND scope_id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let res = sqlx::query("DELETE FROM users WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(res.rows_affected() > 0)
    }

    // ---- groups -----------------------------------------------------------------------------

    pub async fn create_group(&self, name: &str) -> Result<GroupDetail, StoreError> {
        validate_name("group", name)?;
        let id = Uuid::new_v4();
        let now = millis(Utc::now());
        let res = sqlx::query(
            "INSERT INTO groups (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(now)
        .execute(self.pool)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("group {name:?}")));
        }
        Ok(GroupDetail {
            id,
            name: name.to_string(),
            created_at: from_millis(now),
            members: Vec::new(),
        })
    }

    pub async fn group(&self, id: Uuid) -> Result<Option<GroupDetail>, StoreError> {
        let row = sqlx::query("SELECT id, name, created_at FROM groups WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let members = sqlx::query(
            "SELECT u.id, u.username FROM group_members gm JOIN users u ON u.id = gm.user_id \
             WHERE gm.group_id = ? ORDER BY u.username",
        )
        .bind(id.to_string())
        .fetch_all(self.pool)
        .await?
        .iter()
        .map(|r| Ok((uuid_col(r, "id")?, r.try_get("username")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(GroupDetail {
            id: uuid_col(&row, "id")?,
            name: row.try_get("name")?,
            created_at: time_col(&row, "created_at")?,
            members,
        }))
    }

    pub async fn group_cursor(&self, id: Uuid) -> Result<Option<(i64, Uuid)>, StoreError> {
        let at: Option<i64> = sqlx::query_scalar("SELECT created_at FROM groups WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(self.pool)
            .await?;
        Ok(at.map(|at| (at, id)))
    }

    /// Groups newest first with their member counts, and the total count. (Members themselves
    /// are listed by [`Queries::group`].)
    pub async fn list_groups(
        &self,
        after: Option<(i64, Uuid)>,
        limit: u32,
    ) -> Result<(i64, Vec<(GroupDetail, i64)>), StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM groups")
            .fetch_one(self.pool)
            .await?;
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT g.id, g.name, g.created_at, (SELECT COUNT(*) FROM group_members gm WHERE gm.group_id = g.id) AS members \
             FROM groups g WHERE 1=1",
        );
        if let Some((at, id)) = after {
            qb.push(" AND (g.created_at < ")
                .push_bind(at)
                .push(" OR (g.created_at = ")
                .push_bind(at)
                .push(" AND g.id < ")
                .push_bind(id.to_string())
                .push("))");
        }
        qb.push(" ORDER BY g.created_at DESC, g.id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let groups = qb
            .build()
            .fetch_all(self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    GroupDetail {
                        id: uuid_col(r, "id")?,
                        name: r.try_get("name")?,
                        created_at: time_col(r, "created_at")?,
                        members: Vec::new(),
                    },
                    r.try_get("members")?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((count, groups))
    }

    /// Deletes a group (memberships cascade) and its spend limit. False when there is none.
    pub async fn delete_group(&self, id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM spend_limits WHERE scope = 'group' AND scope_id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let res = sqlx::query("DELETE FROM groups WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(res.rows_affected() > 0)
    }

    /// Adds a member (idempotent). `NotFound` names the missing group or user.
    pub async fn add_group_member(&self, group: Uuid, user: Uuid) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let group_exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM groups WHERE id = ?")
            .bind(group.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if group_exists.is_none() {
            return Err(StoreError::NotFound(format!("group {group}")));
        }
        let user_exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM users WHERE id = ?")
            .bind(user.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if user_exists.is_none() {
            return Err(StoreError::NotFound(format!("user {user}")));
        }
        sqlx::query(
            "INSERT INTO group_members (group_id, user_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(group.to_string())
        .bind(user.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// False when the user was not a member of the group.
    pub async fn remove_group_member(&self, group: Uuid, user: Uuid) -> Result<bool, StoreError> {
        let res = sqlx::query("DELETE FROM group_members WHERE group_id = ? AND user_id = ?")
            .bind(group.to_string())
            .bind(user.to_string())
            .execute(self.pool)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    // ---- API keys ---------------------------------------------------------------------------

    /// A user's keys, newest first: ids, names and hints only (the store has no secrets).
    pub async fn api_keys(&self, user: Uuid) -> Result<Vec<super::ApiKeyInfo>, StoreError> {
        sqlx::query(
            "SELECT id, user_id, name, hint, created_at, revoked_at FROM api_keys WHERE user_id = ? \
             ORDER BY created_at DESC, id DESC",
        )
        .bind(user.to_string())
        .fetch_all(self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(super::ApiKeyInfo {
                id: uuid_col(r, "id")?,
                user_id: uuid_col(r, "user_id")?,
                name: r.try_get("name")?,
                hint: r.try_get("hint")?,
                created_at: time_col(r, "created_at")?,
                revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(from_millis),
            })
        })
        .collect()
    }

    /// Revokes key `key` of user `user`. `None` when the user has no such key; `Some(false)`
    /// when it was already revoked.
    pub async fn revoke_user_key(&self, user: Uuid, key: Uuid) -> Result<Option<bool>, StoreError> {
        let revoked: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = ? AND user_id = ?")
                .bind(key.to_string())
                .bind(user.to_string())
                .fetch_optional(self.pool)
                .await?;
        match revoked {
            None => Ok(None),
            Some(Some(_)) => Ok(Some(false)),
            Some(None) => {
                let now = millis(Utc::now());
                let res = sqlx::query(
                    "UPDATE api_keys SET revoked_at = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
                )
                .bind(now)
                .bind(now)
                .bind(key.to_string())
                .execute(self.pool)
                .await?;
                Ok(Some(res.rows_affected() > 0))
            }
        }
    }

    // ---- spend limits -----------------------------------------------------------------------

    pub async fn spend_limits(&self) -> Result<Vec<SpendLimitEntry>, StoreError> {
        sqlx::query(
            "SELECT s.scope, s.scope_id, s.limit_nano_usd, s.updated_at, COALESCE(u.username, g.name) AS scope_name \
             FROM spend_limits s \
             LEFT JOIN users u ON s.scope = 'user' AND u.id = s.scope_id \
             LEFT JOIN groups g ON s.scope = 'group' AND g.id = s.scope_id \
             ORDER BY CASE s.scope WHEN 'default' THEN 0 WHEN 'group' THEN 1 ELSE 2 END, scope_name, s.scope_id",
        )
        .fetch_all(self.pool)
        .await?
        .iter()
        .map(spend_limit_from_row)
        .collect()
    }

    /// Creates or replaces a spend limit. `NotFound` when the group or user does not exist.
    pub async fn set_spend_limit(
        &self,
        scope: SpendScope,
        limit: NanoUsd,
    ) -> Result<SpendLimitEntry, StoreError> {
        if limit.is_negative() {
            return Err(StoreError::Invalid(
                "a spend limit cannot be negative".into(),
            ));
        }
        let (kind, id) = scope.columns();
        let mut tx = self.pool.begin().await?;
        let name: Option<String> = match scope {
            SpendScope::Default => None,
            SpendScope::Group(g) => Some(
                sqlx::query_scalar("SELECT name FROM groups WHERE id = ?")
                    .bind(g.to_string())
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("group {g}")))?,
            ),
            SpendScope::User(u) => Some(
                sqlx::query_scalar("SELECT username FROM users WHERE id = ?")
                    .bind(u.to_string())
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("user {u}")))?,
            ),
        };
        let now = millis(Utc::now());
        sqlx::query(
            "INSERT INTO spend_limits (scope, scope_id, limit_nano_usd, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT(scope, scope_id) DO UPDATE SET limit_nano_usd = excluded.limit_nano_usd, updated_at = excluded.updated_at",
        )
        .bind(kind)
        .bind(&id)
        .bind(limit.0)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(SpendLimitEntry {
            scope: kind.to_string(),
            scope_id: match scope {
                SpendScope::Default => None,
                SpendScope::Group(x) | SpendScope::User(x) => Some(x),
            },
            scope_name: name,
            limit,
            updated_at: from_millis(now),
        })
    }

    /// False when there was no such limit.
    pub async fn delete_spend_limit(&self, scope: SpendScope) -> Result<bool, StoreError> {
        let (kind, id) = scope.columns();
        let res = sqlx::query("DELETE FROM spend_limits WHERE scope = ? AND scope_id = ?")
            .bind(kind)
            .bind(id)
            .execute(self.pool)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    // ---- price overrides --------------------------------------------------------------------

    pub async fn price_overrides(&self) -> Result<Vec<PriceOverride>, StoreError> {
        sqlx::query(
            "SELECT model, provider, input_nano, output_nano, cache_read_nano, cache_write_nano, output_limit, updated_at \
             FROM pricing ORDER BY model",
        )
        .fetch_all(self.pool)
        .await?
        .iter()
        .map(price_from_row)
        .collect()
    }

    /// Creates or replaces the override for `model`.
    pub async fn set_price_override(
        &self,
        model: &str,
        provider: &str,
        price: &ModelPrice,
    ) -> Result<PriceOverride, StoreError> {
        if model.trim().is_empty() || model.len() > 256 {
            return Err(StoreError::Invalid(
                "model: use 1-256 characters".to_string(),
            ));
        }
        if [
            price.input,
            price.output,
            price.cache_read,
            price.cache_write,
        ]
        .iter()
        .any(|p| p.is_negative())
        {
            return Err(StoreError::Invalid("prices cannot be negative".into()));
        }
        let output_limit = price
            .output_limit
            .map(|l| i64::try_from(l).unwrap_or(i64::MAX));
        let now = millis(Utc::now());
        sqlx::query(
            "INSERT INTO pricing (model, provider, input_nano, output_nano, cache_read_nano, cache_write_nano, output_limit, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(model) DO UPDATE SET provider = excluded.provider, \
             input_nano = excluded.input_nano, output_nano = excluded.output_nano, cache_read_nano = excluded.cache_read_nano, \
             cache_write_nano = excluded.cache_write_nano, output_limit = excluded.output_limit, updated_at = excluded.updated_at",
        )
        .bind(model)
        .bind(provider)
        .bind(price.input.0)
        .bind(price.output.0)
        .bind(price.cache_read.0)
        .bind(price.cache_write.0)
        .bind(output_limit)
        .bind(now)
        .execute(self.pool)
        .await?;
        Ok(PriceOverride {
            model: model.to_string(),
            provider: provider.to_string(),
            price: *price,
            updated_at: from_millis(now),
        })
    }

    /// False when `model` had no override.
    pub async fn delete_price_override(&self, model: &str) -> Result<bool, StoreError> {
        let res = sqlx::query("DELETE FROM pricing WHERE model = ?")
            .bind(model)
            .execute(self.pool)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    // ---- seats ------------------------------------------------------------------------------

    /// Users whose last interception is at or after `active_since`, earliest seat first.
    pub async fn seat_holders(
        &self,
        active_since: DateTime<Utc>,
    ) -> Result<Vec<SeatHolderRow>, StoreError> {
        sqlx::query(
            "SELECT s.user_id, u.username, s.first_used_at, s.last_used_at FROM seat_holders s \
             LEFT JOIN users u ON u.id = s.user_id WHERE s.last_used_at >= ? \
             ORDER BY s.first_used_at, s.user_id",
        )
        .bind(millis(active_since))
        .fetch_all(self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(SeatHolderRow {
                user_id: uuid_col(r, "user_id")?,
                username: r.try_get("username")?,
                first_used_at: time_col(r, "first_used_at")?,
                last_used_at: time_col(r, "last_used_at")?,
            })
        })
        .collect()
    }
}

fn spend_limit_from_row(r: &SqliteRow) -> Result<SpendLimitEntry, StoreError> {
    let scope_id: String = r.try_get("scope_id")?;
    Ok(SpendLimitEntry {
        scope: r.try_get("scope")?,
        scope_id: if scope_id.is_empty() {
            None
        } else {
            Some(parse_uuid(&scope_id)?)
        },
        scope_name: r.try_get("scope_name")?,
        limit: NanoUsd(r.try_get("limit_nano_usd")?),
        updated_at: time_col(r, "updated_at")?,
    })
}

fn price_from_row(r: &SqliteRow) -> Result<PriceOverride, StoreError> {
    Ok(PriceOverride {
        model: r.try_get("model")?,
        provider: r.try_get("provider")?,
        price: ModelPrice {
            input: NanoUsd(r.try_get("input_nano")?),
            output: NanoUsd(r.try_get("output_nano")?),
            cache_read: NanoUsd(r.try_get("cache_read_nano")?),
            cache_write: NanoUsd(r.try_get("cache_write_nano")?),
            output_limit: r
                .try_get::<Option<i64>, _>("output_limit")?
                .and_then(|l| u64::try_from(l).ok()),
        },
        updated_at: time_col(r, "updated_at")?,
    })
}

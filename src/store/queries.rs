//! The queries behind the management API: reading interceptions, sessions and usage rollups, and
//! the CRUD of users, groups, keys, spend limits, price overrides and seat holders.
//!
//! Everything is reached through [`Store::queries`], which returns a [`Queries`] view of the
//! pool; keeping these methods off `Store` itself leaves its namespace to the gateway's own
//! queries. Lists are keyset-paginated and every child table is fetched for a whole page with
//! one `IN (...)` query per table (never one query per row).
//!
//! Each method is written once and runs on SQLite or PostgreSQL through `per_backend!` (see
//! `dialect.rs`): the SQL is shared, with the few dialect differences (index hints, distinct
//! lists, day bucketing, id/time binds) supplied per backend.
//!
//! Not here: who may see what (the API layer filters by caller before it asks), HTTP shapes, or
//! writing interceptions (the recorder).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::dialect::{per_backend, DbRow, Dialect};
use super::{from_millis, millis, parse_uuid, validate_name, Store, StoreError, User};
use crate::money::{ModelPrice, NanoUsd};
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
    fn push<D: Dialect>(&self, qb: &mut QueryBuilder<'_, D>, alias: &str) {
        self.push_terms(qb, alias, "");
    }

    /// As [`InterceptionFilter::push`], but with provider, model and client terms written
    /// `+alias.column` (SQLite's way of saying "do not use an index for this term"), so a walk
    /// in `ORDER BY` order keeps to its ordered index instead of collecting and sorting every
    /// row of, say, one model. (PostgreSQL has no such hint; its planner picks the walk.)
    fn push_unindexed_attributes<D: Dialect>(&self, qb: &mut QueryBuilder<'_, D>, alias: &str) {
        self.push_terms(qb, alias, D::UNINDEXED);
    }

    fn push_terms<D: Dialect>(
        &self,
        qb: &mut QueryBuilder<'_, D>,
        alias: &str,
        attribute_prefix: &str,
    ) {
        if let Some(u) = self.user_id {
            qb.push(format!(" AND {alias}.user_id = "));
            D::push_id(qb, u);
        }
        for (column, value) in [
            ("provider", &self.provider),
            ("model", &self.model),
            ("client", &self.client),
        ] {
            if let Some(v) = value {
                qb.push(format!(" AND {attribute_prefix}{alias}.{column} = "));
                D::push_text(qb, v.clone());
            }
        }
        if let Some(v) = &self.session_key {
            qb.push(format!(" AND {alias}.session_key = "));
            D::push_text(qb, v.clone());
        }
        if let Some(t) = self.started_after {
            qb.push(format!(" AND {alias}.started_at >= "));
            D::push_ms(qb, millis(t));
        }
        if let Some(t) = self.started_before {
            qb.push(format!(" AND {alias}.started_at < "));
            D::push_ms(qb, millis(t));
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
    /// `reported`, `estimated` or `none`.
    pub usage_source: String,
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

/// Where a part of a usage report is summed from.
#[derive(Clone, Copy)]
enum UsageSource {
    Interceptions,
    Hourly,
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
    store: &'a Store,
}

impl Store {
    pub fn queries(&self) -> Queries<'_> {
        Queries { store: self }
    }
}

const INTERCEPTION_COLUMNS: &str =
    "i.id, i.user_id, u.username, i.api_key_id, i.provider, i.model, \
     i.response_model, i.client, i.client_session_id, i.session_key, i.thread_parent_id, \
     i.thread_root_id, i.credential_kind, i.credential_hint, i.status, i.upstream_status, i.error, \
     i.streaming, i.started_at, i.ended_at, i.ttfb_ms, i.input_tokens, i.output_tokens, \
     i.cache_read_input_tokens, i.cache_write_input_tokens, i.reasoning_tokens, i.cost_nano_usd, \
     i.priced, i.usage_source";

fn count_col<R: DbRow>(row: &R, column: &str) -> Result<u64, StoreError> {
    Ok(u64::try_from(row.int(column)?).unwrap_or(0))
}

/// Reads the five token columns (or their sums) named `prefix` + column name.
fn usage_cols<R: DbRow>(row: &R, prefix: &str) -> Result<UsageSums, StoreError> {
    Ok(TokenUsage {
        input: count_col(row, &format!("{prefix}input_tokens"))?,
        output: count_col(row, &format!("{prefix}output_tokens"))?,
        cache_read: count_col(row, &format!("{prefix}cache_read_input_tokens"))?,
        cache_write: count_col(row, &format!("{prefix}cache_write_input_tokens"))?,
        reasoning: count_col(row, &format!("{prefix}reasoning_tokens"))?,
    })
}

/// The casts keep sums integers on PostgreSQL (its SUM of bigint is numeric); on SQLite they
/// change nothing.
const USAGE_SUMS: &str = "CAST(SUM(i.input_tokens) AS BIGINT) AS input_tokens, \
     CAST(SUM(i.output_tokens) AS BIGINT) AS output_tokens, \
     CAST(SUM(i.cache_read_input_tokens) AS BIGINT) AS cache_read_input_tokens, \
     CAST(SUM(i.cache_write_input_tokens) AS BIGINT) AS cache_write_input_tokens, \
     CAST(SUM(i.reasoning_tokens) AS BIGINT) AS reasoning_tokens, \
     CAST(SUM(i.cost_nano_usd) AS BIGINT) AS cost_nano_usd, \
     COUNT(*) AS interception_count";

fn interception_from_row<R: DbRow>(row: &R) -> Result<InterceptionRow, StoreError> {
    Ok(InterceptionRow {
        id: row.uuid("id")?,
        user_id: row.uuid("user_id")?,
        username: row.opt_text("username")?,
        api_key_id: row.opt_uuid("api_key_id")?,
        provider: row.text("provider")?,
        model: row.text("model")?,
        response_model: row.opt_text("response_model")?,
        client: row.text("client")?,
        client_session_id: row.opt_text("client_session_id")?,
        session_key: row.text("session_key")?,
        thread_parent_id: row.opt_uuid("thread_parent_id")?,
        thread_root_id: row.opt_uuid("thread_root_id")?,
        credential_kind: row.text("credential_kind")?,
        credential_hint: row.opt_text("credential_hint")?,
        status: row.text("status")?,
        upstream_status: row
            .opt_int("upstream_status")?
            .and_then(|s| u16::try_from(s).ok()),
        error: row.opt_text("error")?,
        streaming: row.boolean("streaming")?,
        started_at: row.time("started_at")?,
        ended_at: row.time("ended_at")?,
        ttfb_ms: row.opt_int("ttfb_ms")?.and_then(|v| u64::try_from(v).ok()),
        usage: usage_cols(row, "")?,
        cost: NanoUsd(row.int("cost_nano_usd")?),
        priced: row.boolean("priced")?,
        usage_source: row.text("usage_source")?,
        prompts: Vec::new(),
        tool_usages: Vec::new(),
        thoughts: Vec::new(),
    })
}

fn user_from_row<R: DbRow>(row: &R) -> Result<User, StoreError> {
    Ok(User {
        id: row.uuid("id")?,
        username: row.text("username")?,
        is_admin: row.boolean("is_admin")?,
        created_at: row.time("created_at")?,
    })
}

/// Pushes `(?, ?, ...)` binding each id.
fn push_id_list<D: Dialect>(qb: &mut QueryBuilder<'_, D>, ids: &[Uuid]) {
    qb.push("(");
    for (n, id) in ids.iter().enumerate() {
        if n > 0 {
            qb.push(", ");
        }
        D::push_id(qb, *id);
    }
    qb.push(")");
}

/// Pushes `(?, ?, ...)` binding each text value.
fn push_text_list<D: Dialect>(qb: &mut QueryBuilder<'_, D>, values: &[String]) {
    qb.push("(");
    for (n, v) in values.iter().enumerate() {
        if n > 0 {
            qb.push(", ");
        }
        D::push_text(qb, v.clone());
    }
    qb.push(")");
}

impl<'a> Queries<'a> {
    // ---- interceptions ----------------------------------------------------------------------
    //
    // Written once for both backends (see `dialect`): statements are assembled with a
    // `QueryBuilder::<Db>` and ids/times pushed through `Db::push_id` / `Db::push_ms`.

    /// Newest first (ids are UUIDv7, so id order is start order), strictly older than `after`.
    pub async fn list_interceptions(
        &self,
        filter: &InterceptionFilter,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<InterceptionPage, StoreError> {
        let (count, mut rows) = per_backend!(self.store, |pool| {
            let mut count =
                QueryBuilder::<Db>::new("SELECT COUNT(*) FROM interceptions i WHERE 1=1");
            filter.push(&mut count, "i");
            let count: i64 = count.build_query_scalar().fetch_one(pool).await?;

            let mut qb = QueryBuilder::<Db>::new(format!(
                "SELECT {INTERCEPTION_COLUMNS} FROM interceptions i LEFT JOIN users u ON u.id = i.user_id WHERE 1=1"
            ));
            // Walk the id index (newest first) rather than sort every row of a model or client.
            filter.push_unindexed_attributes(&mut qb, "i");
            if let Some(after) = after {
                qb.push(" AND i.id < ");
                Db::push_id(&mut qb, after);
            }
            qb.push(" ORDER BY i.id DESC LIMIT ");
            Db::push_int(&mut qb, i64::from(limit));
            let rows = qb
                .build()
                .fetch_all(pool)
                .await?
                .iter()
                .map(interception_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            (count, rows)
        });
        self.attach_children(&mut rows, false).await?;
        Ok(InterceptionPage { count, rows })
    }

    /// One interception with prompts, tool usages and thoughts.
    pub async fn interception(&self, iid: Uuid) -> Result<Option<InterceptionRow>, StoreError> {
        let row = per_backend!(self.store, |pool| {
            sqlx::query(&sql(&format!(
                "SELECT {INTERCEPTION_COLUMNS} FROM interceptions i LEFT JOIN users u ON u.id = i.user_id WHERE i.id = ?"
            )))
            .bind(id(iid))
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(interception_from_row)
            .transpose()?
        });
        let Some(row) = row else { return Ok(None) };
        let mut rows = vec![row];
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
        let index: HashMap<Uuid, usize> = rows.iter().enumerate().map(|(n, r)| (r.id, n)).collect();
        let ids: Vec<Uuid> = index.keys().copied().collect();
        for chunk in ids.chunks(IN_CHUNK) {
            per_backend!(self.store, |pool| {
                let mut qb = QueryBuilder::<Db>::new(
                    "SELECT interception_id, prompt, created_at FROM user_prompts WHERE interception_id IN ",
                );
                push_id_list(&mut qb, chunk);
                qb.push(" ORDER BY id");
                for r in qb.build().fetch_all(pool).await? {
                    if let Some(&n) = index.get(&r.uuid("interception_id")?) {
                        rows[n].prompts.push(PromptRow {
                            prompt: r.text("prompt")?,
                            created_at: r.time("created_at")?,
                        });
                    }
                }

                let mut qb = QueryBuilder::<Db>::new(
                    "SELECT interception_id, tool_call_id, tool, input, injected, created_at FROM tool_usages WHERE interception_id IN ",
                );
                push_id_list(&mut qb, chunk);
                qb.push(" ORDER BY id");
                for r in qb.build().fetch_all(pool).await? {
                    if let Some(&n) = index.get(&r.uuid("interception_id")?) {
                        rows[n].tool_usages.push(ToolUsageRow {
                            tool_call_id: r.text("tool_call_id")?,
                            tool: r.text("tool")?,
                            input: r.text("input")?,
                            injected: r.boolean("injected")?,
                            created_at: r.time("created_at")?,
                        });
                    }
                }

                if thoughts {
                    let mut qb = QueryBuilder::<Db>::new(
                        "SELECT interception_id, content, source, created_at FROM model_thoughts WHERE interception_id IN ",
                    );
                    push_id_list(&mut qb, chunk);
                    qb.push(" ORDER BY id");
                    for r in qb.build().fetch_all(pool).await? {
                        if let Some(&n) = index.get(&r.uuid("interception_id")?) {
                            rows[n].thoughts.push(ThoughtRow {
                                content: r.text("content")?,
                                source: r.text("source")?,
                                created_at: r.time("created_at")?,
                            });
                        }
                    }
                }
            });
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
        let last: Option<i64> = per_backend!(self.store, |pool| {
            let mut qb = QueryBuilder::<Db>::new(format!(
                "SELECT MAX(i.ended_at) AS last FROM interceptions i{} WHERE i.session_key = ",
                Db::BY_SESSION_INDEX
            ));
            Db::push_text(&mut qb, key.to_string());
            filter.push(&mut qb, "i");
            qb.build().fetch_one(pool).await?.opt_ms("last")?
        });
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
        let count: i64 = per_backend!(self.store, |pool| {
            let mut count = QueryBuilder::<Db>::new(format!(
                "SELECT COUNT(*) FROM (SELECT 1 FROM interceptions i{} WHERE 1=1",
                if unfiltered { Db::BY_SESSION_INDEX } else { "" }
            ));
            filter.push(&mut count, "i");
            count.push(" GROUP BY i.session_key) AS s");
            count.build_query_scalar().fetch_one(pool).await?
        });

        let limit = limit as usize;
        let batch: i64 = (limit as i64 * 4).clamp(256, 4096);
        let mut position: Option<(i64, String)> = after.map(|c| (c.last_active_ms, c.key.clone()));
        let mut seen: HashSet<String> = HashSet::new();
        let mut page: Vec<SessionSummary> = Vec::with_capacity(limit);
        while page.len() < limit {
            let walked: Vec<(i64, String)> = per_backend!(self.store, |pool| {
                let mut qb = QueryBuilder::<Db>::new(
                    "SELECT i.ended_at, i.session_key FROM interceptions i WHERE 1=1",
                );
                filter.push_unindexed_attributes(&mut qb, "i");
                if let Some((at, key)) = &position {
                    qb.push(" AND i.ended_at <= ");
                    Db::push_ms(&mut qb, *at);
                    qb.push(" AND (i.ended_at < ");
                    Db::push_ms(&mut qb, *at);
                    qb.push(" OR i.session_key < ");
                    Db::push_text(&mut qb, key.clone());
                    qb.push(")");
                }
                qb.push(" ORDER BY i.ended_at DESC, i.session_key DESC LIMIT ");
                Db::push_int(&mut qb, batch);
                qb.build()
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| Ok((r.ms("ended_at")?, r.text("session_key")?)))
                    .collect::<Result<Vec<_>, StoreError>>()?
            });
            let exhausted = (walked.len() as i64) < batch;
            let mut candidates: Vec<(i64, String)> = Vec::new();
            for (at, key) in walked {
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
            per_backend!(self.store, |pool| {
                let mut qb = QueryBuilder::<Db>::new(format!(
                    "SELECT i.session_key, MIN(i.started_at) AS started_at, MAX(i.ended_at) AS ended_at, \
                     COUNT(DISTINCT COALESCE(i.thread_root_id, i.id)) AS threads, \
                     {} AS providers, {} AS models, {USAGE_SUMS} \
                     FROM interceptions i{} WHERE i.session_key IN ",
                    Db::distinct_list("i.provider"),
                    Db::distinct_list("i.model"),
                    Db::BY_SESSION_INDEX
                ));
                push_text_list(&mut qb, chunk);
                filter.push(&mut qb, "i");
                qb.push(" GROUP BY i.session_key");
                for r in qb.build().fetch_all(pool).await? {
                    let key = r.text("session_key")?;
                    let mut providers = r.list("providers")?;
                    providers.sort();
                    let mut models = r.list("models")?;
                    models.sort();
                    out.insert(
                        key.clone(),
                        SessionSummary {
                            key,
                            user_id: Uuid::nil(),
                            username: None,
                            client: String::new(),
                            providers,
                            models,
                            started_at: r.time("started_at")?,
                            ended_at: r.time("ended_at")?,
                            threads: r.int("threads")?,
                            interception_count: r.int("interception_count")?,
                            usage: usage_cols(&r, "")?,
                            cost: NanoUsd(r.int("cost_nano_usd")?),
                            last_prompt: None,
                        },
                    );
                }

                // The initiator, client and last prompt come from the latest interception (the
                // latest one with a prompt, for the prompt): one index probe per session on
                // (session_key, id). Both backends name a VALUES list's column `column1`.
                let mut qb = QueryBuilder::<Db>::new(format!(
                    "SELECT k.column1 AS session_key, i.user_id, u.username, i.client, \
                     (SELECT p.prompt FROM interceptions x{} JOIN user_prompts p ON p.interception_id = x.id \
                      WHERE x.session_key = k.column1",
                    Db::BY_SESSION_INDEX
                ));
                filter.push(&mut qb, "x");
                qb.push(" ORDER BY x.id DESC, p.id DESC LIMIT 1) AS last_prompt FROM (VALUES ");
                let mut sep = qb.separated(", ");
                for k in chunk {
                    sep.push("(");
                    sep.push_bind_unseparated(k.clone());
                    sep.push_unseparated(")");
                }
                qb.push(format!(
                    ") AS k JOIN interceptions i ON i.id = (SELECT x.id FROM interceptions x{} WHERE x.session_key = k.column1",
                    Db::BY_SESSION_INDEX
                ));
                filter.push(&mut qb, "x");
                qb.push(" ORDER BY x.id DESC LIMIT 1) LEFT JOIN users u ON u.id = i.user_id");
                for r in qb.build().fetch_all(pool).await? {
                    let key = r.text("session_key")?;
                    if let Some(s) = out.get_mut(&key) {
                        s.user_id = r.uuid("user_id")?;
                        s.username = r.opt_text("username")?;
                        s.client = r.text("client")?;
                        s.last_prompt = r.opt_text("last_prompt")?;
                    }
                }
            });
        }
        Ok(out)
    }

    /// Every interception of a session, oldest first, with all child rows.
    pub async fn session_interceptions(
        &self,
        key: &str,
    ) -> Result<Vec<InterceptionRow>, StoreError> {
        let mut rows = per_backend!(self.store, |pool| {
            sqlx::query(&sql(&format!(
                "SELECT {INTERCEPTION_COLUMNS} FROM interceptions i LEFT JOIN users u ON u.id = i.user_id \
                 WHERE i.session_key = ? ORDER BY i.id"
            )))
            .bind(key)
            .fetch_all(pool)
            .await?
            .iter()
            .map(interception_from_row)
            .collect::<Result<Vec<_>, _>>()?
        });
        self.attach_children(&mut rows, true).await?;
        Ok(rows)
    }

    // ---- usage ------------------------------------------------------------------------------

    /// Exact integer sums per group key, ordered by key. A user in several groups counts in
    /// each; users in no group do not appear in the group rollup.
    ///
    /// Whole UTC hours inside the range are read from the hourly rollup (kept exact by the
    /// recorder and retention), the partial hours at either end from the interceptions, and the
    /// parts are added up per key: a month's report reads a few thousand buckets, not every call.
    pub async fn usage(
        &self,
        group_by: UsageGroupBy,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let from = filter.from.map(millis);
        let to = filter.to.map(millis);
        let hour = super::rollup::HOUR_MS;
        // The whole hours: [first, last) with None for an open end.
        let first = from.map(|f| -(-f).div_euclid(hour) * hour);
        let last = to.map(|t| t.div_euclid(hour) * hour);
        let mut parts = Vec::with_capacity(3);
        match (first, last) {
            (Some(a), Some(b)) if a >= b => parts.push((UsageSource::Interceptions, from, to)),
            _ => {
                if let (Some(f), Some(a)) = (from, first) {
                    if f < a {
                        parts.push((UsageSource::Interceptions, Some(f), Some(a)));
                    }
                }
                parts.push((UsageSource::Hourly, first, last));
                if let (Some(b), Some(t)) = (last, to) {
                    if b < t {
                        parts.push((UsageSource::Interceptions, Some(b), Some(t)));
                    }
                }
            }
        }
        let mut merged: std::collections::BTreeMap<String, UsageRow> = Default::default();
        for (source, from, to) in parts {
            for row in self.usage_part(group_by, source, from, to, filter).await? {
                match merged.get_mut(&row.key) {
                    None => {
                        merged.insert(row.key.clone(), row);
                    }
                    Some(acc) => {
                        acc.usage.input += row.usage.input;
                        acc.usage.output += row.usage.output;
                        acc.usage.cache_read += row.usage.cache_read;
                        acc.usage.cache_write += row.usage.cache_write;
                        acc.usage.reasoning += row.usage.reasoning;
                        acc.cost = NanoUsd(acc.cost.0.saturating_add(row.cost.0));
                        acc.interception_count += row.interception_count;
                        if acc.label.is_none() {
                            acc.label = row.label;
                        }
                    }
                }
            }
        }
        Ok(merged.into_values().collect())
    }

    /// Interceptions started per UTC hour from `from` (an hour start) on, from the hourly
    /// rollup: (hour start, count), hours without calls left out.
    pub async fn interceptions_per_hour(
        &self,
        from: DateTime<Utc>,
        user_id: Option<Uuid>,
    ) -> Result<Vec<(DateTime<Utc>, i64)>, StoreError> {
        per_backend!(self.store, |pool| {
            let mut qb = QueryBuilder::<Db>::new(
                "SELECT hour, CAST(SUM(interception_count) AS BIGINT) AS n FROM usage_hourly WHERE hour >= ",
            );
            Db::push_ms(&mut qb, millis(from));
            if let Some(u) = user_id {
                qb.push(" AND user_id = ");
                Db::push_id(&mut qb, u);
            }
            qb.push(" GROUP BY hour ORDER BY hour");
            let mut out = Vec::new();
            for r in qb.build().fetch_all(pool).await? {
                out.push((r.time("hour")?, r.int("n")?));
            }
            Ok(out)
        })
    }

    /// One part of [`Queries::usage`]: sums per key over `[from, to)` (ms) from one source.
    async fn usage_part(
        &self,
        group_by: UsageGroupBy,
        source: UsageSource,
        from: Option<i64>,
        to: Option<i64>,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let (table, time, sums) = match source {
            UsageSource::Interceptions => ("interceptions", "i.started_at", USAGE_SUMS.to_string()),
            UsageSource::Hourly => (
                "usage_hourly",
                "i.hour",
                USAGE_SUMS.replace("COUNT(*)", "CAST(SUM(i.interception_count) AS BIGINT)"),
            ),
        };
        // Sums per raw key first (a user id, a model, a day), then names joined to those few
        // rows: joining the user (or their groups) to every bucket made the user report several
        // times dearer than the others on a large range.
        per_backend!(self.store, |pool| {
            let inner_key = match group_by {
                // Not in the order of `usage_hourly_user`: a scan and a sort beat a walk of
                // the index that visits the table once per bucket.
                UsageGroupBy::User | UsageGroupBy::Group => format!("{}i.user_id", Db::UNINDEXED),
                UsageGroupBy::Model => "i.model".to_string(),
                UsageGroupBy::Provider => "i.provider".to_string(),
                UsageGroupBy::Client => "i.client".to_string(),
                UsageGroupBy::Day => Db::utc_day(time),
            };
            let (outer, close) = match group_by {
                UsageGroupBy::User => (
                    format!(
                        "SELECT {} AS k, u.username AS label, s.input_tokens, s.output_tokens, \
                         s.cache_read_input_tokens, s.cache_write_input_tokens, s.reasoning_tokens, \
                         s.cost_nano_usd, s.interception_count FROM (",
                        Db::as_text("s.k")
                    ),
                    ") s LEFT JOIN users u ON u.id = s.k",
                ),
                UsageGroupBy::Group => (
                    format!(
                        "SELECT {} AS k, MAX(g.name) AS label, {} FROM (",
                        Db::as_text("g.id"),
                        USAGE_SUMS
                            .replace("i.", "s.")
                            .replace("COUNT(*)", "CAST(SUM(s.interception_count) AS BIGINT)")
                    ),
                    ") s JOIN group_members gm ON gm.user_id = s.k \
                     JOIN groups g ON g.id = gm.group_id GROUP BY g.id",
                ),
                _ => (String::new(), ""),
            };
            let mut qb = QueryBuilder::<Db>::new(format!(
                "{outer}SELECT {inner_key} AS k, NULL AS label, {sums} FROM {table} i WHERE 1=1"
            ));
            if let Some(t) = from {
                qb.push(format!(" AND {time} >= "));
                Db::push_ms(&mut qb, t);
            }
            if let Some(t) = to {
                qb.push(format!(" AND {time} < "));
                Db::push_ms(&mut qb, t);
            }
            if let Some(u) = filter.user_id {
                qb.push(" AND i.user_id = ");
                Db::push_id(&mut qb, u);
            }
            if let Some(m) = &filter.model {
                qb.push(" AND i.model = ");
                Db::push_text(&mut qb, m.clone());
            }
            qb.push(format!(" GROUP BY {inner_key}{close}"));
            let mut out = Vec::new();
            for r in qb.build().fetch_all(pool).await? {
                out.push(UsageRow {
                    key: r.opt_text("k")?.unwrap_or_default(),
                    label: r.opt_text("label")?,
                    usage: usage_cols(&r, "")?,
                    cost: NanoUsd(r.int("cost_nano_usd")?),
                    interception_count: r.int("interception_count")?,
                });
            }
            Ok(out)
        })
    }

    // ---- users ------------------------------------------------------------------------------
    //
    // From here on every method is written once for both backends (see `dialect`): ids go
    // through `id()`, times through `ms()`, statements through `sql()`.

    /// A user by id, or by username when `reference` is not a UUID.
    pub async fn find_user_ref(&self, reference: &str) -> Result<Option<User>, StoreError> {
        per_backend!(self.store, |pool| {
            let row =
                match Uuid::parse_str(reference) {
                    Ok(uid) => {
                        sqlx::query(&sql(
                            "SELECT id, username, is_admin, created_at FROM users WHERE id = ?",
                        ))
                        .bind(id(uid))
                        .fetch_optional(pool)
                        .await?
                    }
                    Err(_) => sqlx::query(&sql(
                        "SELECT id, username, is_admin, created_at FROM users WHERE username = ?",
                    ))
                    .bind(reference)
                    .fetch_optional(pool)
                    .await?,
                };
            row.as_ref().map(user_from_row).transpose()
        })
    }

    pub async fn user(&self, uid: Uuid) -> Result<Option<UserDetail>, StoreError> {
        let user = per_backend!(self.store, |pool| {
            sqlx::query(&sql(
                "SELECT id, username, is_admin, created_at FROM users WHERE id = ?",
            ))
            .bind(id(uid))
            .fetch_optional(pool)
            .await?
            .as_ref()
            .map(user_from_row)
            .transpose()?
        });
        let Some(user) = user else { return Ok(None) };
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
            per_backend!(self.store, |pool| {
                let mut qb = QueryBuilder::<Db>::new(
                    "SELECT gm.user_id, g.id, g.name FROM group_members gm JOIN groups g ON g.id = gm.group_id WHERE gm.user_id IN (",
                );
                let mut sep = qb.separated(", ");
                for u in chunk {
                    sep.push_bind(id(*u));
                }
                qb.push(") ORDER BY g.name");
                for r in qb.build().fetch_all(pool).await? {
                    out.entry(r.uuid("user_id")?).or_default().push(GroupRef {
                        id: r.uuid("id")?,
                        name: r.text("name")?,
                    });
                }
            });
        }
        Ok(out)
    }

    /// Where a user list page starts: the (created_at, id) of user `id`, if it exists.
    pub async fn user_cursor(&self, uid: Uuid) -> Result<Option<(i64, Uuid)>, StoreError> {
        per_backend!(self.store, |pool| {
            let row = sqlx::query(&sql("SELECT created_at FROM users WHERE id = ?"))
                .bind(id(uid))
                .fetch_optional(pool)
                .await?;
            Ok(match row {
                Some(r) => Some((r.ms("created_at")?, uid)),
                None => None,
            })
        })
    }

    /// Users newest first (created_at, then id), strictly after `after`, and the total count.
    pub async fn list_users(
        &self,
        after: Option<(i64, Uuid)>,
        limit: u32,
    ) -> Result<(i64, Vec<UserDetail>), StoreError> {
        let (count, users) = per_backend!(self.store, |pool| {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
                .fetch_one(pool)
                .await?;
            let mut qb = QueryBuilder::<Db>::new(
                "SELECT id, username, is_admin, created_at FROM users WHERE 1=1",
            );
            if let Some((at, uid)) = after {
                qb.push(" AND (created_at < ")
                    .push_bind(ms(at))
                    .push(" OR (created_at = ")
                    .push_bind(ms(at))
                    .push(" AND id < ")
                    .push_bind(id(uid))
                    .push("))");
            }
            qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
                .push_bind(i64::from(limit));
            let users = qb
                .build()
                .fetch_all(pool)
                .await?
                .iter()
                .map(user_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            (count, users)
        });
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
        uid: Uuid,
        is_admin: bool,
    ) -> Result<Option<UserDetail>, StoreError> {
        let affected = per_backend!(self.store, |pool| {
            sqlx::query(&sql(
                "UPDATE users SET is_admin = ?, updated_at = ? WHERE id = ?",
            ))
            .bind(is_admin)
            .bind(ms(millis(Utc::now())))
            .bind(id(uid))
            .execute(pool)
            .await?
            .rows_affected()
        });
        if affected == 0 {
            return Ok(None);
        }
        self.user(uid).await
    }

    /// Deletes a user with their keys, memberships, stored provider keys and spend limit.
    /// Their interceptions stay (history is not rewritten). False when there is no such user.
    pub async fn delete_user(&self, uid: Uuid) -> Result<bool, StoreError> {
        per_backend!(self.store, |pool| {
            let mut tx = pool.begin().await?;
            // spend_limits.scope_id is text on both backends ('' for the default scope).
            sqlx::query(&sql(
                "DELETE FROM spend_limits WHERE scope = 'user' AND scope_id = ?",
            ))
            .bind(uid.to_string())
            .execute(&mut *tx)
            .await?;
            let res = sqlx::query(&sql("DELETE FROM users WHERE id = ?"))
                .bind(id(uid))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(res.rows_affected() > 0)
        })
    }

    // ---- groups -----------------------------------------------------------------------------

    pub async fn create_group(&self, name: &str) -> Result<GroupDetail, StoreError> {
        validate_name("group", name)?;
        let gid = Uuid::new_v4();
        let now = millis(Utc::now());
        let affected = per_backend!(self.store, |pool| {
            sqlx::query(&sql(
                "INSERT INTO groups (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING",
            ))
            .bind(id(gid))
            .bind(name)
            .bind(ms(now))
            .execute(pool)
            .await?
            .rows_affected()
        });
        if affected == 0 {
            return Err(StoreError::Conflict(format!("group {name:?}")));
        }
        Ok(GroupDetail {
            id: gid,
            name: name.to_string(),
            created_at: from_millis(now),
            members: Vec::new(),
        })
    }

    pub async fn group(&self, gid: Uuid) -> Result<Option<GroupDetail>, StoreError> {
        per_backend!(self.store, |pool| {
            let row = sqlx::query(&sql("SELECT id, name, created_at FROM groups WHERE id = ?"))
                .bind(id(gid))
                .fetch_optional(pool)
                .await?;
            let Some(row) = row else { return Ok(None) };
            let members = sqlx::query(&sql(
                "SELECT u.id, u.username FROM group_members gm JOIN users u ON u.id = gm.user_id \
                 WHERE gm.group_id = ? ORDER BY u.username",
            ))
            .bind(id(gid))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok((r.uuid("id")?, r.text("username")?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(Some(GroupDetail {
                id: row.uuid("id")?,
                name: row.text("name")?,
                created_at: row.time("created_at")?,
                members,
            }))
        })
    }

    pub async fn group_cursor(&self, gid: Uuid) -> Result<Option<(i64, Uuid)>, StoreError> {
        per_backend!(self.store, |pool| {
            let row = sqlx::query(&sql("SELECT created_at FROM groups WHERE id = ?"))
                .bind(id(gid))
                .fetch_optional(pool)
                .await?;
            Ok(match row {
                Some(r) => Some((r.ms("created_at")?, gid)),
                None => None,
            })
        })
    }

    /// Groups newest first with their member counts, and the total count. (Members themselves
    /// are listed by [`Queries::group`].)
    pub async fn list_groups(
        &self,
        after: Option<(i64, Uuid)>,
        limit: u32,
    ) -> Result<(i64, Vec<(GroupDetail, i64)>), StoreError> {
        per_backend!(self.store, |pool| {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM groups")
                .fetch_one(pool)
                .await?;
            let mut qb = QueryBuilder::<Db>::new(
                "SELECT g.id, g.name, g.created_at, (SELECT COUNT(*) FROM group_members gm WHERE gm.group_id = g.id) AS members \
                 FROM groups g WHERE 1=1",
            );
            if let Some((at, gid)) = after {
                qb.push(" AND (g.created_at < ")
                    .push_bind(ms(at))
                    .push(" OR (g.created_at = ")
                    .push_bind(ms(at))
                    .push(" AND g.id < ")
                    .push_bind(id(gid))
                    .push("))");
            }
            qb.push(" ORDER BY g.created_at DESC, g.id DESC LIMIT ")
                .push_bind(i64::from(limit));
            let groups = qb
                .build()
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        GroupDetail {
                            id: r.uuid("id")?,
                            name: r.text("name")?,
                            created_at: r.time("created_at")?,
                            members: Vec::new(),
                        },
                        r.int("members")?,
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok((count, groups))
        })
    }

    /// Deletes a group (memberships cascade) and its spend limit. False when there is none.
    pub async fn delete_group(&self, gid: Uuid) -> Result<bool, StoreError> {
        per_backend!(self.store, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(&sql(
                "DELETE FROM spend_limits WHERE scope = 'group' AND scope_id = ?",
            ))
            .bind(gid.to_string())
            .execute(&mut *tx)
            .await?;
            let res = sqlx::query(&sql("DELETE FROM groups WHERE id = ?"))
                .bind(id(gid))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(res.rows_affected() > 0)
        })
    }

    /// Adds a member (idempotent). `NotFound` names the missing group or user.
    pub async fn add_group_member(&self, group: Uuid, user: Uuid) -> Result<(), StoreError> {
        per_backend!(self.store, |pool| {
            let mut tx = pool.begin().await?;
            // Take the write lock before reading: on SQLite a deferred transaction that reads and
            // then writes fails at once (SQLITE_BUSY) when another connection, such as the
            // recorder, commits in between; a write first makes it wait its turn instead.
            sqlx::query("DELETE FROM group_members WHERE 1 = 0")
                .execute(&mut *tx)
                .await?;
            let group_exists = sqlx::query(&sql("SELECT 1 FROM groups WHERE id = ?"))
                .bind(id(group))
                .fetch_optional(&mut *tx)
                .await?;
            if group_exists.is_none() {
                return Err(StoreError::NotFound(format!("group {group}")));
            }
            let user_exists = sqlx::query(&sql("SELECT 1 FROM users WHERE id = ?"))
                .bind(id(user))
                .fetch_optional(&mut *tx)
                .await?;
            if user_exists.is_none() {
                return Err(StoreError::NotFound(format!("user {user}")));
            }
            sqlx::query(&sql(
                "INSERT INTO group_members (group_id, user_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
            ))
            .bind(id(group))
            .bind(id(user))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// False when the user was not a member of the group.
    pub async fn remove_group_member(&self, group: Uuid, user: Uuid) -> Result<bool, StoreError> {
        per_backend!(self.store, |pool| {
            let res = sqlx::query(&sql(
                "DELETE FROM group_members WHERE group_id = ? AND user_id = ?",
            ))
            .bind(id(group))
            .bind(id(user))
            .execute(pool)
            .await?;
            Ok(res.rows_affected() > 0)
        })
    }

    // ---- API keys ---------------------------------------------------------------------------

    /// A user's keys, newest first: ids, names and hints only (the store has no secrets).
    pub async fn api_keys(&self, user: Uuid) -> Result<Vec<super::ApiKeyInfo>, StoreError> {
        per_backend!(self.store, |pool| {
            sqlx::query(&sql(
                "SELECT id, user_id, name, hint, created_at, revoked_at FROM api_keys WHERE user_id = ? \
                 ORDER BY created_at DESC, id DESC",
            ))
            .bind(id(user))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok(super::ApiKeyInfo {
                    id: r.uuid("id")?,
                    user_id: r.uuid("user_id")?,
                    name: r.text("name")?,
                    hint: r.text("hint")?,
                    created_at: r.time("created_at")?,
                    revoked_at: r.opt_time("revoked_at")?,
                })
            })
            .collect()
        })
    }

    /// Revokes key `key` of user `user`. `None` when the user has no such key; `Some(false)`
    /// when it was already revoked.
    pub async fn revoke_user_key(&self, user: Uuid, key: Uuid) -> Result<Option<bool>, StoreError> {
        per_backend!(self.store, |pool| {
            let row = sqlx::query(&sql(
                "SELECT revoked_at FROM api_keys WHERE id = ? AND user_id = ?",
            ))
            .bind(id(key))
            .bind(id(user))
            .fetch_optional(pool)
            .await?;
            let revoked = match row {
                None => return Ok(None),
                Some(r) => r.opt_ms("revoked_at")?,
            };
            if revoked.is_some() {
                return Ok(Some(false));
            }
            let now = millis(Utc::now());
            let res = sqlx::query(&sql(
                "UPDATE api_keys SET revoked_at = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
            ))
            .bind(ms(now))
            .bind(ms(now))
            .bind(id(key))
            .execute(pool)
            .await?;
            Ok(Some(res.rows_affected() > 0))
        })
    }

    // ---- spend limits -----------------------------------------------------------------------

    pub async fn spend_limits(&self) -> Result<Vec<SpendLimitEntry>, StoreError> {
        per_backend!(self.store, |pool| {
            // scope_id is text on both backends; the cast lets PostgreSQL join it to a uuid.
            sqlx::query(
                "SELECT s.scope, s.scope_id, s.limit_nano_usd, s.updated_at, COALESCE(u.username, g.name) AS scope_name \
                 FROM spend_limits s \
                 LEFT JOIN users u ON s.scope = 'user' AND CAST(u.id AS TEXT) = s.scope_id \
                 LEFT JOIN groups g ON s.scope = 'group' AND CAST(g.id AS TEXT) = s.scope_id \
                 ORDER BY CASE s.scope WHEN 'default' THEN 0 WHEN 'group' THEN 1 ELSE 2 END, scope_name, s.scope_id",
            )
            .fetch_all(pool)
            .await?
            .iter()
            .map(spend_limit_from_row)
            .collect()
        })
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
        let (kind, scope_id) = scope.columns();
        let now = millis(Utc::now());
        let name: Option<String> = per_backend!(self.store, |pool| {
            let mut tx = pool.begin().await?;
            // Take the write lock before reading: on SQLite a deferred transaction that reads and
            // then writes fails at once (SQLITE_BUSY) when another connection, such as the
            // recorder, commits in between; a write first makes it wait its turn instead.
            sqlx::query("DELETE FROM spend_limits WHERE 1 = 0")
                .execute(&mut *tx)
                .await?;
            let name: Option<String> = match scope {
                SpendScope::Default => None,
                SpendScope::Group(g) => Some(
                    sqlx::query_scalar(&sql("SELECT name FROM groups WHERE id = ?"))
                        .bind(id(g))
                        .fetch_optional(&mut *tx)
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("group {g}")))?,
                ),
                SpendScope::User(u) => Some(
                    sqlx::query_scalar(&sql("SELECT username FROM users WHERE id = ?"))
                        .bind(id(u))
                        .fetch_optional(&mut *tx)
                        .await?
                        .ok_or_else(|| StoreError::NotFound(format!("user {u}")))?,
                ),
            };
            sqlx::query(&sql(
                "INSERT INTO spend_limits (scope, scope_id, limit_nano_usd, updated_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT(scope, scope_id) DO UPDATE SET limit_nano_usd = excluded.limit_nano_usd, updated_at = excluded.updated_at",
            ))
            .bind(kind)
            .bind(&scope_id)
            .bind(limit.0)
            .bind(ms(now))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            name
        });
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
        let (kind, scope_id) = scope.columns();
        per_backend!(self.store, |pool| {
            let res = sqlx::query(&sql(
                "DELETE FROM spend_limits WHERE scope = ? AND scope_id = ?",
            ))
            .bind(kind)
            .bind(&scope_id)
            .execute(pool)
            .await?;
            Ok(res.rows_affected() > 0)
        })
    }

    // ---- price overrides --------------------------------------------------------------------

    pub async fn price_overrides(&self) -> Result<Vec<PriceOverride>, StoreError> {
        per_backend!(self.store, |pool| {
            sqlx::query(
                "SELECT model, provider, input_nano, output_nano, cache_read_nano, cache_write_nano, output_limit, updated_at \
                 FROM pricing ORDER BY model",
            )
            .fetch_all(pool)
            .await?
            .iter()
            .map(price_from_row)
            .collect()
        })
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
        per_backend!(self.store, |pool| {
            sqlx::query(&sql(
                "INSERT INTO pricing (model, provider, input_nano, output_nano, cache_read_nano, cache_write_nano, output_limit, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(model) DO UPDATE SET provider = excluded.provider, \
                 input_nano = excluded.input_nano, output_nano = excluded.output_nano, cache_read_nano = excluded.cache_read_nano, \
                 cache_write_nano = excluded.cache_write_nano, output_limit = excluded.output_limit, updated_at = excluded.updated_at",
            ))
            .bind(model)
            .bind(provider)
            .bind(price.input.0)
            .bind(price.output.0)
            .bind(price.cache_read.0)
            .bind(price.cache_write.0)
            .bind(output_limit)
            .bind(ms(now))
            .execute(pool)
            .await?;
        });
        Ok(PriceOverride {
            model: model.to_string(),
            provider: provider.to_string(),
            price: *price,
            updated_at: from_millis(now),
        })
    }

    /// False when `model` had no override.
    pub async fn delete_price_override(&self, model: &str) -> Result<bool, StoreError> {
        per_backend!(self.store, |pool| {
            let res = sqlx::query(&sql("DELETE FROM pricing WHERE model = ?"))
                .bind(model)
                .execute(pool)
                .await?;
            Ok(res.rows_affected() > 0)
        })
    }

    // ---- seats ------------------------------------------------------------------------------

    /// Users whose last interception is at or after `active_since`, earliest seat first.
    pub async fn seat_holders(
        &self,
        active_since: DateTime<Utc>,
    ) -> Result<Vec<SeatHolderRow>, StoreError> {
        per_backend!(self.store, |pool| {
            sqlx::query(&sql(
                "SELECT s.user_id, u.username, s.first_used_at, s.last_used_at FROM seat_holders s \
                 LEFT JOIN users u ON u.id = s.user_id WHERE s.last_used_at >= ? \
                 ORDER BY s.first_used_at, s.user_id",
            ))
            .bind(ms(millis(active_since)))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok(SeatHolderRow {
                    user_id: r.uuid("user_id")?,
                    username: r.opt_text("username")?,
                    first_used_at: r.time("first_used_at")?,
                    last_used_at: r.time("last_used_at")?,
                })
            })
            .collect()
        })
    }
}

fn spend_limit_from_row<R: DbRow>(r: &R) -> Result<SpendLimitEntry, StoreError> {
    let scope_id = r.text("scope_id")?;
    Ok(SpendLimitEntry {
        scope: r.text("scope")?,
        scope_id: if scope_id.is_empty() {
            None
        } else {
            Some(parse_uuid(&scope_id)?)
        },
        scope_name: r.opt_text("scope_name")?,
        limit: NanoUsd(r.int("limit_nano_usd")?),
        updated_at: r.time("updated_at")?,
    })
}

fn price_from_row<R: DbRow>(r: &R) -> Result<PriceOverride, StoreError> {
    Ok(PriceOverride {
        model: r.text("model")?,
        provider: r.text("provider")?,
        price: ModelPrice {
            input: NanoUsd(r.int("input_nano")?),
            output: NanoUsd(r.int("output_nano")?),
            cache_read: NanoUsd(r.int("cache_read_nano")?),
            cache_write: NanoUsd(r.int("cache_write_nano")?),
            output_limit: r
                .opt_int("output_limit")?
                .and_then(|l| u64::try_from(l).ok()),
        },
        updated_at: r.time("updated_at")?,
    })
}

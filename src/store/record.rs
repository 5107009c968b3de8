//! The interception record: one finished provider call, as it is written to the database.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::dialect::{per_backend, statement_chunks, DbRow, Dialect};
use super::{millis, rollup, StoreError};
use crate::money::{ModelPrice, NanoUsd};
use crate::providers::{Thought, TokenUsage, ToolCall, UsageSource};

/// How an interception ended (contract values, `docs/contract.md#interceptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterceptionStatus {
    Completed,
    UpstreamError,
    ClientAborted,
    UpstreamAborted,
    Timeout,
}

impl InterceptionStatus {
    pub const ALL: [InterceptionStatus; 5] = [
        InterceptionStatus::Completed,
        InterceptionStatus::UpstreamError,
        InterceptionStatus::ClientAborted,
        InterceptionStatus::UpstreamAborted,
        InterceptionStatus::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InterceptionStatus::Completed => "completed",
            InterceptionStatus::UpstreamError => "upstream_error",
            InterceptionStatus::ClientAborted => "client_aborted",
            InterceptionStatus::UpstreamAborted => "upstream_aborted",
            InterceptionStatus::Timeout => "timeout",
        }
    }
}

/// Which provider key paid for the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    Central,
    Byok,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Central => "central",
            CredentialKind::Byok => "byok",
        }
    }
}

/// One finished interception with everything the contract records.
/// Serialisable for the recorder's spill files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterceptionRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    pub api_key_id: Option<Uuid>,
    /// The route name (config table name).
    pub provider: String,
    #[serde(deserialize_with = "interned")]
    pub provider_kind: Label,
    #[serde(deserialize_with = "interned")]
    pub endpoint: Label,
    pub model: String,
    pub response_model: Option<String>,
    #[serde(deserialize_with = "interned")]
    pub client: Label,
    pub client_session_id: Option<String>,
    /// Client session id, else thread root id, else own id.
    pub session_key: String,
    pub thread_parent_id: Option<Uuid>,
    pub thread_root_id: Option<Uuid>,
    pub credential_kind: CredentialKind,
    pub credential_hint: Option<String>,
    pub status: InterceptionStatus,
    pub upstream_status: Option<u16>,
    pub error: Option<String>,
    pub streaming: bool,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub ttfb_ms: Option<u64>,
    pub response_id: Option<String>,
    pub usage: TokenUsage,
    /// Where `usage` comes from (spill files written before this field read as `reported`).
    #[serde(default)]
    pub usage_source: UsageSource,
    pub prompt: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub thoughts: Vec<Thought>,
    pub cost: NanoUsd,
    /// The prices the cost was computed with; `None` = unpriced model.
    pub price: Option<ModelPrice>,
    /// Start of the budget period the cost was charged to.
    pub spend_period_start: DateTime<Utc>,
    /// The shared (PostgreSQL) reservation this request held, released when it is recorded.
    pub shared_reservation: Option<Uuid>,
}

/// A `&'static str` under another name: serde borrows fields spelled `&str` from the input,
/// which spill files (read into a buffer) cannot lend.
pub type Label = &'static str;

/// The `&'static str` fields come from small fixed sets (provider kinds, endpoints, clients);
/// reading them back from a spill file leaks each distinct value once.
fn interned<'de, D: serde::Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    Ok(intern(String::deserialize(d)?))
}

/// A label read back from disk (spill file, spend journal) as a [`Label`].
pub(super) fn intern(value: String) -> Label {
    static SEEN: std::sync::OnceLock<parking_lot::Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock();
    if let Some(v) = seen.get(value.as_str()) {
        return v;
    }
    let leaked: &'static str = Box::leak(value.into_boxed_str());
    seen.insert(leaked);
    leaked
}

fn db_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// SQLite takes at most 32766 bound parameters per statement; child rows are inserted in
/// multi-row statements sized well under that (interceptions, 35 columns, half as many).
/// PostgreSQL's limit (65535) is higher; one size keeps the two writers alike.
const ROWS_PER_STATEMENT: usize = 128;

/// The hourly rollup buckets of newly inserted interceptions.
fn rollup_buckets<'a>(batch: &[&'a InterceptionRecord]) -> Vec<rollup::Bucket<'a>> {
    rollup::buckets(
        batch.iter().map(|r| rollup::Contribution {
            started_ms: millis(r.started_at),
            user_id: r.user_id,
            provider: &r.provider,
            model: &r.model,
            client: r.client,
            sums: [
                db_u64(r.usage.input),
                db_u64(r.usage.output),
                db_u64(r.usage.cache_read),
                db_u64(r.usage.cache_write),
                db_u64(r.usage.reasoning),
                r.cost.0,
            ],
        }),
        1,
    )
}

/// The parts of the interception writer that the two backends spell differently; everything
/// else in [`insert_batch`] is written once.
trait RecordDialect: Dialect {
    /// Inserts interceptions, keeping the copy already stored when a retried or replayed batch
    /// repeats one (with [`RecordDialect::KEEP_FIRST`] after the values).
    const INSERT_INTERCEPTIONS: &'static str;
    const KEEP_FIRST: &'static str;
    /// Widens a seat holder's first and last use (SQLite's scalar `MIN`/`MAX`, PostgreSQL's
    /// `LEAST`/`GREATEST`).
    const MERGE_SEAT: &'static str;
    /// A transaction whose COMMIT failed (SQLITE_FULL) can leave the connection holding the
    /// write lock with sqlx's rollback bookkeeping out of step: reused, it locked every other
    /// writer out and swallowed later batches in a transaction that never committed (found with
    /// a full disk). Closing the connection rolls back whatever is open.
    const CLOSE_AFTER_FAILED_WRITE: bool;

    /// Turns the batch's shared spend reservations into cost, in the writer's transaction:
    /// `batch` is every record given, `fresh` those inserted now.
    async fn charge(
        tx: &mut sqlx::Transaction<'_, Self>,
        batch: &[InterceptionRecord],
        fresh: &[&InterceptionRecord],
    ) -> Result<(), StoreError>;
}

const INTERCEPTION_COLUMNS: &str = "interceptions (id, user_id, api_key_id, provider, provider_kind, endpoint, model, \
     response_model, client, client_session_id, session_key, thread_parent_id, thread_root_id, credential_kind, \
     credential_hint, status, upstream_status, error, streaming, started_at, ended_at, ttfb_ms, response_id, \
     input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_tokens, \
     cost_nano_usd, priced, price_input, price_output, price_cache_read, price_cache_write, usage_source) ";

impl RecordDialect for sqlx::Sqlite {
    const INSERT_INTERCEPTIONS: &'static str = "INSERT OR IGNORE INTO ";
    const KEEP_FIRST: &'static str = "";
    const MERGE_SEAT: &'static str =
        " ON CONFLICT(user_id) DO UPDATE SET first_used_at = MIN(first_used_at, excluded.first_used_at), \
         last_used_at = MAX(last_used_at, excluded.last_used_at)";
    const CLOSE_AFTER_FAILED_WRITE: bool = true;

    /// SQLite's spend is not shared: nothing to do.
    async fn charge(
        _tx: &mut sqlx::Transaction<'_, Self>,
        _batch: &[InterceptionRecord],
        _fresh: &[&InterceptionRecord],
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

impl RecordDialect for sqlx::Postgres {
    const INSERT_INTERCEPTIONS: &'static str = "INSERT INTO ";
    const KEEP_FIRST: &'static str = " ON CONFLICT (id) DO NOTHING";
    const MERGE_SEAT: &'static str =
        " ON CONFLICT(user_id) DO UPDATE SET first_used_at = LEAST(seat_holders.first_used_at, excluded.first_used_at), \
         last_used_at = GREATEST(seat_holders.last_used_at, excluded.last_used_at)";
    const CLOSE_AFTER_FAILED_WRITE: bool = false;

    async fn charge(
        tx: &mut sqlx::Transaction<'_, Self>,
        batch: &[InterceptionRecord],
        fresh: &[&InterceptionRecord],
    ) -> Result<(), StoreError> {
        // The reservations of these requests become their cost, in the same transaction.
        let reservations: Vec<Uuid> = batch.iter().filter_map(|r| r.shared_reservation).collect();
        if !reservations.is_empty() {
            sqlx::query("DELETE FROM spend_reservations WHERE id = ANY($1)")
                .bind(&reservations)
                .execute(&mut **tx)
                .await?;
        }
        add_spend_postgres(tx, fresh).await
    }
}

/// Writes a batch of finished interceptions and their child rows (usage, prompt, tool calls,
/// thoughts, rollups, seat holders) in one transaction, with the same multi-row statements on
/// either backend. Only rows inserted now get children: a batch replayed after a crash (spill
/// file) or retried after an ambiguous commit must not duplicate them.
pub(super) async fn insert_batch(
    store: &super::Store,
    batch: &[InterceptionRecord],
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    per_backend!(store, |pool| {
        let mut conn = pool.acquire().await?;
        let written: Result<(), StoreError> = async {
            use sqlx::Connection;
            let mut tx = conn.begin().await?;
            let mut fresh = std::collections::HashSet::with_capacity(batch.len());
            for chunk in statement_chunks(batch, ROWS_PER_STATEMENT / 2) {
                let mut qb = sqlx::QueryBuilder::<Db>::new(<Db as RecordDialect>::INSERT_INTERCEPTIONS);
                qb.push(INTERCEPTION_COLUMNS);
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(id(r.id))
                        .push_bind(id(r.user_id))
                        .push_bind(r.api_key_id.map(id))
                        .push_bind(&r.provider)
                        .push_bind(r.provider_kind)
                        .push_bind(r.endpoint)
                        .push_bind(&r.model)
                        .push_bind(&r.response_model)
                        .push_bind(r.client)
                        .push_bind(&r.client_session_id)
                        .push_bind(&r.session_key)
                        .push_bind(r.thread_parent_id.map(id))
                        .push_bind(r.thread_root_id.map(id))
                        .push_bind(r.credential_kind.as_str())
                        .push_bind(&r.credential_hint)
                        .push_bind(r.status.as_str())
                        .push_bind(r.upstream_status.map(i32::from))
                        .push_bind(&r.error)
                        .push_bind(r.streaming)
                        .push_bind(ms(millis(r.started_at)))
                        .push_bind(ms(millis(r.ended_at)))
                        .push_bind(r.ttfb_ms.map(db_u64))
                        .push_bind(&r.response_id)
                        .push_bind(db_u64(r.usage.input))
                        .push_bind(db_u64(r.usage.output))
                        .push_bind(db_u64(r.usage.cache_read))
                        .push_bind(db_u64(r.usage.cache_write))
                        .push_bind(db_u64(r.usage.reasoning))
                        .push_bind(r.cost.0)
                        .push_bind(r.price.is_some())
                        .push_bind(r.price.as_ref().map(|p| p.input.0))
                        .push_bind(r.price.as_ref().map(|p| p.output.0))
                        .push_bind(r.price.as_ref().map(|p| p.cache_read.0))
                        .push_bind(r.price.as_ref().map(|p| p.cache_write.0))
                        .push_bind(r.usage_source.as_str());
                });
                qb.push(<Db as RecordDialect>::KEEP_FIRST);
                qb.push(" RETURNING id");
                for row in qb.build().fetch_all(&mut *tx).await? {
                    fresh.insert(row.uuid("id")?);
                }
            }
            let fresh: Vec<&InterceptionRecord> =
                batch.iter().filter(|r| fresh.contains(&r.id)).collect();
            <Db as RecordDialect>::charge(&mut tx, batch, &fresh).await?;
            let batch = fresh;
            for mut qb in rollup::upserts::<Db>(&rollup_buckets(&batch)) {
                qb.build().execute(&mut *tx).await?;
            }

            let usages: Vec<&InterceptionRecord> = batch
                .iter()
                .copied()
                .filter(|r| r.usage != TokenUsage::default())
                .collect();
            for chunk in statement_chunks(&usages, ROWS_PER_STATEMENT) {
                let mut qb = sqlx::QueryBuilder::<Db>::new(
                    "INSERT INTO token_usages (interception_id, msg_id, input_tokens, output_tokens, cache_read_input_tokens, \
                     cache_write_input_tokens, reasoning_tokens, created_at) ",
                );
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(id(r.id))
                        .push_bind(&r.response_id)
                        .push_bind(db_u64(r.usage.input))
                        .push_bind(db_u64(r.usage.output))
                        .push_bind(db_u64(r.usage.cache_read))
                        .push_bind(db_u64(r.usage.cache_write))
                        .push_bind(db_u64(r.usage.reasoning))
                        .push_bind(ms(millis(r.ended_at)));
                });
                qb.build().execute(&mut *tx).await?;
            }

            let prompts: Vec<(&InterceptionRecord, &String)> = batch
                .iter()
                .copied()
                .filter_map(|r| r.prompt.as_ref().map(|p| (r, p)))
                .collect();
            for chunk in statement_chunks(&prompts, ROWS_PER_STATEMENT) {
                let mut qb = sqlx::QueryBuilder::<Db>::new(
                    "INSERT INTO user_prompts (interception_id, msg_id, prompt, created_at) ",
                );
                qb.push_values(chunk, |mut b, (r, p)| {
                    b.push_bind(id(r.id))
                        .push_bind(&r.response_id)
                        .push_bind(*p)
                        .push_bind(ms(millis(r.started_at)));
                });
                qb.build().execute(&mut *tx).await?;
            }

            let tools: Vec<(&InterceptionRecord, &ToolCall)> = batch
                .iter()
                .copied()
                .flat_map(|r| r.tool_calls.iter().map(move |t| (r, t)))
                .collect();
            for chunk in statement_chunks(&tools, ROWS_PER_STATEMENT) {
                let mut qb = sqlx::QueryBuilder::<Db>::new(
                    "INSERT INTO tool_usages (interception_id, msg_id, tool_call_id, tool, input, injected, created_at) ",
                );
                qb.push_values(chunk, |mut b, (r, t)| {
                    b.push_bind(id(r.id))
                        .push_bind(&r.response_id)
                        .push_bind(&t.id)
                        .push_bind(&t.name)
                        .push_bind(&t.input)
                        .push_bind(false)
                        .push_bind(ms(millis(r.ended_at)));
                });
                qb.build().execute(&mut *tx).await?;
            }

            let thoughts: Vec<(&InterceptionRecord, &Thought)> = batch
                .iter()
                .copied()
                .flat_map(|r| r.thoughts.iter().map(move |t| (r, t)))
                .collect();
            for chunk in statement_chunks(&thoughts, ROWS_PER_STATEMENT) {
                let mut qb = sqlx::QueryBuilder::<Db>::new(
                    "INSERT INTO model_thoughts (interception_id, content, source, created_at) ",
                );
                qb.push_values(chunk, |mut b, (r, t)| {
                    b.push_bind(id(r.id))
                        .push_bind(&t.content)
                        .push_bind(t.source.as_str())
                        .push_bind(ms(millis(r.ended_at)));
                });
                qb.build().execute(&mut *tx).await?;
            }
            // Seat holders: first and last use per user in this batch (epoch milliseconds).
            let mut seats: std::collections::HashMap<Uuid, (i64, i64)> =
                std::collections::HashMap::new();
            for r in &batch {
                let e = seats.entry(r.user_id).or_insert((i64::MAX, i64::MIN));
                e.0 = e.0.min(millis(r.started_at));
                e.1 = e.1.max(millis(r.ended_at));
            }
            let seats: Vec<(Uuid, (i64, i64))> = seats.into_iter().collect();
            for chunk in statement_chunks(&seats, ROWS_PER_STATEMENT) {
                let mut qb = sqlx::QueryBuilder::<Db>::new(
                    "INSERT INTO seat_holders (user_id, first_used_at, last_used_at) ",
                );
                qb.push_values(chunk, |mut b, (user, (first, last))| {
                    b.push_bind(id(*user))
                        .push_bind(ms(*first))
                        .push_bind(ms(*last));
                });
                qb.push(<Db as RecordDialect>::MERGE_SEAT);
                qb.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        }
        .await;
        if written.is_err() && <Db as RecordDialect>::CLOSE_AFTER_FAILED_WRITE {
            let _ = conn.close().await;
        }
        written
    })
}

/// Adds each newly recorded interception's cost to its user's total for the period it was
/// charged to: the authoritative spend every replica admits against.
async fn add_spend_postgres(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    batch: &[&InterceptionRecord],
) -> Result<(), StoreError> {
    let mut sums: std::collections::HashMap<(Uuid, DateTime<Utc>), i64> =
        std::collections::HashMap::new();
    for r in batch.iter().filter(|r| r.cost.0 > 0) {
        let e = sums.entry((r.user_id, r.spend_period_start)).or_insert(0);
        *e = e.saturating_add(r.cost.0);
    }
    if sums.is_empty() {
        return Ok(());
    }
    // Sorted, so two replicas' batches lock the same rows in the same order (no deadlock).
    let mut sums: Vec<((Uuid, DateTime<Utc>), i64)> = sums.into_iter().collect();
    sums.sort_unstable_by_key(|(k, _)| *k);
    for chunk in statement_chunks(&sums, ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "INSERT INTO spend_totals (user_id, period_start, spent_nano_usd) ",
        );
        qb.push_values(chunk, |mut b, ((user, period), cost)| {
            b.push_bind(*user).push_bind(*period).push_bind(*cost);
        });
        qb.push(
            " ON CONFLICT (user_id, period_start) DO UPDATE \
             SET spent_nano_usd = spend_totals.spent_nano_usd + excluded.spent_nano_usd",
        );
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

//! Retention: deletes interceptions (and, through `ON DELETE CASCADE`, their usage, prompt, tool
//! and thought rows) whose `ended_at` is older than `retention.interceptions_days`.
//!
//! The purge runs every ten minutes in batches of [`BATCH`] interceptions, one short transaction
//! each with a pause between them, so the recorder's writes (SQLite has one writer) are never
//! held up for long and the gateway never stalls behind a big delete.
//!
//! Not here: seat holders, spend or anything else derived from interceptions (they keep their
//! own history), and deciding the retention period (config).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::dialect::{per_backend, DbRow};
use super::rollup;
use super::{millis, Store, StoreError};

/// Counter of interceptions deleted by retention (their child rows go with them).
pub const RETENTION_PURGED_TOTAL: &str = "tollgate_retention_purged_total";

/// How often the purge runs.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// Interceptions deleted per transaction.
const BATCH: i64 = 1000;

/// Pause between batches: room for the recorder's writes.
const PAUSE: Duration = Duration::from_millis(20);

/// Deletes every interception that ended before `now - days` and returns how many were
/// deleted. `days = 0` keeps everything.
pub async fn purge_once(store: &Store, days: u32, now: DateTime<Utc>) -> Result<u64, StoreError> {
    if days == 0 {
        return Ok(0);
    }
    let cutoff = now - chrono::Duration::days(i64::from(days));
    let mut purged = 0u64;
    loop {
        let n = purge_batch(store, millis(cutoff)).await?;
        purged += n;
        metrics::counter!(RETENTION_PURGED_TOTAL).increment(n);
        if n < BATCH as u64 {
            break;
        }
        tokio::time::sleep(PAUSE).await;
    }
    if purged > 0 {
        tracing::info!(purged, days, "retention purged old interceptions");
    }
    Ok(purged)
}

/// Deletes up to [`BATCH`] of the oldest interceptions that ended before `cutoff_ms`, and takes
/// what they added out of the hourly rollup in the same transaction. Returns how many went.
async fn purge_batch(store: &Store, cutoff_ms: i64) -> Result<u64, StoreError> {
    per_backend!(store, |pool| {
        let mut tx = pool.begin().await?;
        // The DELETE comes first and hands back what it removed: the transaction writes from its
        // first statement, so on SQLite it cannot begin as a reader and then fail to become the
        // writer because the recorder committed in between. The inner SELECT walks the ended_at
        // index; the cascade deletes child rows through their interception_id indexes.
        let rows = sqlx::query(&sql(
            "DELETE FROM interceptions WHERE id IN \
             (SELECT id FROM interceptions WHERE ended_at < ? ORDER BY ended_at LIMIT ?) \
             RETURNING started_at, user_id, provider, model, client, input_tokens, output_tokens, \
             cache_read_input_tokens, cache_write_input_tokens, reasoning_tokens, cost_nano_usd",
        ))
        .bind(ms(cutoff_ms))
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut owned = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut sums = [0i64; 6];
            for (v, col) in sums.iter_mut().zip([
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_write_input_tokens",
                "reasoning_tokens",
                "cost_nano_usd",
            ]) {
                *v = r.int(col)?;
            }
            owned.push((
                r.ms("started_at")?,
                r.uuid("user_id")?,
                r.text("provider")?,
                r.text("model")?,
                r.text("client")?,
                sums,
            ));
        }
        let buckets = rollup::buckets(
            owned
                .iter()
                .map(
                    |(started, user, provider, model, client, sums)| rollup::Contribution {
                        started_ms: *started,
                        user_id: *user,
                        provider,
                        model,
                        client,
                        sums: *sums,
                    },
                ),
            -1,
        );
        for mut qb in rollup::upserts::<Db>(&buckets) {
            qb.build().execute(&mut *tx).await?;
        }
        sqlx::query(rollup::DELETE_EMPTY).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows.len() as u64)
    })
}

/// Runs [`purge_once`] now and then every [`PURGE_INTERVAL`], forever (returns at once when
/// `days = 0`). A failed run is logged and retried at the next tick.
pub async fn run_retention(store: Store, days: u32) {
    if days == 0 {
        return;
    }
    metrics::describe_counter!(
        RETENTION_PURGED_TOTAL,
        "Interceptions deleted by retention (with their child rows)."
    );
    let mut ticks = tokio::time::interval(PURGE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = purge_once(&store, days, Utc::now()).await {
            tracing::warn!(error = %e, "retention purge failed; retrying at the next run");
        }
    }
}

/// Spawns [`run_retention`] on the current Tokio runtime.
pub fn spawn_retention(store: Store, days: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run_retention(store, days))
}

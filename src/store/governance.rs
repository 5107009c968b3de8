//! Queries behind governance: caps, price overrides, spend per period, seats and sealed
//! personal provider keys. Called from the background refresher and on cache misses, never
//! per request on the hot path.

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::{from_millis, millis, parse_uuid, Store, StoreError};
use crate::governance::pricing::ModelPrice;
use crate::money::NanoUsd;

/// One row of `spend_limits`, with the group's name for group caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendLimitRow {
    pub scope: String,
    pub scope_id: Option<Uuid>,
    pub group_name: Option<String>,
    pub limit: NanoUsd,
}

/// One operator price override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceOverrideRow {
    pub model: String,
    pub provider: String,
    pub price: ModelPrice,
}

/// A sealed provider key as stored.
#[derive(Debug, Clone)]
pub struct SealedKeyRow {
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub hint: String,
    pub updated_at: DateTime<Utc>,
}

impl Store {
    pub async fn spend_limits(&self) -> Result<Vec<SpendLimitRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT l.scope, l.scope_id, g.name, l.limit_nano_usd FROM spend_limits l \
             LEFT JOIN groups g ON l.scope = 'group' AND g.id = l.scope_id",
        )
        .fetch_all(self.sqlite_pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let scope_id: String = r.get(1);
            out.push(SpendLimitRow {
                scope: r.get(0),
                scope_id: if scope_id.is_empty() {
                    None
                } else {
                    Some(parse_uuid(&scope_id)?)
                },
                group_name: r.get(2),
                limit: NanoUsd(r.get(3)),
            });
        }
        Ok(out)
    }

    pub async fn price_overrides(&self) -> Result<Vec<PriceOverrideRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, provider, input_nano, output_nano, cache_read_nano, cache_write_nano, output_limit FROM pricing",
        )
        .fetch_all(self.sqlite_pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| PriceOverrideRow {
                model: r.get(0),
                provider: r.get(1),
                price: ModelPrice {
                    input: NanoUsd(r.get(2)),
                    output: NanoUsd(r.get(3)),
                    cache_read: NanoUsd(r.get(4)),
                    cache_write: NanoUsd(r.get(5)),
                    output_limit: r.get::<Option<i64>, _>(6).map(|v| v.max(0) as u64),
                },
            })
            .collect())
    }

    /// Spend per user for interceptions that ended at or after `since` (costs are charged when
    /// an interception ends, as the in-memory ledger does).
    pub async fn spend_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(Uuid, NanoUsd)>, StoreError> {
        let rows = sqlx::query(
            "SELECT user_id, SUM(cost_nano_usd) FROM interceptions WHERE ended_at >= ? GROUP BY user_id",
        )
        .bind(millis(since))
        .fetch_all(self.sqlite_pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push((parse_uuid(r.get::<&str, _>(0))?, NanoUsd(r.get(1))));
        }
        Ok(out)
    }

    /// Users holding an AI seat: an interception within the window.
    pub async fn active_seat_count(&self, active_since: DateTime<Utc>) -> Result<u32, StoreError> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM seat_holders WHERE last_used_at >= ?")
                .bind(millis(active_since))
                .fetch_one(self.sqlite_pool())
                .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub async fn sealed_provider_key(
        &self,
        user: Uuid,
        provider: &str,
    ) -> Result<Option<SealedKeyRow>, StoreError> {
        let row = sqlx::query(
            "SELECT nonce, ciphertext, hint, updated_at FROM provider_keys WHERE user_id = ? AND provider = ?",
        )
        .bind(user.to_string())
        .bind(provider)
        .fetch_optional(self.sqlite_pool())
        .await?;
        Ok(row.map(|r| SealedKeyRow {
            nonce: r.get(0),
            ciphertext: r.get(1),
            hint: r.get(2),
            updated_at: from_millis(r.get(3)),
        }))
    }

    pub async fn put_provider_key(
        &self,
        user: Uuid,
        provider: &str,
        nonce: &[u8],
        ciphertext: &[u8],
        hint: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO provider_keys (user_id, provider, nonce, ciphertext, hint, updated_at) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT(user_id, provider) DO UPDATE SET nonce = excluded.nonce, ciphertext = excluded.ciphertext, \
             hint = excluded.hint, updated_at = excluded.updated_at",
        )
        .bind(user.to_string())
        .bind(provider)
        .bind(nonce)
        .bind(ciphertext)
        .bind(hint)
        .bind(millis(Utc::now()))
        .execute(self.sqlite_pool())
        .await?;
        Ok(())
    }

    pub async fn delete_provider_key(
        &self,
        user: Uuid,
        provider: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM provider_keys WHERE user_id = ? AND provider = ?")
            .bind(user.to_string())
            .bind(provider)
            .execute(self.sqlite_pool())
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// (provider, hint, updated_at) of a user's stored keys.
    pub async fn provider_key_hints(
        &self,
        user: Uuid,
    ) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError> {
        let rows = sqlx::query("SELECT provider, hint, updated_at FROM provider_keys WHERE user_id = ? ORDER BY provider")
            .bind(user.to_string())
            .fetch_all(self.sqlite_pool())
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), from_millis(r.get(2))))
            .collect())
    }
}

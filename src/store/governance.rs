//! Queries behind governance: caps, price overrides, spend per period, seats and sealed
//! personal provider keys. Called from the background refresher and on cache misses, never
//! per request on the hot path.
//!
//! Each method matches on the backend: SQLite binds ids as text and times as epoch ms,
//! PostgreSQL binds native uuid/timestamptz with `$n` placeholders.

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::{from_millis, millis, parse_uuid, Backend, Store, StoreError};
use crate::money::{ModelPrice, NanoUsd};

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
        // scope_id is text on both backends (the default scope's id is ''); PostgreSQL needs
        // the cast to join it to a uuid.
        let rows: Vec<(String, String, Option<String>, i64)> = match self.backend() {
            Backend::Sqlite(pool) => {
                sqlx::query_as(
                    "SELECT l.scope, l.scope_id, g.name, l.limit_nano_usd FROM spend_limits l \
                     LEFT JOIN groups g ON l.scope = 'group' AND g.id = l.scope_id",
                )
                .fetch_all(pool)
                .await?
            }
            Backend::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT l.scope, l.scope_id, g.name, l.limit_nano_usd FROM spend_limits l \
                     LEFT JOIN groups g ON l.scope = 'group' AND g.id::text = l.scope_id",
                )
                .fetch_all(pool)
                .await?
            }
        };
        let mut out = Vec::with_capacity(rows.len());
        for (scope, scope_id, group_name, limit) in rows {
            out.push(SpendLimitRow {
                scope,
                scope_id: if scope_id.is_empty() {
                    None
                } else {
                    Some(parse_uuid(&scope_id)?)
                },
                group_name,
                limit: NanoUsd(limit),
            });
        }
        Ok(out)
    }

    pub async fn price_overrides(&self) -> Result<Vec<PriceOverrideRow>, StoreError> {
        type PriceTuple = (String, String, i64, i64, i64, i64, Option<i64>);
        let sql = "SELECT model, provider, input_nano, output_nano, cache_read_nano, cache_write_nano, output_limit FROM pricing";
        let rows: Vec<PriceTuple> = match self.backend() {
            Backend::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
            Backend::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
        };
        Ok(rows
            .into_iter()
            .map(|r| PriceOverrideRow {
                model: r.0,
                provider: r.1,
                price: ModelPrice {
                    input: NanoUsd(r.2),
                    output: NanoUsd(r.3),
                    cache_read: NanoUsd(r.4),
                    cache_write: NanoUsd(r.5),
                    output_limit: r.6.map(|v| v.max(0) as u64),
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
        match self.backend() {
            Backend::Sqlite(pool) => {
                let rows = sqlx::query(
                    "SELECT user_id, SUM(cost_nano_usd) FROM interceptions WHERE ended_at >= ? GROUP BY user_id",
                )
                .bind(millis(since))
                .fetch_all(pool)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in rows {
                    out.push((parse_uuid(r.get::<&str, _>(0))?, NanoUsd(r.get(1))));
                }
                Ok(out)
            }
            Backend::Postgres(pool) => {
                // SUM(bigint) is numeric in PostgreSQL; cast back so it decodes as i64.
                let rows: Vec<(Uuid, i64)> = sqlx::query_as(
                    "SELECT user_id, SUM(cost_nano_usd)::bigint FROM interceptions WHERE ended_at >= $1 GROUP BY user_id",
                )
                .bind(since)
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().map(|(u, c)| (u, NanoUsd(c))).collect())
            }
        }
    }

    /// Users holding an AI seat: an interception within the window.
    pub async fn active_seat_count(&self, active_since: DateTime<Utc>) -> Result<u32, StoreError> {
        let n: i64 = match self.backend() {
            Backend::Sqlite(pool) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM seat_holders WHERE last_used_at >= ?")
                    .bind(millis(active_since))
                    .fetch_one(pool)
                    .await?
            }
            Backend::Postgres(pool) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM seat_holders WHERE last_used_at >= $1")
                    .bind(active_since)
                    .fetch_one(pool)
                    .await?
            }
        };
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub async fn sealed_provider_key(
        &self,
        user: Uuid,
        provider: &str,
    ) -> Result<Option<SealedKeyRow>, StoreError> {
        Ok(match self.backend() {
            Backend::Sqlite(pool) => sqlx::query(
                "SELECT nonce, ciphertext, hint, updated_at FROM provider_keys WHERE user_id = ? AND provider = ?",
            )
            .bind(user.to_string())
            .bind(provider)
            .fetch_optional(pool)
            .await?
            .map(|r| SealedKeyRow {
                nonce: r.get(0),
                ciphertext: r.get(1),
                hint: r.get(2),
                updated_at: from_millis(r.get(3)),
            }),
            Backend::Postgres(pool) => sqlx::query(
                "SELECT nonce, ciphertext, hint, updated_at FROM provider_keys WHERE user_id = $1 AND provider = $2",
            )
            .bind(user)
            .bind(provider)
            .fetch_optional(pool)
            .await?
            .map(|r| SealedKeyRow {
                nonce: r.get(0),
                ciphertext: r.get(1),
                hint: r.get(2),
                updated_at: r.get(3),
            }),
        })
    }

    pub async fn put_provider_key(
        &self,
        user: Uuid,
        provider: &str,
        nonce: &[u8],
        ciphertext: &[u8],
        hint: &str,
    ) -> Result<(), StoreError> {
        const UPSERT: &str = " ON CONFLICT(user_id, provider) DO UPDATE SET nonce = excluded.nonce, \
             ciphertext = excluded.ciphertext, hint = excluded.hint, updated_at = excluded.updated_at";
        let now = from_millis(millis(Utc::now()));
        match self.backend() {
            Backend::Sqlite(pool) => {
                sqlx::query(&format!(
                    "INSERT INTO provider_keys (user_id, provider, nonce, ciphertext, hint, updated_at) VALUES (?, ?, ?, ?, ?, ?){UPSERT}"
                ))
                .bind(user.to_string())
                .bind(provider)
                .bind(nonce)
                .bind(ciphertext)
                .bind(hint)
                .bind(millis(now))
                .execute(pool)
                .await?;
            }
            Backend::Postgres(pool) => {
                sqlx::query(&format!(
                    "INSERT INTO provider_keys (user_id, provider, nonce, ciphertext, hint, updated_at) VALUES ($1, $2, $3, $4, $5, $6){UPSERT}"
                ))
                .bind(user)
                .bind(provider)
                .bind(nonce)
                .bind(ciphertext)
                .bind(hint)
                .bind(now)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    pub async fn delete_provider_key(
        &self,
        user: Uuid,
        provider: &str,
    ) -> Result<bool, StoreError> {
        let affected = match self.backend() {
            Backend::Sqlite(pool) => {
                sqlx::query("DELETE FROM provider_keys WHERE user_id = ? AND provider = ?")
                    .bind(user.to_string())
                    .bind(provider)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Backend::Postgres(pool) => {
                sqlx::query("DELETE FROM provider_keys WHERE user_id = $1 AND provider = $2")
                    .bind(user)
                    .bind(provider)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        };
        Ok(affected > 0)
    }

    /// (provider, hint, updated_at) of a user's stored keys.
    pub async fn provider_key_hints(
        &self,
        user: Uuid,
    ) -> Result<Vec<(String, String, DateTime<Utc>)>, StoreError> {
        match self.backend() {
            Backend::Sqlite(pool) => {
                let rows: Vec<(String, String, i64)> = sqlx::query_as(
                    "SELECT provider, hint, updated_at FROM provider_keys WHERE user_id = ? ORDER BY provider",
                )
                .bind(user.to_string())
                .fetch_all(pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|(p, h, t)| (p, h, from_millis(t)))
                    .collect())
            }
            Backend::Postgres(pool) => Ok(sqlx::query_as(
                "SELECT provider, hint, updated_at FROM provider_keys WHERE user_id = $1 ORDER BY provider",
            )
            .bind(user)
            .fetch_all(pool)
            .await?),
        }
    }
}

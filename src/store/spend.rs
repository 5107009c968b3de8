//! Spend shared between replicas, PostgreSQL only: the authoritative per-period totals
//! (`spend_totals`, written by the recorder's batch transaction) and the reservations of capped
//! requests in flight on every replica (`spend_reservations`, via `tollgate_reserve`).
//!
//! SQLite serves one process, whose in-memory ledger is authoritative; these methods answer
//! `None`/no-op there so callers need not care.
//!
//! Not here: the admission rule's in-memory twin or the decision what to do when the database
//! is down (governance).

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Backend, Store, StoreError};
use crate::money::NanoUsd;

/// What `tollgate_reserve` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedReservation {
    pub admitted: bool,
    /// The user's recorded spend in the period, over all replicas.
    pub spent: NanoUsd,
    /// Money reserved by the user's requests in flight on all replicas (including this one, if
    /// admitted).
    pub reserved: NanoUsd,
}

impl Store {
    /// Whether spend is shared through the database (PostgreSQL).
    pub fn shares_spend(&self) -> bool {
        matches!(self.backend(), Backend::Postgres(_))
    }

    /// Reserves `amount` for request `id` against `cap` over every replica (one round trip).
    /// With `alone`, the request is admitted only when nothing else of the user's is in flight
    /// anywhere, and holds at least the rest of the cap (an unbounded request, see
    /// `governance::ledger`). `None` on SQLite.
    #[allow(clippy::too_many_arguments)]
    pub async fn reserve_shared(
        &self,
        id: Uuid,
        user: Uuid,
        period_start: DateTime<Utc>,
        cap: NanoUsd,
        amount: NanoUsd,
        alone: bool,
        replica: Uuid,
        ttl: Duration,
    ) -> Result<Option<SharedReservation>, StoreError> {
        let Backend::Postgres(pool) = self.backend() else {
            return Ok(None);
        };
        let (admitted, spent, reserved): (bool, i64, i64) = sqlx::query_as(
            "SELECT admitted, spent, reserved FROM tollgate_reserve($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id)
        .bind(user)
        .bind(period_start)
        .bind(cap.0)
        .bind(amount.0.max(0))
        .bind(alone)
        .bind(replica)
        .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
        .fetch_one(pool)
        .await?;
        Ok(Some(SharedReservation {
            admitted,
            spent: NanoUsd(spent),
            reserved: NanoUsd(reserved),
        }))
    }

    /// Marks a reservation as ended with its real cost: counted as spend from now on, until the
    /// recorder moves it into the period's total.
    pub async fn settle_shared(&self, id: Uuid, cost: NanoUsd) -> Result<(), StoreError> {
        if let Backend::Postgres(pool) = self.backend() {
            sqlx::query(
                "UPDATE spend_reservations SET settled = true, amount_nano_usd = $2 WHERE id = $1",
            )
            .bind(id)
            .bind(cost.0.max(0))
            .execute(pool)
            .await?;
        }
        Ok(())
    }

    /// Keeps this replica's live reservations from expiring, and deletes reservations that
    /// expired long ago (their replica died). Called by the refresher every few seconds.
    pub async fn renew_shared_reservations(
        &self,
        replica: Uuid,
        live: &[Uuid],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let Backend::Postgres(pool) = self.backend() else {
            return Ok(());
        };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        if !live.is_empty() {
            sqlx::query(
                "UPDATE spend_reservations SET expires_at = now() + make_interval(secs => $3 / 1000.0) \
                 WHERE replica_id = $1 AND id = ANY($2)",
            )
            .bind(replica)
            .bind(live)
            .bind(ttl_ms)
            .execute(pool)
            .await?;
        }
        sqlx::query("DELETE FROM spend_reservations WHERE expires_at < now() - interval '1 hour'")
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Every user's authoritative spend in the period starting at `period_start`. `None` on
    /// SQLite (the caller sums interceptions instead).
    pub async fn shared_spend(
        &self,
        period_start: DateTime<Utc>,
    ) -> Result<Option<Vec<(Uuid, NanoUsd)>>, StoreError> {
        let Backend::Postgres(pool) = self.backend() else {
            return Ok(None);
        };
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT user_id, spent_nano_usd FROM spend_totals WHERE period_start = $1",
        )
        .bind(period_start)
        .fetch_all(pool)
        .await?;
        Ok(Some(
            rows.into_iter().map(|(u, c)| (u, NanoUsd(c))).collect(),
        ))
    }

    /// Rebuilds the period's totals from the interceptions themselves (they are written in the
    /// same transactions, so this is exact) under a lock that keeps the recorder out meanwhile.
    /// Run when a replica starts and when a period begins: it makes a database upgraded
    /// mid-period, or written by an older replica, agree with its interceptions.
    pub async fn reconcile_shared_spend(
        &self,
        period_start: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let Backend::Postgres(pool) = self.backend() else {
            return Ok(());
        };
        let mut tx = pool.begin().await?;
        sqlx::query("LOCK TABLE spend_totals IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM spend_totals WHERE period_start = $1")
            .bind(period_start)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO spend_totals (user_id, period_start, spent_nano_usd) \
             SELECT user_id, $1, SUM(cost_nano_usd)::bigint FROM interceptions \
             WHERE ended_at >= $1 GROUP BY user_id",
        )
        .bind(period_start)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

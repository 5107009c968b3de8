//! Dashboard sessions: the rows behind the dashboard's cookie (issue 15). The cookie carries a
//! random session id; only its SHA-256 is stored, so the table cannot be used to sign in.
//!
//! A session is valid while all of these hold, checked in the one query that reads it
//! ([`Store::dashboard_session`]), so a change made anywhere (the API, the CLI, another
//! replica) applies to the very next page:
//! - its row exists (signing out deletes it; so does [`Store::end_dashboard_sessions_of_user`]);
//! - the Tollgate key it was opened with exists and is not revoked;
//! - its user exists (deleting a user deletes their sessions and keys);
//! - it was used within the idle limit and is younger than its absolute expiry.
//!
//! Not here: cookies, CSRF tokens and who may open a session (`dashboard::signin`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::dialect::{per_backend, DbRow};
use super::{millis, Principal, Store, StoreError};

/// A valid session's user, as the dashboard needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardSession {
    /// The user and the key the session was opened with.
    pub principal: Principal,
    pub last_seen_at: DateTime<Utc>,
}

impl Store {
    /// Records a new session for `principal` (signed in with its key), ending at `expires_at`
    /// however much it is used.
    pub async fn create_dashboard_session(
        &self,
        id_hash: &[u8; 32],
        principal: &Principal,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let hash = hex::encode(id_hash);
        per_backend!(self, |pool| {
            sqlx::query(&sql(
                "INSERT INTO dashboard_sessions (id_hash, user_id, api_key_id, created_at, last_seen_at, expires_at) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            ))
            .bind(&hash)
            .bind(id(principal.user_id))
            .bind(id(principal.api_key_id))
            .bind(ms(millis(now)))
            .bind(ms(millis(now)))
            .bind(ms(millis(expires_at)))
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The session with this id hash, if it is valid at `now` (see the module docs): used
    /// after `idle_since` and not expired, its key unrevoked, its user present.
    pub async fn dashboard_session(
        &self,
        id_hash: &[u8; 32],
        now: DateTime<Utc>,
        idle_since: DateTime<Utc>,
    ) -> Result<Option<DashboardSession>, StoreError> {
        let hash = hex::encode(id_hash);
        per_backend!(self, |pool| {
            let row = sqlx::query(&sql(
                "SELECT s.api_key_id, s.user_id, u.username, u.is_admin, s.last_seen_at \
                 FROM dashboard_sessions s \
                 JOIN api_keys k ON k.id = s.api_key_id AND k.user_id = s.user_id \
                 JOIN users u ON u.id = s.user_id \
                 WHERE s.id_hash = ? AND k.revoked_at IS NULL AND s.expires_at > ? AND s.last_seen_at > ?",
            ))
            .bind(&hash)
            .bind(ms(millis(now)))
            .bind(ms(millis(idle_since)))
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let user_id = row.uuid("user_id")?;
            let groups = sqlx::query(&sql("SELECT group_id FROM group_members WHERE user_id = ?"))
                .bind(id(user_id))
                .fetch_all(pool)
                .await?;
            let mut group_ids = Vec::with_capacity(groups.len());
            for g in &groups {
                group_ids.push(g.uuid("group_id")?);
            }
            Ok(Some(DashboardSession {
                principal: Principal {
                    user_id,
                    username: row.text("username")?,
                    is_admin: row.boolean("is_admin")?,
                    group_ids,
                    api_key_id: row.uuid("api_key_id")?,
                },
                last_seen_at: row.time("last_seen_at")?,
            }))
        })
    }

    /// Marks the session used at `now` (its idle limit starts again).
    pub async fn touch_dashboard_session(
        &self,
        id_hash: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let hash = hex::encode(id_hash);
        per_backend!(self, |pool| {
            sqlx::query(&sql(
                "UPDATE dashboard_sessions SET last_seen_at = ? WHERE id_hash = ?",
            ))
            .bind(ms(millis(now)))
            .bind(&hash)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Ends one session (sign-out). False when there was none.
    pub async fn end_dashboard_session(&self, id_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let hash = hex::encode(id_hash);
        let ended = per_backend!(self, |pool| {
            sqlx::query(&sql("DELETE FROM dashboard_sessions WHERE id_hash = ?"))
                .bind(&hash)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(ended > 0)
    }

    /// Ends every dashboard session of a user; returns how many. What suspending a user must
    /// call (with the user's keys refused by `principal_for_key` and this module's query).
    pub async fn end_dashboard_sessions_of_user(&self, user_id: Uuid) -> Result<u64, StoreError> {
        Ok(per_backend!(self, |pool| {
            sqlx::query(&sql("DELETE FROM dashboard_sessions WHERE user_id = ?"))
                .bind(id(user_id))
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Deletes sessions that can no longer be used at `now`: expired, idle since before
    /// `idle_since`, or opened with a key that has since been revoked. Returns how many.
    pub async fn purge_dashboard_sessions(
        &self,
        now: DateTime<Utc>,
        idle_since: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(per_backend!(self, |pool| {
            sqlx::query(&sql(
                "DELETE FROM dashboard_sessions WHERE expires_at <= ? OR last_seen_at <= ? \
                 OR api_key_id IN (SELECT id FROM api_keys WHERE revoked_at IS NOT NULL)",
            ))
            .bind(ms(millis(now)))
            .bind(ms(millis(idle_since)))
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::hash_key;
    use chrono::Duration;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_session_lives_until_sign_out_idle_expiry_revocation_or_the_user_goes() {
        let (_dir, store) = store().await;
        let user = store
            .create_user("ada", true, &["eng".into()])
            .await
            .unwrap();
        let key = store.create_api_key(user.id, "laptop").await.unwrap();
        let principal = store
            .principal_for_key(&hash_key(&key.secret))
            .await
            .unwrap()
            .unwrap();
        let now = Utc::now();
        let idle = Duration::minutes(30);
        let open = |n: u8| {
            let store = store.clone();
            let principal = principal.clone();
            async move {
                let id = [n; 32];
                store
                    .create_dashboard_session(&id, &principal, now, now + Duration::hours(12))
                    .await
                    .unwrap();
                id
            }
        };
        let valid = |id: [u8; 32], at: DateTime<Utc>| {
            let store = store.clone();
            async move {
                store
                    .dashboard_session(&id, at, at - idle)
                    .await
                    .unwrap()
                    .map(|s| s.principal)
            }
        };

        let a = open(1).await;
        assert_eq!(valid(a, now).await, Some(principal.clone()), "groups too");
        assert_eq!(valid([9; 32], now).await, None, "unknown id");
        assert_eq!(
            valid(a, now + Duration::hours(13)).await,
            None,
            "absolute expiry"
        );
        assert_eq!(valid(a, now + Duration::minutes(31)).await, None, "idle");
        store
            .touch_dashboard_session(&a, now + Duration::minutes(20))
            .await
            .unwrap();
        assert!(
            valid(a, now + Duration::minutes(31)).await.is_some(),
            "used"
        );
        assert!(store.end_dashboard_session(&a).await.unwrap());
        assert_eq!(valid(a, now).await, None, "signed out");

        let b = open(2).await;
        assert!(store.revoke_api_key(key.info.id).await.unwrap());
        assert_eq!(valid(b, now).await, None, "its key was revoked");
        assert_eq!(
            store
                .purge_dashboard_sessions(now, now - idle)
                .await
                .unwrap(),
            1
        );

        let other = store.create_api_key(user.id, "desk").await.unwrap();
        let principal = store
            .principal_for_key(&hash_key(&other.secret))
            .await
            .unwrap()
            .unwrap();
        let c = [3; 32];
        store
            .create_dashboard_session(&c, &principal, now, now + Duration::hours(12))
            .await
            .unwrap();
        assert!(valid(c, now).await.is_some());
        assert_eq!(
            store.end_dashboard_sessions_of_user(user.id).await.unwrap(),
            1
        );
        assert_eq!(valid(c, now).await, None, "all the user's sessions ended");
    }
}

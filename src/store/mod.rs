//! Persistence: the database pool, migrations, the queries the rest of Tollgate needs, and the
//! batching recorder that writes interceptions off the request path.
//!
//! SQLite is the embedded default (one file, WAL mode). Times are stored as integer UTC
//! milliseconds, ids as UUID text, money as integer nano-USD.
//!
//! Not here: deciding anything (auth, budgets, routing). The store answers questions and writes
//! what it is given.

mod governance;
mod queries;
mod record;
mod recorder;
mod retention;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use uuid::Uuid;

pub use governance::{PriceOverrideRow, SealedKeyRow, SpendLimitRow};
pub use queries::{
    GroupDetail, GroupRef, InterceptionFilter, InterceptionPage, InterceptionRow, PriceOverride,
    PromptRow, Queries, SeatHolderRow, SessionCursor, SessionPage, SessionSummary, SpendLimitEntry,
    SpendScope, ThoughtRow, ToolUsageRow, UsageFilter, UsageGroupBy, UsageRow, UsageSums,
    UserDetail,
};
pub use record::{CredentialKind, InterceptionRecord, InterceptionStatus};
pub use recorder::{Recorder, RecorderHandle};
pub use retention::{purge_once, run_retention, spawn_retention, RETENTION_PURGED_TOTAL};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
}

/// Who a Tollgate key belongs to, as the gateway and API need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Uuid,
    pub username: String,
    pub is_admin: bool,
    pub group_ids: Vec<Uuid>,
    pub api_key_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub hint: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A freshly created key: the only moment the secret exists outside the caller's hands.
#[derive(Debug)]
pub struct NewApiKey {
    pub info: ApiKeyInfo,
    pub secret: String,
}

/// Tollgate keys look like `tg_` followed by 48 hex characters.
pub const KEY_PREFIX: &str = "tg_";

/// SHA-256 of a presented key: what is stored and looked up. Keys are long random strings, so
/// a fast unsalted hash is enough (there is nothing to brute-force).
pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// `tg_…abcd`, `sk-…wxyz`: enough to recognise a key, never enough to use it.
pub fn mask_secret(secret: &str) -> String {
    let prefix: String = secret
        .chars()
        .take_while(|c| *c != '-' && *c != '_')
        .take(8)
        .collect();
    let sep = secret
        .chars()
        .nth(prefix.chars().count())
        .filter(|c| *c == '-' || *c == '_');
    let tail: String = if secret.chars().count() >= 12 {
        let chars: Vec<char> = secret.chars().collect();
        chars[chars.len() - 4..].iter().collect()
    } else {
        String::new()
    };
    match sep {
        Some(s) => format!("{prefix}{s}…{tail}"),
        None => format!("…{tail}"),
    }
}

pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|_| StoreError::Invalid(format!("bad uuid in database: {s}")))
}

/// The database behind Tollgate.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens the database named by `url` (creating a SQLite file and its folder if needed).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        if url.starts_with("postgres") {
            return Err(StoreError::Invalid(
                "PostgreSQL is not supported by this build yet; use a sqlite: URL".into(),
            ));
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let file = options.get_filename();
        if let Some(parent) = Path::new(file).parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StoreError::Invalid(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    /// Readiness: the database answers and the schema is in place.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM users LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) fn sqlite_pool(&self) -> &SqlitePool {
        &self.pool
    }

    // ---- users and groups -------------------------------------------------------------------

    /// Creates a user, and any groups named that do not exist yet.
    pub async fn create_user(
        &self,
        username: &str,
        is_admin: bool,
        groups: &[String],
    ) -> Result<User, StoreError> {
        validate_name("username", username)?;
        let now = Utc::now();
        let id = Uuid::new_v4();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (id, username, is_admin, created_at, updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(username) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(username)
        .bind(is_admin)
        .bind(millis(now))
        .bind(millis(now))
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("user {username:?}")));
        }
        for g in groups {
            validate_name("group", g)?;
            sqlx::query("INSERT INTO groups (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING")
                .bind(Uuid::new_v4().to_string())
                .bind(g)
                .bind(millis(now))
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO group_members (group_id, user_id) SELECT id, ? FROM groups WHERE name = ? ON CONFLICT DO NOTHING",
            )
            .bind(id.to_string())
            .bind(g)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(User {
            id,
            username: username.to_string(),
            is_admin,
            created_at: from_millis(millis(now)),
        })
    }

    pub async fn find_user(&self, username: &str) -> Result<User, StoreError> {
        let row =
            sqlx::query("SELECT id, username, is_admin, created_at FROM users WHERE username = ?")
                .bind(username)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("user {username:?}")))?;
        Ok(User {
            id: parse_uuid(row.get::<&str, _>(0))?,
            username: row.get(1),
            is_admin: row.get(2),
            created_at: from_millis(row.get(3)),
        })
    }

    // ---- API keys ---------------------------------------------------------------------------

    /// Creates a key for a user; the secret is returned once and only its hash is stored.
    pub async fn create_api_key(&self, user_id: Uuid, name: &str) -> Result<NewApiKey, StoreError> {
        let mut raw = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let secret = format!("{KEY_PREFIX}{}", hex::encode(raw));
        let now = Utc::now();
        let info = ApiKeyInfo {
            id: Uuid::new_v4(),
            user_id,
            name: name.to_string(),
            hint: mask_secret(&secret),
            created_at: from_millis(millis(now)),
            revoked_at: None,
        };
        let res = sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, secret_hash, hint, created_at, updated_at) SELECT ?, id, ?, ?, ?, ?, ? FROM users WHERE id = ?",
        )
        .bind(info.id.to_string())
        .bind(name)
        .bind(hex::encode(hash_key(&secret)))
        .bind(&info.hint)
        .bind(millis(now))
        .bind(millis(now))
        .bind(user_id.to_string())
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        Ok(NewApiKey { info, secret })
    }

    /// Marks a key revoked. Returns false when no such (unrevoked) key exists.
    pub async fn revoke_api_key(&self, id: Uuid) -> Result<bool, StoreError> {
        let now = millis(Utc::now());
        let res = sqlx::query("UPDATE api_keys SET revoked_at = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(now)
            .bind(now)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    /// The principal behind a key hash, if the key exists and is not revoked.
    pub async fn principal_for_key(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<Principal>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id, u.id, u.username, u.is_admin FROM api_keys k JOIN users u ON u.id = k.user_id \
             WHERE k.secret_hash = ? AND k.revoked_at IS NULL",
        )
        .bind(hex::encode(hash))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let user_id = parse_uuid(row.get::<&str, _>(1))?;
        let groups = sqlx::query("SELECT group_id FROM group_members WHERE user_id = ?")
            .bind(user_id.to_string())
            .fetch_all(&self.pool)
            .await?;
        let mut group_ids = Vec::with_capacity(groups.len());
        for g in groups {
            group_ids.push(parse_uuid(g.get::<&str, _>(0))?);
        }
        Ok(Some(Principal {
            api_key_id: parse_uuid(row.get::<&str, _>(0))?,
            user_id,
            username: row.get(2),
            is_admin: row.get(3),
            group_ids,
        }))
    }

    // ---- interceptions ----------------------------------------------------------------------

    /// The interception that recorded `tool_call_id`, with its thread root, for thread lineage
    /// of requests whose producer is no longer in memory.
    pub async fn thread_of_tool_call(
        &self,
        tool_call_id: &str,
    ) -> Result<Option<(Uuid, Uuid)>, StoreError> {
        let row = sqlx::query(
            "SELECT i.id, COALESCE(i.thread_root_id, i.id) FROM tool_usages t JOIN interceptions i ON i.id = t.interception_id \
             WHERE t.tool_call_id = ? ORDER BY t.id DESC LIMIT 1",
        )
        .bind(tool_call_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((
                parse_uuid(r.get::<&str, _>(0))?,
                parse_uuid(r.get::<&str, _>(1))?,
            ))),
        }
    }

    /// Writes a batch of finished interceptions (and their child rows) in one transaction.
    pub async fn insert_interceptions(
        &self,
        batch: &[InterceptionRecord],
    ) -> Result<(), StoreError> {
        record::insert_batch_sqlite(&self.pool, batch).await
    }

    pub async fn count_interceptions(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM interceptions")
            .fetch_one(&self.pool)
            .await?)
    }
}

fn validate_name(what: &str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} {name:?}: use 1-64 letters, digits, '-', '_', '.' or '@'"
        )))
    }
}

impl FromStr for InterceptionStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InterceptionStatus::ALL
            .iter()
            .copied()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| StoreError::Invalid(format!("unknown status {s}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_only_a_hint() {
        assert_eq!(mask_secret("sk-proj-abcdefghijklmnop1234"), "sk-…1234");
        assert_eq!(
            mask_secret("tg_0123456789abcdef0123456789abcdef"),
            "tg_…cdef"
        );
        assert_eq!(mask_secret("short"), "…");
        assert_eq!(mask_secret("ghu_abcdefghijklmnopqrstuvwxyz"), "ghu_…wxyz");
    }

    #[tokio::test]
    async fn users_keys_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let u = store
            .create_user("ada", true, &["eng".into(), "ops".into()])
            .await
            .unwrap();
        assert!(matches!(
            store.create_user("ada", false, &[]).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(store.create_user("bad name", false, &[]).await.is_err());
        let key = store.create_api_key(u.id, "laptop").await.unwrap();
        assert!(key.secret.starts_with("tg_") && key.secret.len() == 51);
        let p = store
            .principal_for_key(&hash_key(&key.secret))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((p.user_id, p.is_admin, p.group_ids.len()), (u.id, true, 2));
        assert!(store
            .principal_for_key(&hash_key("tg_nope"))
            .await
            .unwrap()
            .is_none());
        assert!(store.revoke_api_key(key.info.id).await.unwrap());
        assert!(!store.revoke_api_key(key.info.id).await.unwrap());
        assert!(store
            .principal_for_key(&hash_key(&key.secret))
            .await
            .unwrap()
            .is_none());
        // the secret itself is nowhere in the database
        let hashes: Vec<String> = sqlx::query_scalar("SELECT secret_hash || hint FROM api_keys")
            .fetch_all(store.sqlite_pool())
            .await
            .unwrap();
        assert!(hashes.iter().all(|h| !h.contains(&key.secret[3..])));
    }
}

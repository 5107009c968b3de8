//! Persistence: the database pool, migrations, the queries the rest of Tollgate needs, and the
//! batching recorder that writes interceptions off the request path.
//!
//! SQLite is the embedded default (one file, WAL mode): times are stored as integer UTC
//! milliseconds, ids as UUID text, money as integer nano-USD. PostgreSQL (`database.url =
//! "postgres://…"`) is the shared store for several replicas: native `uuid`, `timestamptz`,
//! `bigint` and `bytea` (see `migrations/postgres/`). Both sit behind the same [`Store`] methods.
//!
//! Not here: deciding anything (auth, budgets, routing). The store answers questions and writes
//! what it is given.

mod dashboard_sessions;
mod dialect;
mod governance;
mod journal;
mod queries;
mod record;
mod recorder;
mod retention;
mod rollup;
mod spend;
mod spill;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, Row, SqlitePool};
use uuid::Uuid;

pub use dashboard_sessions::DashboardSession;
pub use governance::{PriceOverrideRow, SealedKeyRow, SpendLimitRow};
pub use journal::{JournalEntry, JournalError, Recovery, SpendJournal, RECOVERED};
pub use queries::{
    GroupDetail, GroupRef, InterceptionFilter, InterceptionPage, InterceptionRow, PriceOverride,
    PromptRow, Queries, SeatHolderRow, SessionCursor, SessionPage, SessionSummary, SpendLimitEntry,
    SpendScope, ThoughtRow, ToolUsageRow, UsageFilter, UsageGroupBy, UsageRow, UsageSums,
    UserDetail,
};
pub use record::{CredentialKind, InterceptionRecord, InterceptionStatus};
pub use recorder::{Recorder, RecorderHandle, RecorderProgress};
pub use retention::{purge_once, run_retention, spawn_retention, RETENTION_PURGED_TOTAL};
pub use spend::SharedReservation;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    /// The database cannot be reached (start-up); the message names the server, not the URL.
    #[error("{0}")]
    Unavailable(String),
    /// The SQLite file (or its WAL or shared-memory file) is open to group or others.
    #[error("database file {0}")]
    TooOpen(#[from] crate::private_files::TooOpen),
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

/// Whether `text` holds something shaped like a Tollgate key (`tg_` and at least 16 hex
/// characters, not inside a longer word). Such a value is never sent to a provider, whatever
/// header or policy it comes with: it is a Tollgate credential, not a provider's.
pub fn contains_tollgate_key(text: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(KEY_PREFIX).any(|(at, _)| {
        let starts_word = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
        let hex = bytes[at + KEY_PREFIX.len()..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        starts_word && hex >= 16
    })
}

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

/// Prepared statements kept per connection: the recorder's multi-row inserts come in about 60
/// shapes (see `dialect::statement_chunks`), and the API's queries need room beside them.
const STATEMENT_CACHE: usize = 256;

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
///
/// One of two backends, chosen by the URL's scheme. Each query method matches on the backend
/// and runs that dialect's SQL: SQLite stores ids as text and times as epoch milliseconds,
/// PostgreSQL uses native `uuid` and `timestamptz`, so binds differ as well as placeholders.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    /// Unix ms until which the request path should not wait on the database (see
    /// [`Store::recently_failed`]).
    down_until_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

#[derive(Clone, Debug)]
pub(crate) enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// How long the request path skips the database after a failed query.
const HOT_PATH_BACKOFF: Duration = Duration::from_secs(1);
/// The longest a request waits for a query that has a fallback.
const HOT_PATH_TIMEOUT: Duration = Duration::from_millis(1000);

/// Whether `url` names a PostgreSQL database (anything else is taken as SQLite).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Store {
    /// Opens the database named by `url`: `postgres://…` for PostgreSQL, otherwise SQLite
    /// (creating the file and its folder if needed).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        if is_postgres_url(url) {
            return Self::connect_postgres(url, max_connections).await;
        }
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .statement_cache_capacity(STATEMENT_CACHE);
        prepare_sqlite_file(options.get_filename())?;
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Store {
            down_until_ms: Default::default(),
            backend: Backend::Sqlite(pool),
        })
    }

    /// Connects eagerly so that a wrong or unreachable server stops the start at once. The
    /// error names host, port and database but never the URL itself, which may hold a password.
    async fn connect_postgres(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::Invalid(format!("database.url is not a valid PostgreSQL URL: {e}"))
            })?
            .statement_cache_capacity(STATEMENT_CACHE);
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        // Shorter than open_store's overall timeout, so this message (with the host) wins.
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to PostgreSQL at {target}: {e}"))
            })?;
        Ok(Store {
            down_until_ms: Default::default(),
            backend: Backend::Postgres(pool),
        })
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    /// True for a moment after a request-path query failed: lookups that have a fallback (a
    /// stale key, no thread link, the local ledger) use it at once instead of each waiting for
    /// a connection to a database that is down.
    pub fn recently_failed(&self) -> bool {
        chrono::Utc::now().timestamp_millis()
            < self
                .down_until_ms
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a failed request-path query (see [`Store::recently_failed`]).
    pub fn note_failure(&self) {
        let until = chrono::Utc::now().timestamp_millis() + HOT_PATH_BACKOFF.as_millis() as i64;
        self.down_until_ms
            .store(until, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs a request-path query that has a fallback: skipped while the database recently
    /// failed, bounded by [`HOT_PATH_TIMEOUT`], and noted when it fails.
    pub async fn on_hot_path<T, F>(&self, query: F) -> Option<T>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        if self.recently_failed() {
            return None;
        }
        match tokio::time::timeout(HOT_PATH_TIMEOUT, query).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "request-path query failed; using its fallback");
                self.note_failure();
                None
            }
            Err(_) => {
                self.note_failure();
                None
            }
        }
    }

    /// True when the store is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
            Backend::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    /// Readiness: the database answers and the schema is in place.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let sql = "SELECT 1 FROM users LIMIT 1";
        match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query(sql).fetch_optional(pool).await?;
            }
            Backend::Postgres(pool) => {
                sqlx::query(sql).fetch_optional(pool).await?;
            }
        }
        Ok(())
    }

    /// The SQLite pool, for unit tests that look at rows directly.
    #[cfg(test)]
    pub(crate) fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.backend {
            Backend::Sqlite(pool) => Some(pool),
            Backend::Postgres(_) => None,
        }
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
        for g in groups {
            validate_name("group", g)?;
        }
        // Whole milliseconds everywhere, so both backends hand back the same instant.
        let now = from_millis(millis(Utc::now()));
        let id = Uuid::new_v4();
        let inserted = match &self.backend {
            Backend::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                let inserted = sqlx::query(
                    "INSERT INTO users (id, username, is_admin, created_at, updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(username) DO NOTHING",
                )
                .bind(id.to_string())
                .bind(username)
                .bind(is_admin)
                .bind(millis(now))
                .bind(millis(now))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted > 0 {
                    for g in groups {
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
                }
                inserted
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let inserted = sqlx::query(
                    "INSERT INTO users (id, username, is_admin, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) ON CONFLICT(username) DO NOTHING",
                )
                .bind(id)
                .bind(username)
                .bind(is_admin)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted > 0 {
                    for g in groups {
                        sqlx::query("INSERT INTO groups (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT(name) DO NOTHING")
                            .bind(Uuid::new_v4())
                            .bind(g)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(
                            "INSERT INTO group_members (group_id, user_id) SELECT id, $1 FROM groups WHERE name = $2 ON CONFLICT DO NOTHING",
                        )
                        .bind(id)
                        .bind(g)
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                }
                inserted
            }
        };
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("user {username:?}")));
        }
        Ok(User {
            id,
            username: username.to_string(),
            is_admin,
            created_at: now,
        })
    }

    pub async fn find_user(&self, username: &str) -> Result<User, StoreError> {
        let not_found = || StoreError::NotFound(format!("user {username:?}"));
        match &self.backend {
            Backend::Sqlite(pool) => {
                let row = sqlx::query(
                    "SELECT id, username, is_admin, created_at FROM users WHERE username = ?",
                )
                .bind(username)
                .fetch_optional(pool)
                .await?
                .ok_or_else(not_found)?;
                Ok(User {
                    id: parse_uuid(row.get::<&str, _>(0))?,
                    username: row.get(1),
                    is_admin: row.get(2),
                    created_at: from_millis(row.get(3)),
                })
            }
            Backend::Postgres(pool) => {
                let row = sqlx::query(
                    "SELECT id, username, is_admin, created_at FROM users WHERE username = $1",
                )
                .bind(username)
                .fetch_optional(pool)
                .await?
                .ok_or_else(not_found)?;
                Ok(User {
                    id: row.get(0),
                    username: row.get(1),
                    is_admin: row.get(2),
                    created_at: row.get(3),
                })
            }
        }
    }

    // ---- API keys ---------------------------------------------------------------------------

    /// Creates a key for a user; the secret is returned once and only its hash is stored.
    pub async fn create_api_key(&self, user_id: Uuid, name: &str) -> Result<NewApiKey, StoreError> {
        let mut raw = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let secret = format!("{KEY_PREFIX}{}", hex::encode(raw));
        let now = from_millis(millis(Utc::now()));
        let info = ApiKeyInfo {
            id: Uuid::new_v4(),
            user_id,
            name: name.to_string(),
            hint: mask_secret(&secret),
            created_at: now,
            revoked_at: None,
        };
        let hash = hex::encode(hash_key(&secret));
        let affected = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(
                "INSERT INTO api_keys (id, user_id, name, secret_hash, hint, created_at, updated_at) SELECT ?, id, ?, ?, ?, ?, ? FROM users WHERE id = ?",
            )
            .bind(info.id.to_string())
            .bind(name)
            .bind(&hash)
            .bind(&info.hint)
            .bind(millis(now))
            .bind(millis(now))
            .bind(user_id.to_string())
            .execute(pool)
            .await?
            .rows_affected(),
            Backend::Postgres(pool) => sqlx::query(
                "INSERT INTO api_keys (id, user_id, name, secret_hash, hint, created_at, updated_at) SELECT $1, id, $2, $3, $4, $5, $5 FROM users WHERE id = $6",
            )
            .bind(info.id)
            .bind(name)
            .bind(&hash)
            .bind(&info.hint)
            .bind(now)
            .bind(user_id)
            .execute(pool)
            .await?
            .rows_affected(),
        };
        if affected == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        Ok(NewApiKey { info, secret })
    }

    /// Marks a key revoked. Returns false when no such (unrevoked) key exists.
    pub async fn revoke_api_key(&self, id: Uuid) -> Result<bool, StoreError> {
        let now = Utc::now();
        let affected = match &self.backend {
            Backend::Sqlite(pool) => sqlx::query(
                "UPDATE api_keys SET revoked_at = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
            )
            .bind(millis(now))
            .bind(millis(now))
            .bind(id.to_string())
            .execute(pool)
            .await?
            .rows_affected(),
            Backend::Postgres(pool) => sqlx::query(
                "UPDATE api_keys SET revoked_at = $1, updated_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(from_millis(millis(now)))
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected(),
        };
        Ok(affected > 0)
    }

    /// The principal behind a key hash, if the key exists and is not revoked.
    pub async fn principal_for_key(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<Principal>, StoreError> {
        let hash = hex::encode(hash);
        match &self.backend {
            Backend::Sqlite(pool) => {
                let row = sqlx::query(
                    "SELECT k.id, u.id, u.username, u.is_admin FROM api_keys k JOIN users u ON u.id = k.user_id \
                     WHERE k.secret_hash = ? AND k.revoked_at IS NULL",
                )
                .bind(hash)
                .fetch_optional(pool)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let user_id = parse_uuid(row.get::<&str, _>(1))?;
                let groups = sqlx::query("SELECT group_id FROM group_members WHERE user_id = ?")
                    .bind(user_id.to_string())
                    .fetch_all(pool)
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
            Backend::Postgres(pool) => {
                // One round trip: the group ids come back as an array.
                let row = sqlx::query(
                    "SELECT k.id, u.id, u.username, u.is_admin, \
                     ARRAY(SELECT m.group_id FROM group_members m WHERE m.user_id = u.id) \
                     FROM api_keys k JOIN users u ON u.id = k.user_id \
                     WHERE k.secret_hash = $1 AND k.revoked_at IS NULL",
                )
                .bind(hash)
                .fetch_optional(pool)
                .await?;
                Ok(row.map(|row| Principal {
                    api_key_id: row.get(0),
                    user_id: row.get(1),
                    username: row.get(2),
                    is_admin: row.get(3),
                    group_ids: row.get(4),
                }))
            }
        }
    }

    // ---- interceptions ----------------------------------------------------------------------

    /// The interception that recorded `tool_call_id`, with its thread root, for thread lineage
    /// of requests whose producer is no longer in memory.
    pub async fn thread_of_tool_call(
        &self,
        user: Uuid,
        tool_call_id: &str,
    ) -> Result<Option<(Uuid, Uuid)>, StoreError> {
        // Only the user's own interceptions: a tool-call id is client-chosen text, and another
        // user's must not attach to (or show up in) their thread.
        const SQL: &str = "SELECT i.id, COALESCE(i.thread_root_id, i.id) FROM tool_usages t JOIN interceptions i ON i.id = t.interception_id \
             WHERE t.tool_call_id = ";
        const TAIL: &str = " ORDER BY t.id DESC LIMIT 1";
        match &self.backend {
            Backend::Sqlite(pool) => {
                let row = sqlx::query(&format!("{SQL}? AND i.user_id = ?{TAIL}"))
                    .bind(tool_call_id)
                    .bind(user.to_string())
                    .fetch_optional(pool)
                    .await?;
                match row {
                    None => Ok(None),
                    Some(r) => Ok(Some((
                        parse_uuid(r.get::<&str, _>(0))?,
                        parse_uuid(r.get::<&str, _>(1))?,
                    ))),
                }
            }
            Backend::Postgres(pool) => {
                let row = sqlx::query(&format!("{SQL}$1 AND i.user_id = $2{TAIL}"))
                    .bind(tool_call_id)
                    .bind(user)
                    .fetch_optional(pool)
                    .await?;
                Ok(row.map(|r| (r.get(0), r.get(1))))
            }
        }
    }

    /// Writes a batch of finished interceptions (and their child rows) in one transaction.
    pub async fn insert_interceptions(
        &self,
        batch: &[InterceptionRecord],
    ) -> Result<(), StoreError> {
        record::insert_batch(self, batch).await
    }

    pub async fn count_interceptions(&self) -> Result<i64, StoreError> {
        let sql = "SELECT COUNT(*) FROM interceptions";
        Ok(match &self.backend {
            Backend::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
            Backend::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
        })
    }
}

/// Every prompt, tool call and thought lands in the SQLite file, so it and the WAL and
/// shared-memory files beside it must be the owner's alone. A new file is created `0600` (in a
/// new `0700` directory) before SQLite opens it: SQLite gives the `-wal` and `-shm` files it
/// makes the database file's mode. An existing one open to group or others stops the start, as
/// the secret files do. An in-memory database has no file.
fn prepare_sqlite_file(file: &Path) -> Result<(), StoreError> {
    let name = file.to_string_lossy();
    if name.is_empty() || name == ":memory:" {
        return Ok(());
    }
    let cannot = |what: &Path, e: std::io::Error| {
        StoreError::Invalid(format!("cannot create {}: {e}", what.display()))
    };
    if let Some(parent) = file.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            crate::private_files::create_dir(parent).map_err(|e| cannot(parent, e))?;
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        crate::private_files::check(Path::new(&format!("{name}{suffix}")))?;
    }
    crate::private_files::create_empty(file).map_err(|e| cannot(file, e))
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
        assert!(contains_tollgate_key(&key.secret));
        assert!(contains_tollgate_key(&format!("Bearer {}", key.secret)));
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
            .fetch_all(store.sqlite_pool().unwrap())
            .await
            .unwrap();
        assert!(hashes.iter().all(|h| !h.contains(&key.secret[3..])));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_sqlite_files_are_the_owners_alone_and_an_open_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| crate::private_files::mode(p).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("data/t.db");
        let url = format!("sqlite://{}", db.display());
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        store.create_user("ada", false, &[]).await.unwrap();
        assert_eq!(mode(&dir.path().join("data")), 0o700);
        for suffix in ["", "-wal", "-shm"] {
            let file = Path::new(&format!("{}{suffix}", db.display())).to_path_buf();
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        drop(store);
        for suffix in ["", "-wal"] {
            let file = Path::new(&format!("{}{suffix}", db.display())).to_path_buf();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Store::connect(&url, 2).await.unwrap_err();
            assert!(
                matches!(err, StoreError::TooOpen(_)) && err.to_string().contains("chmod 600"),
                "{err}"
            );
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Store::connect(&url, 2).await.unwrap();
    }
}

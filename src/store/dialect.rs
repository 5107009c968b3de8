//! What differs between the two backends, in one place, so query methods can be written once.
//!
//! SQLite stores ids as UUID text and times as epoch milliseconds; PostgreSQL stores `uuid` and
//! `timestamptz`. [`per_backend!`] runs a block once per backend, type-checked separately for
//! each, with helpers that turn a `Uuid` / epoch-ms value into that backend's bind type and a
//! `?`-placeholder statement into that backend's placeholders. [`DbRow`] reads columns back
//! into the same Rust values from either backend's rows.
//!
//! SQL inside a `per_backend!` block must be valid on both: `CAST(x AS TEXT)` / `CAST(x AS
//! BIGINT)` rather than `::`, `ON CONFLICT … DO NOTHING` rather than `INSERT OR IGNORE`, and
//! no scalar `MIN`/`MAX` (PostgreSQL's are `LEAST`/`GREATEST`).

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{Postgres, QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{from_millis, millis, parse_uuid, StoreError};

/// Rewrites `?` placeholders as `$1, $2, …` (PostgreSQL). The statements this is used on hold
/// no `?` inside string literals.
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits `items` into statements of `max` rows (a power of two) and then powers of two, so
/// each table's inserts come in at most log2(max) + 1 shapes and stay prepared in the
/// connection's statement cache. With any-size chunks, the last statement of each table in a
/// batch had a shape seldom seen again and was parsed and planned afresh, batch after batch.
pub(crate) fn statement_chunks<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    debug_assert!(max.is_power_of_two());
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let take = if rest.len() >= max {
            max
        } else {
            1 << rest.len().ilog2()
        };
        let (head, tail) = rest.split_at(take);
        rest = tail;
        Some(head)
    })
}

/// Runs `$body` with `$pool` bound to the store's pool, once per backend. Inside the block:
/// `Db` is the sqlx database type (for `QueryBuilder::<Db>`), `id(Uuid)` is an id bind,
/// `ms(i64)` a time bind from epoch milliseconds, and `sql("… ? …")` the statement text with
/// that backend's placeholders.
macro_rules! per_backend {
    ($store:expr, |$pool:ident| $body:block) => {
        match $store.backend() {
            $crate::store::Backend::Sqlite($pool) => {
                #[allow(dead_code)]
                type Db = sqlx::Sqlite;
                #[allow(dead_code)]
                fn id(u: uuid::Uuid) -> String {
                    u.to_string()
                }
                #[allow(dead_code)]
                fn ms(t: i64) -> i64 {
                    t
                }
                #[allow(dead_code)]
                fn sql(s: &str) -> String {
                    s.to_string()
                }
                $body
            }
            $crate::store::Backend::Postgres($pool) => {
                #[allow(dead_code)]
                type Db = sqlx::Postgres;
                #[allow(dead_code)]
                fn id(u: uuid::Uuid) -> uuid::Uuid {
                    u
                }
                #[allow(dead_code)]
                fn ms(t: i64) -> chrono::DateTime<chrono::Utc> {
                    $crate::store::from_millis(t)
                }
                #[allow(dead_code)]
                fn sql(s: &str) -> String {
                    $crate::store::dialect::numbered(s)
                }
                $body
            }
        }
    };
}
pub(crate) use per_backend;

/// SQL-building differences, for statements assembled with a `QueryBuilder`.
pub(crate) trait Dialect: sqlx::Database {
    /// Prefix that keeps a term off an index (SQLite's unary `+`); empty where unsupported.
    const UNINDEXED: &'static str;
    /// ` INDEXED BY interceptions_session_id` on SQLite (whose planner needs the hint); empty
    /// on PostgreSQL, which has no hints and plans these walks well without.
    const BY_SESSION_INDEX: &'static str;
    fn push_id(qb: &mut QueryBuilder<'_, Self>, id: Uuid);
    fn push_ms(qb: &mut QueryBuilder<'_, Self>, ms: i64);
    fn push_text(qb: &mut QueryBuilder<'_, Self>, text: String);
    fn push_int(qb: &mut QueryBuilder<'_, Self>, v: i64);
    /// The distinct values of `expr` in a group, read back with [`DbRow::list`].
    fn distinct_list(expr: &str) -> String;
    /// `expr` (a uuid or text column) as text.
    fn as_text(expr: &str) -> String;
    /// The UTC day (`YYYY-MM-DD`) of a time column.
    fn utc_day(expr: &str) -> String;
}

impl Dialect for Sqlite {
    const UNINDEXED: &'static str = "+";
    const BY_SESSION_INDEX: &'static str = " INDEXED BY interceptions_session_id";
    fn push_id(qb: &mut QueryBuilder<'_, Self>, id: Uuid) {
        qb.push_bind(id.to_string());
    }
    fn push_ms(qb: &mut QueryBuilder<'_, Self>, ms: i64) {
        qb.push_bind(ms);
    }
    fn push_text(qb: &mut QueryBuilder<'_, Self>, text: String) {
        qb.push_bind(text);
    }
    fn push_int(qb: &mut QueryBuilder<'_, Self>, v: i64) {
        qb.push_bind(v);
    }
    fn distinct_list(expr: &str) -> String {
        format!("json_group_array(DISTINCT {expr})")
    }
    fn as_text(expr: &str) -> String {
        expr.to_string()
    }
    fn utc_day(expr: &str) -> String {
        format!("strftime('%Y-%m-%d', {expr} / 1000, 'unixepoch')")
    }
}

impl Dialect for Postgres {
    const UNINDEXED: &'static str = "";
    const BY_SESSION_INDEX: &'static str = "";
    fn push_id(qb: &mut QueryBuilder<'_, Self>, id: Uuid) {
        qb.push_bind(id);
    }
    fn push_ms(qb: &mut QueryBuilder<'_, Self>, ms: i64) {
        qb.push_bind(from_millis(ms));
    }
    fn push_text(qb: &mut QueryBuilder<'_, Self>, text: String) {
        qb.push_bind(text);
    }
    fn push_int(qb: &mut QueryBuilder<'_, Self>, v: i64) {
        qb.push_bind(v);
    }
    fn distinct_list(expr: &str) -> String {
        format!("array_agg(DISTINCT {expr})")
    }
    fn as_text(expr: &str) -> String {
        format!("CAST({expr} AS TEXT)")
    }
    fn utc_day(expr: &str) -> String {
        format!("to_char({expr} AT TIME ZONE 'UTC', 'YYYY-MM-DD')")
    }
}

/// Reads the columns whose representation differs between the backends.
pub(crate) trait DbRow: Row {
    fn uuid(&self, col: &str) -> Result<Uuid, StoreError>;
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, StoreError>;
    /// A time column as epoch milliseconds (keyset cursors are kept in milliseconds).
    fn opt_ms(&self, col: &str) -> Result<Option<i64>, StoreError>;
    /// Any integer column (or SUM/COUNT) as i64; NULL is `None`.
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError>;
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn boolean(&self, col: &str) -> Result<bool, StoreError>;
    /// A [`Dialect::distinct_list`] aggregate.
    fn list(&self, col: &str) -> Result<Vec<String>, StoreError>;

    fn ms(&self, col: &str) -> Result<i64, StoreError> {
        self.opt_ms(col)?
            .ok_or_else(|| StoreError::Invalid(format!("{col} is NULL")))
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>, StoreError> {
        Ok(from_millis(self.ms(col)?))
    }
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.opt_ms(col)?.map(from_millis))
    }
    fn int(&self, col: &str) -> Result<i64, StoreError> {
        Ok(self.opt_int(col)?.unwrap_or(0))
    }
}

impl DbRow for SqliteRow {
    fn list(&self, col: &str) -> Result<Vec<String>, StoreError> {
        let text: String = self.try_get(col)?;
        serde_json::from_str(&text)
            .map_err(|e| StoreError::Invalid(format!("bad {col} aggregate in database: {e}")))
    }
    fn uuid(&self, col: &str) -> Result<Uuid, StoreError> {
        parse_uuid(&self.try_get::<String, _>(col)?)
    }
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, StoreError> {
        self.try_get::<Option<String>, _>(col)?
            .map(|s| parse_uuid(&s))
            .transpose()
    }
    fn opt_ms(&self, col: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn text(&self, col: &str) -> Result<String, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn boolean(&self, col: &str) -> Result<bool, StoreError> {
        Ok(self.try_get(col)?)
    }
}

impl DbRow for PgRow {
    fn list(&self, col: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn uuid(&self, col: &str) -> Result<Uuid, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn opt_ms(&self, col: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get::<Option<DateTime<Utc>>, _>(col)?.map(millis))
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
        // sqlx checks integer widths strictly: integer columns are int4, the rest int8.
        match self.try_get::<Option<i64>, _>(col) {
            Ok(v) => Ok(v),
            Err(_) => Ok(self.try_get::<Option<i32>, _>(col)?.map(i64::from)),
        }
    }
    fn text(&self, col: &str) -> Result<String, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn boolean(&self, col: &str) -> Result<bool, StoreError> {
        Ok(self.try_get(col)?)
    }
}

#[cfg(test)]
mod tests {
    use super::statement_chunks;

    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(
            super::numbered("a = ? AND b IN (?, ?)"),
            "a = $1 AND b IN ($2, $3)"
        );
    }

    #[test]
    fn statements_come_in_full_chunks_then_powers_of_two() {
        let items: Vec<u32> = (0..300).collect();
        let sizes: Vec<usize> = statement_chunks(&items, 128).map(<[u32]>::len).collect();
        assert_eq!(sizes, [128, 128, 32, 8, 4]);
        let joined: Vec<u32> = statement_chunks(&items, 128).flatten().copied().collect();
        assert_eq!(joined, items, "every item once, in order");
        assert_eq!(statement_chunks(&items[..0], 128).count(), 0);
        // However a batch is cut, a table sees at most log2(max) + 1 shapes.
        let mut shapes = std::collections::BTreeSet::new();
        for n in 1..=1000 {
            shapes.extend(statement_chunks(&items[..n.min(300)], 64).map(<[u32]>::len));
        }
        assert_eq!(shapes.len(), 7);
    }
}

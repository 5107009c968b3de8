//! The hourly usage rollup (`usage_hourly`): token, cost and count sums per UTC hour, user,
//! provider, model and client, so usage reports over long ranges read a few thousand buckets
//! instead of every interception.
//!
//! The buckets are kept exact, not approximate: the recorder adds each batch's newly inserted
//! interceptions in the transaction that inserts them, and retention subtracts what it purges in
//! the transaction that deletes it. Reports read whole hours from here and the partial hours at
//! either end of a range from `interceptions` itself (see `Queries::usage`).
//!
//! Not here: spend per budget period (`spend_totals`, PostgreSQL), which is keyed by the period
//! a request was charged to rather than by when it started.

use std::collections::HashMap;

use sqlx::QueryBuilder;
use uuid::Uuid;

use super::dialect::Dialect;

/// One hour in epoch milliseconds; UTC hours are aligned to the epoch.
pub(crate) const HOUR_MS: i64 = 3_600_000;

/// Rows per upsert statement (a power of two: see `dialect::statement_chunks`): 12 binds each,
/// well under SQLite's 32766.
const BUCKETS_PER_STATEMENT: usize = 256;

/// What one interception contributes to its bucket.
pub(super) struct Contribution<'a> {
    pub started_ms: i64,
    pub user_id: Uuid,
    pub provider: &'a str,
    pub model: &'a str,
    pub client: &'a str,
    /// input, output, cache read, cache write, reasoning tokens, then cost in nano-USD.
    pub sums: [i64; 6],
}

/// (hour start in ms, user, provider, model, client).
pub(super) type Key<'a> = (i64, Uuid, &'a str, &'a str, &'a str);

/// A bucket and what to add to it: tokens ×5, cost, count.
pub(super) type Bucket<'a> = (Key<'a>, [i64; 7]);

/// Sums per bucket (counts included), sorted by key so that concurrent writers (PostgreSQL
/// replicas) lock shared buckets in the same order. `sign = -1` subtracts (retention).
pub(super) fn buckets<'a>(
    rows: impl IntoIterator<Item = Contribution<'a>>,
    sign: i64,
) -> Vec<Bucket<'a>> {
    let mut map: HashMap<Key<'a>, [i64; 7]> = HashMap::new();
    for c in rows {
        let hour = c.started_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let e = map
            .entry((hour, c.user_id, c.provider, c.model, c.client))
            .or_insert([0; 7]);
        for (acc, v) in e.iter_mut().zip(c.sums) {
            *acc = acc.saturating_add(sign * v);
        }
        e[6] += sign;
    }
    let mut out: Vec<_> = map.into_iter().collect();
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The upsert statements adding `buckets` to `usage_hourly` (one per chunk).
pub(super) fn upserts<'q, DB: Dialect>(buckets: &[Bucket<'_>]) -> Vec<QueryBuilder<'q, DB>> {
    super::dialect::statement_chunks(buckets, BUCKETS_PER_STATEMENT)
        .map(|chunk| {
            let mut qb = QueryBuilder::<DB>::new(
                "INSERT INTO usage_hourly (hour, user_id, provider, model, client, input_tokens, \
                 output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_tokens, \
                 cost_nano_usd, interception_count) VALUES ",
            );
            for (n, ((hour, user, provider, model, client), sums)) in chunk.iter().enumerate() {
                qb.push(if n == 0 { "(" } else { ", (" });
                DB::push_ms(&mut qb, *hour);
                qb.push(", ");
                DB::push_id(&mut qb, *user);
                for text in [provider, model, client] {
                    qb.push(", ");
                    DB::push_text(&mut qb, text.to_string());
                }
                for v in sums {
                    qb.push(", ");
                    DB::push_int(&mut qb, *v);
                }
                qb.push(")");
            }
            qb.push(" ON CONFLICT (hour, user_id, provider, model, client) DO UPDATE SET ");
            let columns = [
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_write_input_tokens",
                "reasoning_tokens",
                "cost_nano_usd",
                "interception_count",
            ];
            for (n, c) in columns.iter().enumerate() {
                if n > 0 {
                    qb.push(", ");
                }
                qb.push(format!("{c} = usage_hourly.{c} + excluded.{c}"));
            }
            qb
        })
        .collect()
}

/// Removes buckets that retention emptied.
pub(super) const DELETE_EMPTY: &str = "DELETE FROM usage_hourly WHERE interception_count <= 0";

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ms: i64, user: Uuid, model: &str, cost: i64) -> Contribution<'_> {
        Contribution {
            started_ms: ms,
            user_id: user,
            provider: "openai",
            model,
            client: "curl",
            sums: [1, 2, 3, 4, 5, cost],
        }
    }

    #[test]
    fn buckets_sum_by_hour_and_key_and_sort() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let got = buckets(
            [
                c(HOUR_MS * 5 + 10, b, "m", 7),
                c(HOUR_MS * 5 + HOUR_MS - 1, b, "m", 8),
                c(HOUR_MS * 5, a, "m", 1),
                c(HOUR_MS * 6, b, "m", 100),
                c(HOUR_MS * 5 + 3, b, "n", 9),
            ],
            1,
        );
        let keys: Vec<_> = got.iter().map(|(k, _)| (k.0 / HOUR_MS, k.1, k.3)).collect();
        assert_eq!(keys, [(5, a, "m"), (5, b, "m"), (5, b, "n"), (6, b, "m")]);
        assert_eq!(got[1].1, [2, 4, 6, 8, 10, 15, 2]);
        let neg = buckets([c(HOUR_MS * 5 + 10, b, "m", 7)], -1);
        assert_eq!(neg[0].1, [-1, -2, -3, -4, -5, -7, -1]);
    }

    #[test]
    fn times_before_the_epoch_floor_to_their_hour() {
        let got = buckets([c(-1, Uuid::nil(), "m", 0)], 1);
        assert_eq!(got[0].0 .0, -HOUR_MS);
    }
}

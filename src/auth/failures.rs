//! Failed authentication per client address: what keeps a flood of random keys from becoming a
//! flood of database queries.
//!
//! Each address (an IPv4 address, an IPv6 /64: [`ClientKey`]) has a bucket of
//! `auth.failed_attempts_per_minute` tokens, refilled at that rate. Every failed key check (an
//! unknown, revoked or malformed key, a bad dashboard session) takes one. An address whose
//! bucket is empty is throttled: a key it presents that Tollgate does not already know is
//! refused with 429 and `Retry-After` without any lookup (`KeyCache::resolve` takes a failure
//! with [`AuthFailures::take`] before it asks the database, and gives it back when the key
//! turns out valid, so concurrent lookups cannot spend more than the bucket holds). Keys already known to be valid still work, so
//! one misconfigured client behind a shared address does not lock out the others.
//!
//! Memory is bounded: at most [`MAX_ADDRESSES`] buckets; when full, buckets that have refilled
//! (the same as no bucket) are dropped, and if none has, new addresses share one bucket.
//!
//! Not here: the key lookup and its caches (`auth`), answering the 429 (each listener).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::front_door::ClientKey;
use crate::telemetry::metric;

/// Most addresses tracked at once.
pub const MAX_ADDRESSES: usize = 65_536;

/// An address that has failed too often; try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many failed authentications from this address; retry in {} s", retry_after.as_secs())]
pub struct Throttled {
    pub retry_after: Duration,
}

/// See the module docs.
#[derive(Debug)]
pub struct AuthFailures {
    per_minute: std::sync::atomic::AtomicU32,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    by_client: HashMap<ClientKey, Bucket>,
    /// When refilled buckets were last dropped (at most once a second: it walks them all).
    pruned: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// Tokens as of `now`, refilled at `per_minute` up to `per_minute`.
    fn refill(&mut self, now: Instant, per_minute: f64) {
        let gained = now.duration_since(self.updated).as_secs_f64() * per_minute / 60.0;
        self.tokens = (self.tokens + gained).min(per_minute);
        self.updated = now;
    }
}

impl AuthFailures {
    pub fn new(per_minute: u32) -> AuthFailures {
        AuthFailures {
            per_minute: std::sync::atomic::AtomicU32::new(per_minute.max(1)),
            buckets: Mutex::new(Buckets {
                by_client: HashMap::new(),
                pruned: Instant::now(),
            }),
        }
    }

    /// Sets `auth.failed_attempts_per_minute` (at start, before any traffic).
    pub fn set_per_minute(&self, per_minute: u32) {
        self.per_minute
            .store(per_minute.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn rate(&self) -> f64 {
        f64::from(self.per_minute.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Spends one of `client`'s failures on a check that may fail, before it is made (so
    /// concurrent checks cannot overspend); [`AuthFailures::refund`] gives it back when the
    /// check succeeds. `Err` when none is left: the check must not be made, and the client gets
    /// 429 (counted in `tollgate_auth_failures_throttled_total`).
    pub fn take(&self, client: ClientKey) -> Result<(), Throttled> {
        let rate = self.rate();
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        let bucket = buckets.of(client, now, rate);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) * 60.0 / rate;
        drop(buckets);
        metrics::counter!(metric::AUTH_FAILURES_THROTTLED_TOTAL).increment(1);
        Err(Throttled {
            retry_after: Duration::from_secs(wait.ceil().max(1.0) as u64),
        })
    }

    /// Gives back a failure [`AuthFailures::take`] spent: the check succeeded, or could not be
    /// made (the database did not answer), which is not the client's fault.
    pub fn refund(&self, client: ClientKey) {
        let rate = self.rate();
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        let bucket = buckets.of(client, now, rate);
        bucket.tokens = (bucket.tokens + 1.0).min(rate);
    }
}

impl Buckets {
    /// `client`'s bucket as of `now` (a full one for a new address; the shared overflow bucket
    /// when [`MAX_ADDRESSES`] are tracked and none has refilled).
    fn of(&mut self, client: ClientKey, now: Instant, rate: f64) -> &mut Bucket {
        let full = |b: &Buckets| b.by_client.len() >= MAX_ADDRESSES;
        if !self.by_client.contains_key(&client)
            && full(self)
            && now.duration_since(self.pruned) >= Duration::from_secs(1)
        {
            self.pruned = now;
            self.by_client.retain(|_, b| {
                b.refill(now, rate);
                b.tokens < rate
            });
        }
        let key = if self.by_client.contains_key(&client) || !full(self) {
            client
        } else {
            ClientKey::Unknown
        };
        let bucket = self.by_client.entry(key).or_insert(Bucket {
            tokens: rate,
            updated: now,
        });
        bucket.refill(now, rate);
        bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(last: u8) -> ClientKey {
        ClientKey::V4([198, 51, 100, last])
    }

    #[test]
    fn an_address_is_throttled_after_its_burst_and_others_are_not() {
        let failures = AuthFailures::new(5);
        for _ in 0..5 {
            failures.take(client(1)).unwrap();
        }
        let throttled = failures.take(client(1)).unwrap_err();
        assert!(
            (1..=12).contains(&throttled.retry_after.as_secs()),
            "{throttled:?}"
        );
        failures.take(client(2)).expect("another address is not");
        // A check that succeeded gives its failure back.
        failures.refund(client(1));
        failures.take(client(1)).expect("refunded");
    }

    #[test]
    fn the_bucket_refills_at_the_configured_rate() {
        let failures = AuthFailures::new(600); // 10 a second
        while failures.take(client(1)).is_ok() {}
        std::thread::sleep(Duration::from_millis(200));
        failures.take(client(1)).expect("refilled after 200 ms");
    }

    #[test]
    fn memory_is_bounded_by_sharing_one_bucket_past_the_limit() {
        let failures = AuthFailures::new(1);
        for i in 0..MAX_ADDRESSES as u32 + 10 {
            let _ = failures.take(ClientKey::V4(i.to_be_bytes()));
        }
        assert_eq!(failures.buckets.lock().by_client.len(), MAX_ADDRESSES + 1);
        assert!(
            failures.take(ClientKey::Unknown).is_err(),
            "the overflow shares one bucket"
        );
    }
}

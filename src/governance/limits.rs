//! Per-user request limits: requests per minute ([`RateLimiter`], a GCRA from `governor`) and
//! requests in flight at once ([`ConcurrencyLimiter`]).
//!
//! Both are per process (per replica), keyed by user id, and turned off by a limit of 0.
//!
//! Not here: spend caps (`governance::ledger`), or the 429 response and its `Retry-After`
//! header (`gateway`).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::Quota;
use parking_lot::Mutex;
use uuid::Uuid;

type Keyed<C> = governor::RateLimiter<
    Uuid,
    DefaultKeyedStateStore<Uuid>,
    C,
    NoOpMiddleware<<C as Clock>::Instant>,
>;

/// Requests per minute per user. The quota is `requests_per_minute` as a burst, refilled evenly
/// over the minute, so a user who has been idle may send a whole minute's worth at once.
///
/// Generic over the clock only so tests can drive time; the gateway uses the default clock.
#[derive(Debug)]
pub struct RateLimiter<C: Clock = DefaultClock> {
    // `None` when the limit is off.
    limiter: Option<Keyed<C>>,
}

impl RateLimiter {
    /// A limiter allowing `requests_per_minute` per user; 0 turns it off.
    pub fn new(requests_per_minute: u32) -> RateLimiter {
        RateLimiter::with_clock(requests_per_minute, DefaultClock::default())
    }
}

impl<C: Clock> RateLimiter<C> {
    fn with_clock(requests_per_minute: u32, clock: C) -> RateLimiter<C> {
        let limiter = NonZeroU32::new(requests_per_minute).map(|per_minute| {
            governor::RateLimiter::new(
                Quota::per_minute(per_minute),
                DefaultKeyedStateStore::default(),
                clock,
            )
        });
        RateLimiter { limiter }
    }

    /// Counts one request by `user`, or refuses it with how long until one would be allowed:
    /// whole seconds, rounded up and at least one, because `Retry-After` is in whole seconds and
    /// a client told "0" would retry at once and be refused again.
    pub fn check(&self, user: Uuid) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&user).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            let whole_seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Duration::from_secs(whole_seconds.max(1))
        })
    }

    /// Forgets users whose limiter state is back to fresh (they could burst a full quota again),
    /// and releases the memory. Without this the map keeps one entry per user ever seen; call it
    /// periodically (every few minutes is plenty).
    pub fn retain_recent(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// User → requests in flight, shared by the limiter and its permits. Only users with requests in
/// flight have an entry, so the map stays as small as the load.
type InFlight = Arc<Mutex<HashMap<Uuid, u32>>>;

/// In-flight requests per user. [`ConcurrencyLimiter::acquire`] hands out a
/// [`ConcurrencyPermit`] that gives the slot back when dropped, so a request that ends any way at
/// all (completion, error, panic, cancelled future) releases it.
#[derive(Debug)]
pub struct ConcurrencyLimiter {
    // `None` when the limit is off.
    max_concurrent: Option<NonZeroU32>,
    in_flight: InFlight,
}

/// Refusal from [`ConcurrencyLimiter::acquire`]: the user already has `limit` requests running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{limit} requests already in flight for this user")]
pub struct TooManyInFlight {
    pub limit: u32,
}

/// One in-flight slot; dropping it frees the slot.
#[must_use = "the slot is released as soon as the permit is dropped"]
#[derive(Debug)]
pub struct ConcurrencyPermit {
    // `None` when the limiter is off: nothing to give back.
    held: Option<(InFlight, Uuid)>,
}

impl ConcurrencyLimiter {
    /// A limiter allowing `max_concurrent` requests in flight per user; 0 turns it off.
    pub fn new(max_concurrent: u32) -> ConcurrencyLimiter {
        ConcurrencyLimiter {
            max_concurrent: NonZeroU32::new(max_concurrent),
            in_flight: Arc::default(),
        }
    }

    /// Takes one of `user`'s slots, or refuses when all are in use.
    pub fn acquire(&self, user: Uuid) -> Result<ConcurrencyPermit, TooManyInFlight> {
        let Some(limit) = self.max_concurrent else {
            return Ok(ConcurrencyPermit { held: None });
        };
        let mut map = self.in_flight.lock();
        let count = map.entry(user).or_insert(0);
        if *count >= limit.get() {
            return Err(TooManyInFlight { limit: limit.get() });
        }
        *count += 1;
        drop(map);
        Ok(ConcurrencyPermit {
            held: Some((Arc::clone(&self.in_flight), user)),
        })
    }
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        let Some((in_flight, user)) = self.held.take() else {
            return;
        };
        let mut map = in_flight.lock();
        if let Entry::Occupied(mut slot) = map.entry(user) {
            if *slot.get() <= 1 {
                slot.remove();
            } else {
                *slot.get_mut() -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn rate_limit_refuses_past_the_quota_with_retry_after() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(3, clock.clone());
        let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
        for _ in 0..3 {
            assert_eq!(limiter.check(user), Ok(()));
        }
        // One request is refilled every 20 s.
        assert_eq!(limiter.check(user), Err(Duration::from_secs(20)));
        // Other users have their own quota.
        assert_eq!(limiter.check(other), Ok(()));
        clock.advance(Duration::from_millis(19_500));
        // 0.5 s to go rounds up to a whole second.
        assert_eq!(limiter.check(user), Err(Duration::from_secs(1)));
        clock.advance(Duration::from_millis(500));
        assert_eq!(limiter.check(user), Ok(()));
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let clock = FakeRelativeClock::default();
        // 60 000 a minute refills one request every millisecond.
        let limiter = RateLimiter::with_clock(60_000, clock.clone());
        let user = Uuid::new_v4();
        for _ in 0..60_000 {
            assert_eq!(limiter.check(user), Ok(()));
        }
        assert_eq!(limiter.check(user), Err(Duration::from_secs(1)));
    }

    #[test]
    fn zero_requests_per_minute_is_off() {
        let limiter = RateLimiter::new(0);
        let user = Uuid::new_v4();
        for _ in 0..10_000 {
            assert_eq!(limiter.check(user), Ok(()));
        }
        limiter.retain_recent();
    }

    #[test]
    fn default_clock_limiter_refuses_too() {
        let limiter = RateLimiter::new(1);
        let user = Uuid::new_v4();
        assert_eq!(limiter.check(user), Ok(()));
        let retry_after = limiter.check(user).unwrap_err();
        assert!(retry_after >= Duration::from_secs(59) && retry_after <= Duration::from_secs(60));
    }

    #[test]
    fn retain_recent_forgets_users_back_to_a_full_quota() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(60, clock.clone());
        let (idle, busy) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(limiter.check(idle), Ok(()));
        clock.advance(Duration::from_secs(61));
        for _ in 0..60 {
            assert_eq!(limiter.check(busy), Ok(()));
        }
        let len = |l: &RateLimiter<FakeRelativeClock>| l.limiter.as_ref().map_or(0, |k| k.len());
        assert_eq!(len(&limiter), 2);
        limiter.retain_recent();
        assert_eq!(len(&limiter), 1);
        // The busy user's state survived: still limited.
        assert!(limiter.check(busy).is_err());
    }

    #[test]
    fn concurrency_permits_are_released_on_drop() {
        let limiter = ConcurrencyLimiter::new(2);
        let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
        let first = limiter.acquire(user).unwrap();
        let second = limiter.acquire(user).unwrap();
        assert_eq!(
            limiter.acquire(user).unwrap_err(),
            TooManyInFlight { limit: 2 }
        );
        let other_permit = limiter.acquire(other).unwrap();
        drop(first);
        let third = limiter.acquire(user).unwrap();
        assert!(limiter.acquire(user).is_err());
        drop(second);
        drop(third);
        drop(other_permit);
        assert!(limiter.in_flight.lock().is_empty(), "zero entries removed");
    }

    #[test]
    fn concurrency_permit_outlives_a_panic() {
        let limiter = Arc::new(ConcurrencyLimiter::new(1));
        let user = Uuid::new_v4();
        let shared = Arc::clone(&limiter);
        let result = std::thread::spawn(move || {
            let _permit = shared.acquire(user).unwrap();
            panic!("request handler failed");
        })
        .join();
        assert!(result.is_err());
        assert!(limiter.acquire(user).is_ok());
    }

    #[test]
    fn zero_max_concurrent_is_off() {
        let limiter = ConcurrencyLimiter::new(0);
        let user = Uuid::new_v4();
        let permits: Vec<_> = (0..1000).map(|_| limiter.acquire(user).unwrap()).collect();
        assert!(limiter.in_flight.lock().is_empty());
        drop(permits);
    }
}

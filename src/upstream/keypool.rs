//! Central key pools: several central keys for one provider, and which of them may be used now.
//!
//! Keys are tried in their configured order (`api_key_env`, then `api_key_envs`), so the first
//! key carries the traffic and the others are spares. An upstream 429 makes a key cool down (for
//! the `Retry-After` the upstream gave, else the provider's `key_cooldown_seconds`); a 401/403
//! disables it until the configuration is reloaded, because a rejected key will not heal by
//! itself. The gateway retries the buffered request on the next usable key before anything
//! reaches the client.
//!
//! Not here: personal keys (BYOK and stored keys are never pooled), the retry itself (gateway),
//! or metric names (`telemetry::metric`). Secrets never leave this module except to build the
//! upstream request; metrics name a key by its index in the configured list.

use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::store::mask_secret;
use crate::telemetry::metric;

/// Longest `Retry-After` honoured: a misbehaving upstream must not park a key for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    Usable,
    Cooling { until: Instant },
    Disabled,
}

struct PoolEntry {
    secret: String,
    hint: String,
    /// The key's position in the configured list (the metric label; never the secret).
    label: String,
    state: KeyState,
}

/// Why no key can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoKey {
    /// The pool is empty: no central key is configured (or its variables are unset).
    Unconfigured,
    /// Every key the caller may still use is cooling; the first is back after this long.
    Cooling { retry_after: Duration },
    /// Every key is disabled (the upstream rejected them) or was already tried.
    Exhausted,
}

/// The central keys of one provider and their states.
pub struct KeyPool {
    provider: String,
    cooldown: Duration,
    keys: Mutex<Vec<PoolEntry>>,
}

impl std::fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPool")
            .field("provider", &self.provider)
            .field("keys", &self.keys.lock().len())
            .finish()
    }
}

impl KeyPool {
    /// `keys` are `(label, secret)` in the order they are tried.
    pub fn new(provider: &str, keys: Vec<(String, String)>, cooldown: Duration) -> KeyPool {
        let pool = KeyPool {
            provider: provider.to_string(),
            cooldown,
            keys: Mutex::new(
                keys.into_iter()
                    .map(|(label, secret)| PoolEntry {
                        hint: mask_secret(&secret),
                        secret,
                        label,
                        state: KeyState::Usable,
                    })
                    .collect(),
            ),
        };
        // Providers without central keys (Copilot, BYOK-only) have no pool to report on.
        if !pool.is_empty() {
            pool.publish_usable(&pool.keys.lock());
        }
        pool
    }

    pub fn is_empty(&self) -> bool {
        self.keys.lock().is_empty()
    }

    /// How many keys the pool holds, whatever their state.
    pub fn len(&self) -> usize {
        self.keys.lock().len()
    }

    /// The first usable key not in `tried`.
    pub fn pick(&self, tried: &[usize]) -> Result<PooledKey, NoKey> {
        let now = Instant::now();
        let mut keys = self.keys.lock();
        if keys.is_empty() {
            return Err(NoKey::Unconfigured);
        }
        let mut soonest: Option<Duration> = None;
        let mut recovered = false;
        let mut chosen = None;
        for (i, key) in keys.iter_mut().enumerate() {
            if let KeyState::Cooling { until } = key.state {
                if until <= now {
                    key.state = KeyState::Usable;
                    recovered = true;
                    self.count_change(&key.label, "usable");
                }
            }
            match key.state {
                KeyState::Usable if chosen.is_none() && !tried.contains(&i) => chosen = Some(i),
                // Tried keys count here too: they are the ones that just started cooling.
                KeyState::Cooling { until } => {
                    let left = until - now;
                    soonest = Some(soonest.map_or(left, |s| s.min(left)));
                }
                _ => {}
            }
        }
        if recovered {
            self.publish_usable(&keys);
        }
        match (chosen, soonest) {
            (Some(i), _) => Ok(PooledKey {
                slot: i,
                secret: keys[i].secret.clone(),
                hint: keys[i].hint.clone(),
            }),
            (None, Some(retry_after)) => Err(NoKey::Cooling { retry_after }),
            (None, None) => Err(NoKey::Exhausted),
        }
    }

    /// The upstream answered 429 for key `index`: it rests for `retry_after` (if the upstream
    /// said) or the configured cool-down.
    pub fn cool_down(&self, index: usize, retry_after: Option<Duration>) {
        let rest = retry_after
            .unwrap_or(self.cooldown)
            .min(MAX_RETRY_AFTER)
            .max(Duration::from_secs(1));
        let until = Instant::now() + rest;
        let mut keys = self.keys.lock();
        let Some(key) = keys.get_mut(index) else {
            return;
        };
        match key.state {
            KeyState::Disabled => return,
            // Concurrent 429s on one key: keep the later end.
            KeyState::Cooling { until: old } if old >= until => return,
            KeyState::Cooling { .. } => {}
            KeyState::Usable => self.count_change(&key.label, "cooling"),
        }
        key.state = KeyState::Cooling { until };
        tracing::warn!(provider = %self.provider, key = %key.label, hint = %key.hint, cooldown_ms = rest.as_millis() as u64, "central key rate limited by the upstream; cooling down");
        self.publish_usable(&keys);
    }

    /// The upstream rejected key `index` (401/403): it stays out until the config is reloaded.
    pub fn disable(&self, index: usize, status: u16) {
        let mut keys = self.keys.lock();
        let Some(key) = keys.get_mut(index) else {
            return;
        };
        if key.state == KeyState::Disabled {
            return;
        }
        key.state = KeyState::Disabled;
        self.count_change(&key.label, "disabled");
        tracing::error!(provider = %self.provider, key = %key.label, hint = %key.hint, status, "central key rejected by the upstream; disabled until the configuration is reloaded");
        self.publish_usable(&keys);
    }

    fn count_change(&self, label: &str, state: &'static str) {
        metrics::counter!(
            metric::PROVIDER_KEY_STATE_CHANGES_TOTAL,
            "provider" => self.provider.clone(),
            "key" => label.to_string(),
            "state" => state
        )
        .increment(1);
    }

    fn publish_usable(&self, keys: &[PoolEntry]) {
        let now = Instant::now();
        let usable = keys
            .iter()
            .filter(|k| match k.state {
                KeyState::Usable => true,
                KeyState::Cooling { until } => until <= now,
                KeyState::Disabled => false,
            })
            .count();
        metrics::gauge!(metric::PROVIDER_KEYS_USABLE, "provider" => self.provider.clone())
            .set(usable as f64);
    }
}

/// A key taken from a central pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PooledKey {
    /// Its index in the configured list (metrics and failover name a key by it).
    pub slot: usize,
    pub secret: String,
    /// Masked for the record (`sk-…abcd`).
    pub hint: String,
}

/// What to do after the upstream answered a request made with a pooled key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failover {
    /// Not a key problem: the answer goes to the client.
    Keep,
    /// The key was taken out; retry with this one.
    Retry(PooledKey),
    /// The key was taken out and every other one is cooling: refuse with 429.
    AllCooling(Duration),
    /// The key was taken out and none is left: the client gets the upstream's answer.
    Exhausted,
}

impl KeyPool {
    /// Judges the upstream's `status` (and `Retry-After`) for key `index`; `tried` collects the
    /// keys this request has used so that each is tried at most once.
    pub fn after_answer(
        &self,
        index: usize,
        status: u16,
        retry_after: Option<&str>,
        tried: &mut Vec<usize>,
    ) -> Failover {
        match status {
            429 => {
                let wait = retry_after.and_then(|v| parse_retry_after(v, SystemTime::now()));
                self.cool_down(index, wait);
            }
            401 | 403 => self.disable(index, status),
            _ => return Failover::Keep,
        }
        tried.push(index);
        match self.pick(tried) {
            Ok(next) => {
                metrics::counter!(metric::PROVIDER_KEY_FAILOVERS_TOTAL, "provider" => self.provider.clone())
                    .increment(1);
                Failover::Retry(next)
            }
            Err(NoKey::Cooling { retry_after }) => Failover::AllCooling(retry_after),
            Err(_) => Failover::Exhausted,
        }
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), relative to `now`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::from(at.with_timezone(&chrono::Utc));
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whole seconds for a `Retry-After` header: rounded up, at least one.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> KeyPool {
        KeyPool::new(
            "p",
            (0..n)
                .map(|i| (i.to_string(), format!("sk-test-key-number-{i}")))
                .collect(),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn keys_are_tried_in_order_and_skip_cooling_and_disabled_ones() {
        let p = pool(3);
        assert_eq!(p.pick(&[]).unwrap().slot, 0);
        assert_eq!(p.pick(&[0]).unwrap().slot, 1);
        p.cool_down(0, None);
        assert_eq!(p.pick(&[]).unwrap().slot, 1);
        p.disable(1, 401);
        let PooledKey { slot, secret, hint } = p.pick(&[]).unwrap();
        assert_eq!((slot, secret.as_str()), (2, "sk-test-key-number-2"));
        assert!(!hint.contains("number"), "{hint}");
        match p.pick(&[2]) {
            Err(NoKey::Cooling { retry_after }) => {
                assert!(retry_after > Duration::from_secs(59), "{retry_after:?}")
            }
            other => panic!("{other:?}"),
        }
        p.cool_down(2, Some(Duration::from_secs(5)));
        match p.pick(&[2]) {
            Err(NoKey::Cooling { retry_after }) => {
                assert!(
                    retry_after <= Duration::from_secs(5),
                    "tried keys count: {retry_after:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn all_cooling_reports_the_shortest_wait() {
        let p = pool(2);
        p.cool_down(0, Some(Duration::from_secs(30)));
        p.cool_down(1, Some(Duration::from_secs(5)));
        match p.pick(&[]) {
            Err(NoKey::Cooling { retry_after }) => {
                assert!(retry_after <= Duration::from_secs(5));
                assert!(retry_after > Duration::from_secs(4));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cooled_key_comes_back_and_a_disabled_one_does_not() {
        let p = pool(2);
        p.cool_down(0, Some(Duration::ZERO)); // floored to one second
        p.disable(1, 403);
        assert!(matches!(p.pick(&[]), Err(NoKey::Cooling { .. })));
        {
            let mut keys = p.keys.lock();
            keys[0].state = KeyState::Cooling {
                until: Instant::now() - Duration::from_millis(1),
            };
        }
        assert_eq!(p.pick(&[]).unwrap().slot, 0);
        assert_eq!(p.pick(&[0]), Err(NoKey::Exhausted));
        assert_eq!(pool(0).pick(&[]), Err(NoKey::Unconfigured));
    }

    #[test]
    fn answers_decide_the_failover() {
        let p = pool(3);
        let mut tried = Vec::new();
        assert_eq!(p.after_answer(0, 200, None, &mut tried), Failover::Keep);
        assert_eq!(p.after_answer(0, 500, None, &mut tried), Failover::Keep);
        assert!(tried.is_empty());
        assert!(matches!(
            p.after_answer(0, 429, Some("2"), &mut tried),
            Failover::Retry(PooledKey { slot: 1, .. })
        ));
        assert!(matches!(
            p.after_answer(1, 403, None, &mut tried),
            Failover::Retry(PooledKey { slot: 2, .. })
        ));
        match p.after_answer(2, 429, Some("9"), &mut tried) {
            Failover::AllCooling(wait) => assert!(wait <= Duration::from_secs(2), "{wait:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(tried, [0, 1, 2]);
        let p = pool(1);
        assert_eq!(
            p.after_answer(0, 401, None, &mut Vec::new()),
            Failover::Exhausted
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21 07:28:00
        assert_eq!(
            parse_retry_after(" 17 ", now),
            Some(Duration::from_secs(17))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}

//! Authentication: which Tollgate key a request carries, and whose it is.
//!
//! Keys are looked up by their SHA-256 through an in-memory cache with a short TTL (at most 5 s,
//! the contract's revocation bound), so the hot path touches the database only on the first
//! sight of a key and once per TTL after that. A bad key does not become a query either:
//! - one that cannot be a Tollgate key (not `tg_` + 48 lowercase hex characters) is refused
//!   without a lookup;
//! - an unknown one is cached negatively, by its hash, in a bounded map of its own (a flood of
//!   them never pushes valid keys out of the cache);
//! - every failed check counts against the client's address ([`failures`]): once an address
//!   has failed `auth.failed_attempts_per_minute` times, a key it presents that is not already
//!   known valid is refused with 429 before any lookup, so a flood of distinct random keys
//!   costs no query per key.
//!
//! A presented key is never compared with a stored secret: only its digest is looked up (the
//! database holds digests alone), and the cache compares digests in constant time, so response
//! timing tells a prober nothing about how close a guess came.
//!
//! Not here: what a principal may do (governance, API roles).

pub mod failures;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use parking_lot::RwLock;
use subtle::ConstantTimeEq;

use crate::front_door::ClientKey;
use crate::store::{hash_key, Principal, Store, StoreError, KEY_PREFIX};
use crate::telemetry::metric;
use failures::{AuthFailures, Throttled};

/// Why a key could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    /// The database could not answer for a key not seen before.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The client's address failed authentication too often; nothing was looked up.
    #[error(transparent)]
    Throttled(#[from] Throttled),
}

/// Whether `secret` has the shape of a Tollgate key (`tg_` + 48 lowercase hex characters, as
/// `Store::create_api_key` makes them). Anything else cannot be one: no lookup is needed.
pub fn well_formed(secret: &str) -> bool {
    secret.len() == KEY_PREFIX.len() + 48
        && secret.starts_with(KEY_PREFIX)
        && secret[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where in the request the Tollgate key was found; decides what the other auth headers mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `X-Tollgate-Key` / `X-Coder-AI-Governance-Token`: `Authorization`/`x-api-key` then carry
    /// the user's own provider key.
    TollgateHeader,
    Authorization,
    XApiKey,
    /// `Proxy-Authorization: Basic` on the proxy front door.
    ProxyCredentials,
}

/// The credentials a request's headers carry, each header read once (trimmed): the Tollgate
/// key's own header, the `Authorization: Bearer` token and `x-api-key`. Which of them is the
/// Tollgate key ([`PresentedCredentials::tollgate_key`]) decides what the others mean: with the
/// key in its own header, they carry the user's own provider key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresentedCredentials {
    /// `X-Tollgate-Key` (alias `X-Coder-AI-Governance-Token`), possibly empty.
    pub tollgate_header: Option<String>,
    /// The token of `Authorization: Bearer …`, possibly empty.
    pub bearer: Option<String>,
    /// `x-api-key`, possibly empty.
    pub x_api_key: Option<String>,
}

impl PresentedCredentials {
    pub fn read(headers: &HeaderMap) -> PresentedCredentials {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        PresentedCredentials {
            tollgate_header: text("x-tollgate-key")
                .or_else(|| text("x-coder-ai-governance-token"))
                .map(str::to_string),
            bearer: text("authorization").and_then(|auth| {
                auth.strip_prefix("Bearer ")
                    .or_else(|| auth.strip_prefix("bearer "))
                    .map(|t| t.trim().to_string())
            }),
            x_api_key: text("x-api-key").map(str::to_string),
        }
    }

    /// The Tollgate key in the contract's order: `X-Tollgate-Key` (alias
    /// `X-Coder-AI-Governance-Token`), then `Authorization: Bearer`, then `x-api-key`.
    pub fn tollgate_key(&self) -> Option<(&str, KeySource)> {
        fn present(v: &Option<String>) -> Option<&str> {
            v.as_deref().filter(|k| !k.is_empty())
        }
        if let Some(k) = present(&self.tollgate_header) {
            return Some((k, KeySource::TollgateHeader));
        }
        if let Some(t) = present(&self.bearer) {
            return Some((t, KeySource::Authorization));
        }
        present(&self.x_api_key).map(|k| (k, KeySource::XApiKey))
    }
}

/// Finds the Tollgate key in the contract's order (see [`PresentedCredentials::tollgate_key`]).
pub fn presented_key(headers: &HeaderMap) -> Option<(String, KeySource)> {
    PresentedCredentials::read(headers)
        .tollgate_key()
        .map(|(k, source)| (k.to_string(), source))
}

struct CacheEntry {
    principal: Arc<Principal>,
    /// When the entry was last fresh (looked up, or served stale): it is trusted for a TTL.
    fetched: Instant,
    /// When the database last confirmed it.
    validated: Instant,
}

/// Bound on cached valid keys; past it they are cleared rather than grown.
const MAX_ENTRIES: usize = 100_000;
/// Bound on cached unknown keys, cleared on their own when full (a flood of random keys must
/// not eat memory, nor push valid keys out).
const MAX_NEGATIVE_ENTRIES: usize = 16_384;

/// How long a valid key's last lookup may serve while the database cannot be asked.
const STALE_LIMIT: Duration = Duration::from_secs(3600);
/// The SHA-256 of a Tollgate key, as the cache holds it. Equality runs in constant time: a
/// `HashMap` hit ends in an `==` on the digest, and an early-exit compare would let response
/// timing reveal how many leading bytes a guessed key's digest shares with a real one.
#[derive(Clone, Copy)]
struct KeyDigest([u8; 32]);

// Written out because `PartialEq` is: equal digests have equal bytes, so they hash alike.
impl std::hash::Hash for KeyDigest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for KeyDigest {
    fn eq(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for KeyDigest {}

/// Key hash → principal, refreshed from the store after `ttl`; unknown key hashes; and the
/// failed checks per client address.
pub struct KeyCache {
    entries: RwLock<HashMap<KeyDigest, CacheEntry>>,
    /// Unknown keys, with when they were found unknown.
    negative: RwLock<HashMap<KeyDigest, Instant>>,
    failures: AuthFailures,
    /// Lookups running now, by digest: requests with the same uncached key wait for the one
    /// lookup (and so spend one failure of their address, not one each: a burst of a new valid
    /// key must not look like a flood of bad ones).
    running: parking_lot::Mutex<HashMap<KeyDigest, Arc<tokio::sync::Notify>>>,
    ttl: Duration,
}

/// The longest a request waits for another's lookup of the same key before making its own.
const RUNNING_LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// Whose turn it is to look a key up.
enum Turn<'a> {
    /// This request looks it up; the others wait until the guard is dropped.
    Lead(RunningLookup<'a>),
    /// Another request looked it up meanwhile (its answer is in the cache, if it got one).
    Waited,
}

/// A running lookup; dropping it (the answer cached, or the request gone) wakes the waiters.
struct RunningLookup<'a> {
    cache: &'a KeyCache,
    digest: KeyDigest,
}

impl Drop for RunningLookup<'_> {
    fn drop(&mut self) {
        if let Some(done) = self.cache.running.lock().remove(&self.digest) {
            done.notify_waiters();
        }
    }
}

/// `auth.failed_attempts_per_minute`'s default, until [`KeyCache::set_failed_attempts_per_minute`].
const DEFAULT_FAILED_ATTEMPTS_PER_MINUTE: u32 = 60;

impl KeyCache {
    pub fn new(ttl: Duration) -> KeyCache {
        KeyCache {
            entries: RwLock::new(HashMap::new()),
            negative: RwLock::new(HashMap::new()),
            failures: AuthFailures::new(DEFAULT_FAILED_ATTEMPTS_PER_MINUTE),
            running: parking_lot::Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Leads the lookup of `digest`, or waits for the one already running.
    async fn take_turn(&self, digest: KeyDigest) -> Turn<'_> {
        let running = {
            let mut running = self.running.lock();
            match running.get(&digest) {
                Some(lookup) => lookup.clone(),
                None => {
                    running.insert(digest, Arc::new(tokio::sync::Notify::new()));
                    return Turn::Lead(RunningLookup {
                        cache: self,
                        digest,
                    });
                }
            }
        };
        // Registered before checking that the lookup still runs, so its end cannot be missed.
        let done = running.notified();
        let still_running = self
            .running
            .lock()
            .get(&digest)
            .is_some_and(|lookup| Arc::ptr_eq(lookup, &running));
        if still_running {
            let _ = tokio::time::timeout(RUNNING_LOOKUP_WAIT, done).await;
        }
        Turn::Waited
    }

    /// Applies `auth.failed_attempts_per_minute` (at start).
    pub fn set_failed_attempts_per_minute(&self, per_minute: u32) {
        self.failures.set_per_minute(per_minute);
    }

    /// The failed-authentication counts per address, for checks made elsewhere (dashboard
    /// sessions).
    pub fn failures(&self) -> &AuthFailures {
        &self.failures
    }

    /// A cached answer still within its TTL: `Some(None)` means "known bad key".
    pub fn cached(&self, hash: &[u8; 32]) -> Option<Option<Arc<Principal>>> {
        let digest = KeyDigest(*hash);
        if let Some(e) = self.entries.read().get(&digest) {
            if e.fetched.elapsed() < self.ttl {
                return Some(Some(e.principal.clone()));
            }
        }
        let found = self.negative.read().get(&digest).copied()?;
        (found.elapsed() < self.ttl).then_some(None)
    }

    /// Whether the key was valid when last looked up, however long ago: such a key is looked up
    /// again even from a throttled address (an attacker cannot present one without having it).
    fn known_valid(&self, hash: &[u8; 32]) -> bool {
        self.entries.read().contains_key(&KeyDigest(*hash))
    }

    /// While the database is down, a key that was valid when last checked (within
    /// [`STALE_LIMIT`]) keeps working: nobody can revoke it meanwhile, since revocation is a
    /// database write, and refusing every caller would turn an outage of the store into an
    /// outage of the gateway. Keys never seen before are still refused.
    fn stale(&self, hash: &[u8; 32]) -> Option<Arc<Principal>> {
        let entries = self.entries.read();
        let e = entries.get(&KeyDigest(*hash))?;
        (e.validated.elapsed() < STALE_LIMIT).then(|| e.principal.clone())
    }

    /// Serves a stale entry for another TTL before the database is asked again.
    fn touch(&self, hash: &[u8; 32]) {
        if let Some(e) = self.entries.write().get_mut(&KeyDigest(*hash)) {
            e.fetched = Instant::now();
        }
    }

    /// Caches a lookup's answer: the key's principal, or `None` for an unknown key.
    pub fn insert(&self, hash: [u8; 32], principal: Option<Arc<Principal>>) {
        let digest = KeyDigest(hash);
        match principal {
            Some(principal) => {
                self.negative.write().remove(&digest);
                let mut entries = self.entries.write();
                if entries.len() >= MAX_ENTRIES {
                    entries.clear();
                }
                entries.insert(
                    digest,
                    CacheEntry {
                        principal,
                        fetched: Instant::now(),
                        validated: Instant::now(),
                    },
                );
            }
            None => {
                self.entries.write().remove(&digest);
                let mut negative = self.negative.write();
                if negative.len() >= MAX_NEGATIVE_ENTRIES {
                    negative.clear();
                }
                negative.insert(digest, Instant::now());
            }
        }
    }

    /// Forgets every key (after a local revocation or user change); failure counts stay.
    pub fn clear(&self) {
        self.entries.write().clear();
        self.negative.write().clear();
    }

    /// Resolves a key presented from `client`: from the cache, else from the store (run on
    /// `db`, the runtime that owns the pool), unless it cannot be a key or `client` is
    /// throttled (see the module docs).
    pub async fn resolve(
        &self,
        secret: &str,
        client: ClientKey,
        store: &Store,
        db: &tokio::runtime::Handle,
    ) -> Result<Option<Arc<Principal>>, KeyCheckError> {
        let hash = hash_key(secret);
        let cached = self.cached(&hash);
        if let Some(Some(principal)) = cached {
            metrics::counter!(metric::KEY_CACHE_LOOKUPS_TOTAL, "result" => "hit").increment(1);
            return Ok(Some(principal));
        }
        // A key not known valid may fail: that failure is spent before anything else, once per
        // lookup (requests with the same key wait for the one running).
        let spent = !self.known_valid(&hash);
        let mut _lead = None;
        let mut cached = cached;
        if spent && cached.is_none() && well_formed(secret) {
            match self.take_turn(KeyDigest(hash)).await {
                Turn::Lead(lookup) => _lead = Some(lookup),
                Turn::Waited => {
                    cached = self.cached(&hash);
                    if let Some(Some(principal)) = cached {
                        metrics::counter!(metric::KEY_CACHE_LOOKUPS_TOTAL, "result" => "hit")
                            .increment(1);
                        return Ok(Some(principal));
                    }
                }
            }
        }
        if spent {
            if let Err(throttled) = self.failures.take(client) {
                metrics::counter!(metric::KEY_CACHE_LOOKUPS_TOTAL, "result" => "throttled")
                    .increment(1);
                return Err(throttled.into());
            }
            let malformed = !well_formed(secret);
            if cached.is_some() || malformed {
                let result = if malformed { "malformed" } else { "hit" };
                metrics::counter!(metric::KEY_CACHE_LOOKUPS_TOTAL, "result" => result).increment(1);
                return Ok(None);
            }
        }
        let found = self.look_up(hash, store, db).await;
        if spent && !matches!(found, Ok(None)) {
            self.failures.refund(client);
        }
        found
    }

    /// The store's answer for a key the cache could not answer (see [`KeyCache::resolve`]).
    async fn look_up(
        &self,
        hash: [u8; 32],
        store: &Store,
        db: &tokio::runtime::Handle,
    ) -> Result<Option<Arc<Principal>>, KeyCheckError> {
        metrics::counter!(metric::KEY_CACHE_LOOKUPS_TOTAL, "result" => "miss").increment(1);
        let lookup = {
            let store = store.clone();
            async move {
                db.spawn(async move { store.principal_for_key(&hash).await })
                    .await
                    .map_err(|e| StoreError::Invalid(format!("key lookup task failed: {e}")))?
            }
        };
        let found = match self.stale(&hash) {
            // A key that was valid: ask, but do not wait long for a database that is down.
            Some(valid) => match store.on_hot_path(lookup).await {
                Some(found) => found,
                None => {
                    metrics::counter!(metric::KEY_CACHE_LOOKUPS_TOTAL, "result" => "stale")
                        .increment(1);
                    self.touch(&hash);
                    return Ok(Some(valid));
                }
            },
            None if store.recently_failed() => {
                return Err(StoreError::Unavailable("database unavailable".into()).into())
            }
            None => lookup.await.inspect_err(|_| store.note_failure())?,
        };
        let principal = found.map(Arc::new);
        self.insert(hash, principal.clone());
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn key_sources_in_contract_order() {
        let h = headers(&[
            ("x-tollgate-key", "tg_a"),
            ("authorization", "Bearer sk-user"),
            ("x-api-key", "x"),
        ]);
        assert_eq!(
            presented_key(&h),
            Some(("tg_a".into(), KeySource::TollgateHeader))
        );
        let h = headers(&[("x-coder-ai-governance-token", "tg_b")]);
        assert_eq!(
            presented_key(&h),
            Some(("tg_b".into(), KeySource::TollgateHeader))
        );
        let h = headers(&[("authorization", "Bearer tg_c"), ("x-api-key", "tg_d")]);
        assert_eq!(
            presented_key(&h),
            Some(("tg_c".into(), KeySource::Authorization))
        );
        let h = headers(&[("x-api-key", "tg_d")]);
        assert_eq!(presented_key(&h), Some(("tg_d".into(), KeySource::XApiKey)));
        let h = headers(&[("authorization", "Basic abc")]);
        assert_eq!(presented_key(&h), None);
        assert_eq!(presented_key(&HeaderMap::new()), None);
    }

    #[test]
    fn digests_compare_equal_only_when_every_byte_matches() {
        let a = hash_key("tg_a");
        assert!(KeyDigest(a) == KeyDigest(a));
        for i in [0, 15, 31] {
            let mut b = a;
            b[i] ^= 0x01;
            assert!(KeyDigest(a) != KeyDigest(b), "byte {i} differs");
        }
        let cache = KeyCache::new(Duration::from_secs(5));
        cache.insert(a, None);
        assert_eq!(cache.cached(&a), Some(None));
        assert_eq!(cache.cached(&hash_key("tg_b")), None);
    }

    #[tokio::test]
    async fn bad_keys_cost_a_lookup_only_until_their_address_is_throttled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}/t.db", dir.path().display()), 2)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let user = store.create_user("ada", false, &[]).await.unwrap();
        let good = store.create_api_key(user.id, "k").await.unwrap().secret;
        let db = tokio::runtime::Handle::current();
        let cache = KeyCache::new(Duration::from_millis(1));
        cache.set_failed_attempts_per_minute(3);
        let (mallory, alice) = (ClientKey::V4([192, 0, 2, 1]), ClientKey::V4([192, 0, 2, 2]));
        let resolve = |key: String, client| {
            let (cache, store, db) = (&cache, &store, &db);
            async move { cache.resolve(&key, client, store, db).await }
        };
        assert!(resolve(good.clone(), mallory).await.unwrap().is_some());
        // A key that cannot be one fails without a lookup, and counts.
        assert!(resolve("tg_short".into(), mallory).await.unwrap().is_none());
        assert!(!well_formed("tg_short") && well_formed(&good));
        let random = || format!("tg_{}", hex::encode(rand::random::<[u8; 24]>()));
        assert!(resolve(random(), mallory).await.unwrap().is_none());
        assert!(resolve(random(), mallory).await.unwrap().is_none());
        // Three failures: the next unknown key is not looked up.
        assert!(matches!(
            resolve(random(), mallory).await,
            Err(KeyCheckError::Throttled(_))
        ));
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            resolve(good.clone(), mallory).await.unwrap().is_some(),
            "a key known valid is still looked up (its cache entry expired)"
        );
        assert!(
            resolve(random(), alice).await.unwrap().is_none(),
            "alice is not throttled"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_one_new_valid_key_spends_one_lookup_not_the_addresss_failures() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}/t.db", dir.path().display()), 2)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let user = store.create_user("ada", false, &[]).await.unwrap();
        let good = store.create_api_key(user.id, "k").await.unwrap().secret;
        let db = tokio::runtime::Handle::current();
        let cache = Arc::new(KeyCache::new(Duration::from_secs(5)));
        cache.set_failed_attempts_per_minute(3);
        let client = ClientKey::V4([192, 0, 2, 7]);
        let burst: Vec<_> = (0..100)
            .map(|_| {
                let (cache, store, db, good) =
                    (cache.clone(), store.clone(), db.clone(), good.clone());
                tokio::spawn(async move { cache.resolve(&good, client, &store, &db).await })
            })
            .collect();
        for request in burst {
            let answer = request.await.unwrap();
            assert!(matches!(answer, Ok(Some(_))), "{answer:?}");
        }
    }

    #[test]
    fn cache_expires_after_ttl() {
        let cache = KeyCache::new(Duration::from_millis(30));
        let h = hash_key("tg_x");
        cache.insert(h, None);
        assert_eq!(cache.cached(&h), Some(None));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.cached(&h), None);
    }
}

//! Authentication: which Tollgate key a request carries, and whose it is.
//!
//! Keys are looked up by their SHA-256 through an in-memory cache with a short TTL (at most 5 s,
//! the contract's revocation bound), so the hot path touches the database only on the first
//! sight of a key and once per TTL after that. Unknown keys are cached too (negatively), so a
//! flood of bad keys cannot turn into a flood of queries.
//!
//! A presented key is never compared with a stored secret: only its digest is looked up (the
//! database holds digests alone), and the cache compares digests in constant time, so response
//! timing tells a prober nothing about how close a guess came.
//!
//! Not here: what a principal may do (governance, API roles).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use parking_lot::RwLock;
use subtle::ConstantTimeEq;

use crate::store::{hash_key, Principal, Store, StoreError};
use crate::telemetry::metric;

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

/// Finds the Tollgate key in the contract's order: `X-Tollgate-Key` (alias
/// `X-Coder-AI-Governance-Token`), then `Authorization: Bearer`, then `x-api-key`.
pub fn presented_key(headers: &HeaderMap) -> Option<(String, KeySource)> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(k) = text("x-tollgate-key").or_else(|| text("x-coder-ai-governance-token")) {
        if !k.is_empty() {
            return Some((k.to_string(), KeySource::TollgateHeader));
        }
    }
    if let Some(auth) = text("authorization") {
        let token = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
            .map(str::trim);
        if let Some(t) = token.filter(|t| !t.is_empty()) {
            return Some((t.to_string(), KeySource::Authorization));
        }
    }
    if let Some(k) = text("x-api-key").filter(|k| !k.is_empty()) {
        return Some((k.to_string(), KeySource::XApiKey));
    }
    None
}

struct CacheEntry {
    principal: Option<Arc<Principal>>,
    /// When the entry was last fresh (looked up, or served stale): it is trusted for a TTL.
    fetched: Instant,
    /// When the database last confirmed it.
    validated: Instant,
}

/// Bound on cached entries; past it the cache is cleared rather than grown (a flood of random
/// keys must not eat memory).
const MAX_ENTRIES: usize = 100_000;

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

/// Key hash → principal, refreshed from the store after `ttl`.
pub struct KeyCache {
    entries: RwLock<HashMap<KeyDigest, CacheEntry>>,
    ttl: Duration,
}

impl KeyCache {
    pub fn new(ttl: Duration) -> KeyCache {
        KeyCache {
            entries: RwLock::new(HashMap::new()),
            ttl,
        }
    }

    /// A cached answer still within its TTL: `Some(None)` means "known bad key".
    pub fn cached(&self, hash: &[u8; 32]) -> Option<Option<Arc<Principal>>> {
        let entries = self.entries.read();
        let e = entries.get(&KeyDigest(*hash))?;
        (e.fetched.elapsed() < self.ttl).then(|| e.principal.clone())
    }

    /// While the database is down, a key that was valid when last checked (within
    /// [`STALE_LIMIT`]) keeps working: nobody can revoke it meanwhile, since revocation is a
    /// database write, and refusing every caller would turn an outage of the store into an
    /// outage of the gateway. Keys never seen before are still refused.
    fn stale(&self, hash: &[u8; 32]) -> Option<Arc<Principal>> {
        let entries = self.entries.read();
        let e = entries.get(&KeyDigest(*hash))?;
        let valid = e.principal.as_ref()?;
        (e.validated.elapsed() < STALE_LIMIT).then(|| valid.clone())
    }

    /// Serves a stale entry for another TTL before the database is asked again.
    fn touch(&self, hash: &[u8; 32]) {
        if let Some(e) = self.entries.write().get_mut(&KeyDigest(*hash)) {
            e.fetched = Instant::now();
        }
    }

    pub fn insert(&self, hash: [u8; 32], principal: Option<Arc<Principal>>) {
        let mut entries = self.entries.write();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            KeyDigest(hash),
            CacheEntry {
                principal,
                fetched: Instant::now(),
                validated: Instant::now(),
            },
        );
    }

    /// Forgets everything (after a local revocation or user change).
    pub fn clear(&self) {
        self.entries.write().clear();
    }

    /// Resolves a presented key: from the cache, else from the store (run on `db`, the runtime
    /// that owns the pool).
    pub async fn resolve(
        &self,
        secret: &str,
        store: &Store,
        db: &tokio::runtime::Handle,
    ) -> Result<Option<Arc<Principal>>, StoreError> {
        let hash = hash_key(secret);
        if let Some(hit) = self.cached(&hash) {
            metrics::counter!(metric::KEY_CACHE_LOOKUPS_TOTAL, "result" => "hit").increment(1);
            return Ok(hit);
        }
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
                return Err(StoreError::Unavailable("database unavailable".into()))
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

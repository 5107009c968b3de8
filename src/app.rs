//! The application state: what every listener (gateway, proxy front door, management API,
//! dashboard) shares for the life of the process: the configuration in force, provider routes,
//! the store, governance, caches.
//!
//! Not here: what a request does with it (`gateway`), how the admin side serves it (`api`,
//! `dashboard`), start-up and reload (`server`, `reload`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use parking_lot::RwLock;
use pingora::connectors::http::Connector;

use crate::auth::KeyCache;
use crate::config::Config;
use crate::governance::keyvault::KeyVault;
use crate::governance::keyvault::StoredKeyCache;
use crate::governance::pricing::PriceBook;
use crate::governance::Governance;
use crate::lineage::ThreadIndex;
use crate::store::{Recorder, SpendJournal, Store};
use crate::upstream::{DnsCache, ProviderRoute};

/// State shared by every request on every listener.
pub struct AppState {
    /// Replaced as a whole by a SIGHUP reload; a request takes what it needs when it needs it,
    /// and one already holding a route finishes on it.
    config: RwLock<Arc<Config>>,
    providers: RwLock<Arc<HashMap<String, Arc<ProviderRoute>>>>,
    pub keys: KeyCache,
    pub store: Store,
    /// The runtime that owns the database pool; cache misses run there.
    pub db: tokio::runtime::Handle,
    pub recorder: Recorder,
    /// Settled interceptions, on disk before their last byte goes out (see `SpendJournal`).
    pub(crate) journal: Option<Arc<SpendJournal>>,
    pub governance: Governance,
    /// Decrypts stored personal provider keys (present when user keys are allowed).
    pub vault: Option<KeyVault>,
    pub(crate) stored_keys: StoredKeyCache,
    pub(crate) dns: Arc<DnsCache>,
    pub(crate) connector: Connector,
    pub(crate) threads: ThreadIndex,
}

impl AppState {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        db: tokio::runtime::Handle,
        recorder: Recorder,
        journal: Option<Arc<SpendJournal>>,
        vault: Option<KeyVault>,
        env: impl Fn(&str) -> Option<String>,
    ) -> AppState {
        let providers = provider_routes(&config, &env);
        let mut governance = Governance::new(&config);
        if store.shares_spend() {
            governance.share_spend_through(store.clone());
        }
        AppState {
            keys: KeyCache::new(config.auth.key_cache_ttl),
            providers: RwLock::new(Arc::new(providers)),
            store,
            db,
            recorder,
            journal,
            governance,
            vault,
            stored_keys: StoredKeyCache::new(config.auth.key_cache_ttl),
            dns: DnsCache::new(Duration::from_secs(30)),
            connector: Connector::new(None),
            threads: ThreadIndex::new(100_000),
            config: RwLock::new(config),
        }
    }

    /// The configuration in force (the latest one a reload accepted).
    pub fn config(&self) -> Arc<Config> {
        self.config.read().clone()
    }

    pub fn provider(&self, name: &str) -> Option<Arc<ProviderRoute>> {
        self.providers.read().get(name).cloned()
    }

    pub fn providers(&self) -> Vec<Arc<ProviderRoute>> {
        self.providers.read().values().cloned().collect()
    }

    /// Swaps in a reloaded configuration: new provider routes (fresh key pools and breakers),
    /// prices, budget defaults and limits. Requests in flight keep the routes they hold.
    pub async fn reconfigure(&self, config: Arc<Config>, env: impl Fn(&str) -> Option<String>) {
        let providers = provider_routes(&config, &env);
        *self.providers.write() = Arc::new(providers);
        self.governance.reconfigure(&config);
        *self.config.write() = config;
        if let Err(e) = self.governance.refresh(&self.store, Utc::now()).await {
            tracing::warn!(error = %e, "governance refresh after a reload failed; retrying on the next tick");
        }
    }

    pub fn prices(&self) -> Arc<PriceBook> {
        self.governance.prices()
    }

    /// Called by the management API after it changed users, groups, keys, budgets or prices,
    /// so this replica applies the change at once (other replicas pick it up on refresh).
    pub async fn governance_changed(&self) {
        self.keys.clear();
        self.stored_keys.clear();
        if let Err(e) = self.governance.refresh(&self.store, Utc::now()).await {
            tracing::warn!(error = %e, "governance refresh after a change failed; retrying on the next tick");
        }
    }

    /// Forgets a user's cached stored provider key (after it was replaced or deleted).
    pub fn stored_key_changed(&self) {
        self.stored_keys.clear();
    }

    /// Warns, at start-up and after a reload, about providers whose central keys are missing
    /// from the environment (requests needing them are refused or use the others).
    pub(crate) fn warn_about_missing_keys(&self) {
        let config = self.config();
        let policy = config.keys;
        for route in self.providers() {
            let needs_central = policy.central_api_key_enabled
                && route.kind != crate::providers::ProviderKind::Copilot;
            let Some(provider) = config.providers.get(&route.name) else {
                continue;
            };
            let configured = provider.central_key_envs().count();
            if needs_central && route.keys.len() < configured.max(1) {
                let envs: Vec<&str> = provider.central_key_envs().collect();
                let envs = if envs.is_empty() {
                    "(api_key_env not set)".to_string()
                } else {
                    envs.join(", ")
                };
                tracing::warn!(provider = %route.name, api_key_env = %envs, found = route.keys.len(), configured, "central key(s) missing from the environment; requests needing them will be refused or use the others");
            }
        }
    }
}

fn provider_routes(
    config: &Config,
    env: &impl Fn(&str) -> Option<String>,
) -> HashMap<String, Arc<ProviderRoute>> {
    config
        .providers
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                Arc::new(ProviderRoute::from_config(name, p, env)),
            )
        })
        .collect()
}

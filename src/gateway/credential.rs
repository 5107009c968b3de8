//! Credential: which upstream key a request uses. The contract's key-policy truth table
//! ([`choose_credential`]) over the user's own key (sent with the request or stored, decrypted
//! through the vault's cache) and the provider's central key pool (a [`PooledKey`] fails over).
//!
//! Not here: the pool's cool-down and failover rules (`upstream::keypool`), the vault itself
//! (`governance::keyvault`).

use uuid::Uuid;

use super::refusal::{keys_cooling_refusal, Refusal, RefusalKind};
use super::Gateway;
use crate::auth::{KeySource, PresentedCredentials};
use crate::config::KeyPolicyConfig;
use crate::providers::CredentialHeader;
use crate::store::{contains_tollgate_key, mask_secret, CredentialKind, Principal};
use crate::upstream::keypool::NoKey;
use crate::upstream::ProviderRoute;

/// The upstream credential chosen by the key policy.
pub(super) struct Credential {
    pub(super) key: Option<String>,
    pub(super) kind: CredentialKind,
    /// Masked for the record (`sk-…abcd`).
    pub(super) hint: Option<String>,
    /// Index in the provider's central key pool (pooled keys fail over; personal keys do not).
    pub(super) pool_slot: Option<usize>,
}

impl Gateway {
    /// Phase 2: the key policy (contract truth table, `docs/contract.md#key-policy`) picks the
    /// upstream credential; Copilot, which always uses the client's own GitHub token, skips it.
    pub(super) async fn credential(
        &self,
        route: &ProviderRoute,
        presented: PresentedCredentials,
        source: KeySource,
        principal: &Principal,
    ) -> Result<Credential, Refusal> {
        let PresentedCredentials {
            bearer, x_api_key, ..
        } = presented;
        if route.adapter.credential_header() == CredentialHeader::ClientAuthorization {
            // Copilot: the client's own GitHub token is always the credential.
            if bearer.as_deref().is_some_and(contains_tollgate_key) {
                return Err(Refusal::new(
                    RefusalKind::KeyPolicy,
                    "Authorization carries a Tollgate key: copilot requests need the client's own GitHub token there, and the Tollgate key in X-Tollgate-Key (or as the proxy password)",
                ));
            }
            return match bearer.filter(|t| !t.is_empty()) {
                Some(token) => Ok(Credential {
                    hint: Some(mask_secret(&token)),
                    key: Some(token),
                    kind: CredentialKind::Byok,
                    pool_slot: None,
                }),
                None => Err(Refusal::new(
                    RefusalKind::KeyPolicy,
                    "copilot requests must carry the client's own GitHub token in Authorization",
                )),
            };
        }
        // Only with the Tollgate key in its own header do Authorization/x-api-key carry a user key,
        // and a Tollgate key there is not one (clients configured with their Tollgate key, then
        // moved behind the proxy, send it both ways): it is never sent to a provider.
        let user_key = if matches!(
            source,
            KeySource::TollgateHeader | KeySource::ProxyCredentials
        ) {
            bearer
                .or(x_api_key)
                .filter(|k| !k.is_empty() && !contains_tollgate_key(k))
        } else {
            None
        };
        // A key the user stored is the fallback for one sent with the request.
        let user_key = match user_key {
            Some(k) => Some(k),
            None if self.state.config().keys.allow_user_api_key => {
                self.stored_key(principal.user_id, &route.name).await
            }
            None => None,
        };
        choose_credential(self.state.config().keys, user_key, || {
            central_credential(route)
        })
    }

    /// The user's stored provider key for `provider`, decrypted (cached briefly).
    async fn stored_key(&self, user: Uuid, provider: &str) -> Option<String> {
        let vault = self.state.vault.as_ref()?;
        if let Some(hit) = self.state.stored_keys.get(user, provider) {
            return hit;
        }
        let store = self.state.store.clone();
        let name = provider.to_string();
        let sealed = self
            .state
            .db
            .spawn(async move { store.sealed_provider_key(user, &name).await })
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| tracing::error!(error = %e, "stored key lookup failed"))
                    .ok()
            })
            .flatten();
        let key = sealed.and_then(|row| {
            let sealed = crate::governance::keyvault::Sealed {
                nonce: row.nonce,
                ciphertext: row.ciphertext,
            };
            vault
                .open(&user.to_string(), provider, &sealed)
                .map_err(|e| tracing::error!(error = %e, provider, "stored provider key unusable"))
                .ok()
        });
        self.state.stored_keys.put(user, provider, key.clone());
        key
    }
}

/// The contract's key-policy truth table; `central` is asked only when the policy uses it.
fn choose_credential(
    policy: KeyPolicyConfig,
    user_key: Option<String>,
    central: impl FnOnce() -> Result<Credential, Refusal>,
) -> Result<Credential, Refusal> {
    if !policy.allow_user_api_key {
        return central();
    }
    match user_key {
        Some(k) => Ok(Credential {
            hint: Some(mask_secret(&k)),
            key: Some(k),
            kind: CredentialKind::Byok,
            pool_slot: None,
        }),
        None if policy.central_api_key_enabled && policy.allow_central_api_key_fallback => central(),
        None => Err(Refusal::new(
            RefusalKind::KeyPolicy,
            "this provider requires your own API key: send it in Authorization or x-api-key with your Tollgate key in X-Tollgate-Key",
        )),
    }
}

/// The first usable key of the provider's central pool, or why there is none (all cooling:
/// 429 with the shortest wait; all rejected by the upstream: 503).
fn central_credential(route: &ProviderRoute) -> Result<Credential, Refusal> {
    match route.keys.pick(&[]) {
        Ok(pooled) => Ok(Credential {
            key: Some(pooled.secret),
            kind: CredentialKind::Central,
            hint: Some(pooled.hint),
            pool_slot: Some(pooled.slot),
        }),
        Err(NoKey::Unconfigured) => Err(Refusal::new(
            RefusalKind::KeyPolicy,
            format!(
                "no usable provider key: the central key for provider {} is not configured",
                route.name
            ),
        )),
        Err(NoKey::Cooling { retry_after }) => Err(keys_cooling_refusal(&route.name, retry_after)),
        Err(NoKey::Exhausted) => Err(Refusal::new(
            RefusalKind::NoUsableKey,
            format!(
                "every central key of provider {} was rejected by the upstream; an operator must replace them and reload the configuration",
                route.name
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(c: bool, u: bool, f: bool) -> KeyPolicyConfig {
        KeyPolicyConfig {
            central_api_key_enabled: c,
            allow_user_api_key: u,
            allow_central_api_key_fallback: f,
        }
    }

    #[test]
    fn key_policy_truth_table() {
        let user = || Some("sk-user".to_string());
        let central = || {
            Ok(Credential {
                key: Some("sk-central".into()),
                kind: CredentialKind::Central,
                hint: None,
                pool_slot: Some(0),
            })
        };
        let pick = |p, u| choose_credential(p, u, central).map(|c| (c.key.unwrap(), c.kind));
        // C=1 U=0 F=0: the user key is ignored.
        assert_eq!(
            pick(policy(true, false, false), user()).unwrap(),
            ("sk-central".into(), CredentialKind::Central)
        );
        assert_eq!(
            pick(policy(true, false, false), None).unwrap().1,
            CredentialKind::Central
        );
        // C=0 U=1 F=0 and C=1 U=1 F=0: user's, else 403.
        for p in [policy(false, true, false), policy(true, true, false)] {
            assert_eq!(
                pick(p, user()).unwrap(),
                ("sk-user".into(), CredentialKind::Byok)
            );
            assert_eq!(pick(p, None).unwrap_err().kind, RefusalKind::KeyPolicy);
        }
        // C=1 U=1 F=1: user's, else central.
        assert_eq!(
            pick(policy(true, true, true), user()).unwrap().1,
            CredentialKind::Byok
        );
        assert_eq!(
            pick(policy(true, true, true), None).unwrap().1,
            CredentialKind::Central
        );
    }
}

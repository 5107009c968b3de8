//! Leaf certificates for intercepted hosts: minted by the MITM CA on first use, cached.
//!
//! A leaf is an ECDSA P-256 key with a certificate for exactly one host (SAN = the host, CN =
//! the host, EKU serverAuth), valid from one hour ago (clock skew) for [`LEAF_VALIDITY`] but
//! never past the CA's own expiry. The cache re-mints a leaf once half its lifetime has passed,
//! so a long-running process never serves an expired one.
//!
//! Not here: which hosts get leaves (the proxy asks only for configured `mitm_hosts`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use super::ca::{random_serial, MitmCa};
use super::TlsError;
use crate::telemetry::metric;

/// How long a minted leaf is valid (clients see a short-lived certificate; the cache renews it).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Leaves start this far in the past, for clients whose clocks run a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

impl MitmCa {
    /// Mints a leaf for `host` (a DNS name or IP address), ready to serve: the chain is the leaf
    /// followed by the CA file's intermediates.
    pub fn mint(&self, host: &str) -> Result<CertifiedKey, TlsError> {
        self.mint_at(host, OffsetDateTime::now_utc())
            .map(|(key, _)| key)
    }

    /// The leaf and how long it stays valid from `now`.
    fn mint_at(
        &self,
        host: &str,
        now: OffsetDateTime,
    ) -> Result<(CertifiedKey, Duration), TlsError> {
        let fail = |detail: String| TlsError::Mint {
            host: host.to_string(),
            detail,
        };
        // A CA that expired while Tollgate runs (a corporate CA not renewed in time) would sign
        // leaves no client accepts: refuse to mint, so the handshake fails here with a reason in
        // the log rather than at the client with "certificate expired".
        if self.not_after <= now {
            return Err(fail(format!(
                "the CA certificate expired on {}; install a renewed CA (tollgate ca init, or the corporate one) and restart",
                self.not_after
            )));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(e.to_string()))?;
        let mut params =
            CertificateParams::new(vec![host.to_string()]).map_err(|e| fail(e.to_string()))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_VALIDITY).min(self.not_after);
        let lifetime = Duration::try_from(params.not_after - now).unwrap_or(Duration::ZERO);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(cert.der().clone());
        chain.extend(self.chain.iter().cloned());
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing =
            rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|e| fail(e.to_string()))?;
        Ok((CertifiedKey::new(chain, signing), lifetime))
    }
}

struct CachedLeaf {
    key: Arc<CertifiedKey>,
    renew_at: Instant,
}

/// Minted leaves by host, bounded: past `capacity` hosts the one due for renewal first is
/// dropped. Minting takes a fraction of a millisecond and happens once per host per few days.
pub struct LeafCertCache {
    ca: MitmCa,
    entries: Mutex<HashMap<String, CachedLeaf>>,
    capacity: usize,
}

impl std::fmt::Debug for LeafCertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCertCache")
            .field("ca", &self.ca)
            .field("hosts", &self.entries.try_lock().map(|e| e.len()))
            .finish()
    }
}

impl LeafCertCache {
    pub fn new(ca: MitmCa, capacity: usize) -> LeafCertCache {
        LeafCertCache {
            ca,
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    pub fn ca(&self) -> &MitmCa {
        &self.ca
    }

    /// The leaf for `host` (lowercase), minted now if there is none or it is half-way through
    /// its validity.
    pub fn get(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if let Some(hit) = entries.get(host) {
            if hit.renew_at > now {
                return Ok(hit.key.clone());
            }
        }
        // Minting under the lock: two first handshakes for one host mint once, and a mint is
        // short (it never waits on I/O).
        let (key, lifetime) = self.ca.mint_at(host, OffsetDateTime::now_utc())?;
        let key = Arc::new(key);
        metrics::counter!(metric::LEAF_CERTS_MINTED_TOTAL).increment(1);
        if entries.len() >= self.capacity && !entries.contains_key(host) {
            let oldest = entries
                .iter()
                .min_by_key(|(_, leaf)| leaf.renew_at)
                .map(|(h, _)| h.clone());
            if let Some(h) = oldest {
                entries.remove(&h);
            }
        }
        entries.insert(
            host.to_string(),
            CachedLeaf {
                key: key.clone(),
                renew_at: now + lifetime / 2,
            },
        );
        Ok(key)
    }

    /// Hosts with a cached leaf.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::generate_ca;

    fn ca() -> MitmCa {
        let g = generate_ca().unwrap();
        MitmCa::from_pem(&g.cert_pem, &g.key_pem).unwrap()
    }

    #[test]
    fn a_leaf_names_its_host_and_is_short_lived() {
        let ca = ca();
        let leaf = ca.mint("api.openai.com").unwrap();
        assert_eq!(leaf.cert.len(), 1, "self-signed CA: the leaf alone");
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.cert[0].as_ref()).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[DNSName(\"api.openai.com\")]"
        );
        let bc = x509.basic_constraints().unwrap();
        assert!(bc.is_none_or(|b| !b.value.ca), "a leaf is not a CA");
        let v = x509.validity();
        let span = v.not_after.timestamp() - v.not_before.timestamp();
        assert_eq!(span, (LEAF_VALIDITY + BACKDATE).as_secs() as i64);
        assert!(leaf.keys_match().is_ok());
    }

    #[test]
    fn ip_hosts_get_an_ip_san() {
        let leaf = ca().mint("127.0.0.1").unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.cert[0].as_ref()).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap();
        assert!(format!("{:?}", san.value.general_names).contains("IPAddress"));
    }

    #[test]
    fn the_cache_mints_once_per_host_and_stays_bounded() {
        let cache = LeafCertCache::new(ca(), 2);
        let a = cache.get("a.example").unwrap();
        let again = cache.get("a.example").unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        cache.get("b.example").unwrap();
        cache.get("c.example").unwrap();
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn leaves_never_outlive_the_ca() {
        let ca = ca();
        let near_end = ca.not_after - time::Duration::days(2);
        let (leaf, lifetime) = ca.mint_at("a.example", near_end).unwrap();
        assert_eq!(lifetime, Duration::from_secs(2 * 24 * 3600));
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.cert[0].as_ref()).unwrap();
        assert_eq!(
            x509.validity().not_after.timestamp(),
            ca.not_after.unix_timestamp()
        );
    }
}

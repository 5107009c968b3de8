//! Certificates for the proxy front door: the MITM certificate authority, the leaf certificates
//! it mints per intercepted host, and the proxy listener's own certificate.
//!
//! - [`MitmCa`] loads a CA from PEM files (the one `tollgate ca init` writes, or a corporate CA
//!   with intermediates) and checks it once at start: the key matches the certificate, the
//!   certificate is a CA allowed to sign, it is within its validity period, and the key file is
//!   not readable by group or others. [`generate_ca`] / [`write_ca_files`] make a new one.
//! - [`LeafCertCache`] mints ECDSA P-256 leaves (SAN = host, 7 days) signed by the CA on first
//!   use and keeps them, bounded, until they are half-way through their validity.
//! - [`load_server_cert`] reads a certificate chain and key for a TLS listener.
//!
//! The CA key never leaves the process: it is read at start and used only to sign leaves.
//!
//! Not here: when to intercept or what to do with decrypted traffic (that is `proxy`), and
//! upstream TLS (pingora's connector, configured in `gateway`).

mod ca;
mod keys;
mod leaf;

use std::path::PathBuf;

pub use ca::{generate_ca, write_ca_files, GeneratedCa, MitmCa};
pub use leaf::{LeafCertCache, LEAF_VALIDITY};

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

/// Why a CA, a key or a certificate could not be used. Each message names the file and says
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it (move it away first, or pick another --out directory)")]
    AlreadyExists { path: PathBuf },
    #[error("{path} is readable by group or others (mode {mode:04o}); the CA key must be private: run `chmod 600 {path}`")]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error(
        "{path} holds no PEM private key (expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
    )]
    NoKey { path: PathBuf },
    #[error("{path} holds an encrypted private key; Tollgate needs it unencrypted (e.g. `openssl pkcs8 -in {path} -out plain.key`, then chmod 600)")]
    EncryptedKey { path: PathBuf },
    #[error("{path}: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("{path}: not a valid X.509 certificate: {detail}")]
    BadCertificate { path: PathBuf, detail: String },
    #[error("the private key in {key} does not belong to the certificate in {cert} (their public keys differ)")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path} is not a CA certificate (basicConstraints CA:TRUE is missing), so clients would refuse the leaves it signs; use a CA certificate or run `tollgate ca init`")]
    NotCa { path: PathBuf },
    #[error("{path} is a CA certificate whose keyUsage does not allow signing certificates (keyCertSign)")]
    CannotSign { path: PathBuf },
    #[error("{path} expired on {not_after}; replace the CA (e.g. `tollgate ca init --out DIR`) and redistribute it to clients")]
    Expired { path: PathBuf, not_after: String },
    #[error(
        "{path} is not valid before {not_before}; check the certificate and this machine's clock"
    )]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("cannot mint a certificate for {host}: {detail}")]
    Mint { host: String, detail: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads a certificate chain and private key for a TLS listener (leaf first, then
/// intermediates; key as PKCS#8, PKCS#1 RSA or SEC1 EC), checking that they belong together.
pub fn load_server_cert(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = keys::read_certificates(cert_path)?;
    let key = keys::read_private_key(key_path)?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError::BadKey {
            path: key_path.to_path_buf(),
            detail: format!("unsupported private key: {e}"),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        }),
        // The key type cannot report its public key (rare); the handshake will tell.
        Err(_) => Ok(Arc::new(certified)),
    }
}

/// A certificate's DER bytes, for comparisons in tests and benches.
pub fn certificate_der(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

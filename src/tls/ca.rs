//! The MITM certificate authority: loading and checking one, generating a new one.
//!
//! Not here: minting leaves (`leaf`) or key encodings (`keys`).

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use super::{keys, TlsError};

/// A loaded, checked CA that can sign leaf certificates.
pub struct MitmCa {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// Sent after every leaf: the CA file's certificates in order, without self-signed roots
    /// (clients already hold the root they trust).
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// Leaves never outlive the CA.
    pub(crate) not_after: OffsetDateTime,
    subject: String,
}

impl std::fmt::Debug for MitmCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MitmCa")
            .field("subject", &self.subject)
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl MitmCa {
    /// Loads `cert_path` (the signing CA first, then any intermediates up to the root) and
    /// `key_path` (the signing CA's key: PKCS#8, PKCS#1 RSA or SEC1 EC) and checks them.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<MitmCa, TlsError> {
        check_key_permissions(key_path)?;
        let certs = keys::read_certificates(cert_path)?;
        let key = keys::read_private_key(key_path)?;
        let key = keys::key_pair(&key, key_path)?;
        MitmCa::from_parts(certs, key, cert_path, key_path)
    }

    /// The same checks on PEM text already in memory (tests and benchmarks).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<MitmCa, TlsError> {
        let cert_path = Path::new("(certificate PEM)");
        let key_path = Path::new("(key PEM)");
        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BadCertificate {
                path: cert_path.to_path_buf(),
                detail: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_path.to_path_buf(),
            });
        }
        let key = keys::parse_private_key(key_pem.as_bytes(), key_path)?;
        let key = keys::key_pair(&key, key_path)?;
        MitmCa::from_parts(certs, key, cert_path, key_path)
    }

    fn from_parts(
        certs: Vec<CertificateDer<'static>>,
        key: KeyPair,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<MitmCa, TlsError> {
        let bad = |detail: String| TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            detail,
        };
        let (_, x509) =
            x509_parser::parse_x509_certificate(&certs[0]).map_err(|e| bad(e.to_string()))?;
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(TlsError::NotCa {
                    path: cert_path.to_path_buf(),
                })
            }
            Err(e) => return Err(bad(format!("basicConstraints: {e}"))),
        }
        match x509.key_usage() {
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(TlsError::CannotSign {
                    path: cert_path.to_path_buf(),
                })
            }
            Ok(_) => {}
            Err(e) => return Err(bad(format!("keyUsage: {e}"))),
        }
        let validity = x509.validity();
        let now = x509_parser::time::ASN1Time::now();
        if validity.not_after < now {
            return Err(TlsError::Expired {
                path: cert_path.to_path_buf(),
                not_after: validity.not_after.to_string(),
            });
        }
        if validity.not_before > now {
            return Err(TlsError::NotYetValid {
                path: cert_path.to_path_buf(),
                not_before: validity.not_before.to_string(),
            });
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        let not_after = validity.not_after.to_datetime();
        let subject = x509.subject().to_string();
        let issuer = Issuer::from_ca_cert_der(&certs[0], key)
            .map_err(|e| bad(format!("cannot use as issuer: {e}")))?;
        let mut chain = Vec::with_capacity(certs.len());
        for (i, der) in certs.into_iter().enumerate() {
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| bad(format!("certificate {} in the file: {e}", i + 1)))?;
            if !is_self_signed(&cert) {
                chain.push(der);
            }
        }
        Ok(MitmCa {
            issuer,
            chain,
            not_after,
            subject,
        })
    }

    /// The CA's subject, for logs.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Certificates sent after each leaf (intermediates; empty for a self-signed CA).
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

/// A root: issued by itself and signed with its own key (same names alone are not proof).
fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok()
}

/// A CA key readable by group or others is refused: anyone who can read it can impersonate
/// every intercepted host to every client that trusts the CA.
fn check_key_permissions(path: &Path) -> Result<(), TlsError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyTooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    Ok(())
}

/// A freshly generated self-signed CA, as PEM.
pub struct GeneratedCa {
    pub cert_pem: String,
    pub key_pem: String,
}

/// How long a generated CA is valid. Clients are configured to trust it once, so it is long;
/// rotate by generating a new one and redistributing it.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);

/// A new self-signed ECDSA P-256 CA that may sign end-entity certificates only (path length 0).
pub fn generate_ca() -> Result<GeneratedCa, TlsError> {
    let fail = |e: rcgen::Error| TlsError::Mint {
        host: "the CA".into(),
        detail: e.to_string(),
    };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        format!(
            "Tollgate MITM CA {:04}-{:02}-{:02}",
            now.year(),
            u8::from(now.month()),
            now.day()
        ),
    );
    name.push(DnType::OrganizationName, "Tollgate");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(fail)?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes a new CA as `DIR/ca.pem` (mode 0644) and `DIR/ca.key` (mode 0600), creating `DIR`;
/// refuses if either file already exists. Returns both paths.
pub fn write_ca_files(dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(TlsError::AlreadyExists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca = generate_ca()?;
    write_new(&key_path, ca.key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, ca.cert_pem.as_bytes(), 0o644) {
        // Leave nothing half-done behind: a key without its certificate is useless.
        let _ = std::fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((cert_path, key_path))
}

/// Creates `path` (never overwriting) with `mode` from the start, so the key is never
/// briefly readable by others.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            TlsError::Write {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// A random positive 128-bit serial (RFC 5280: unique per issuer, at most 20 octets).
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PKCS_ECDSA_P256_SHA256;

    /// A CA-like certificate with the given knobs, signed by itself or by `parent`.
    fn cert(
        ca: bool,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        parent: Option<&Issuer<'_, KeyPair>>,
    ) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, if ca { "Test CA" } else { "Test leaf" });
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
        params.not_before = not_before;
        params.not_after = not_after;
        let pem = match parent {
            Some(issuer) => params.signed_by(&key, issuer).unwrap().pem(),
            None => params.self_signed(&key).unwrap().pem(),
        };
        (pem, key)
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn days(n: i64) -> time::Duration {
        time::Duration::days(n)
    }

    #[test]
    fn a_generated_ca_loads_and_its_leaves_chain_to_it() {
        let ca = generate_ca().unwrap();
        let loaded = MitmCa::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        assert!(loaded.subject().contains("Tollgate MITM CA"));
        assert!(
            loaded.intermediates().is_empty(),
            "a self-signed CA sends no intermediates"
        );
        let (_, x509) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes()).unwrap();
        let x509 = x509.parse_x509().unwrap();
        let bc = x509.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let (pem, _) = cert(true, now() - days(1), now() + days(30), None);
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let err = MitmCa::from_pem(&pem, &other.serialize_pem()).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn a_certificate_that_is_not_a_ca_is_refused() {
        let (pem, key) = cert(false, now() - days(1), now() + days(30), None);
        let err = MitmCa::from_pem(&pem, &key.serialize_pem()).unwrap_err();
        assert!(matches!(err, TlsError::NotCa { .. }), "{err}");
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
    }

    #[test]
    fn expired_and_future_cas_are_refused() {
        let (pem, key) = cert(true, now() - days(400), now() - days(2), None);
        let err = MitmCa::from_pem(&pem, &key.serialize_pem()).unwrap_err();
        assert!(matches!(err, TlsError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired on"), "{err}");
        let (pem, key) = cert(true, now() + days(2), now() + days(400), None);
        let err = MitmCa::from_pem(&pem, &key.serialize_pem()).unwrap_err();
        assert!(matches!(err, TlsError::NotYetValid { .. }), "{err}");
    }

    #[test]
    fn an_intermediate_ca_keeps_its_chain_without_the_root() {
        let (root_pem, root_key) = cert(true, now() - days(1), now() + days(300), None);
        let root_issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let (inter_pem, inter_key) =
            cert(true, now() - days(1), now() + days(200), Some(&root_issuer));
        let file = format!("{inter_pem}{root_pem}");
        let ca = MitmCa::from_pem(&file, &inter_key.serialize_pem()).unwrap();
        assert_eq!(ca.intermediates().len(), 1, "the root is not sent");
        assert_eq!(
            ca.intermediates()[0].as_ref(),
            super::super::certificate_der(&inter_pem)[0].as_ref()
        );
    }

    #[test]
    fn pkcs1_rsa_and_sec1_ec_keys_load() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ca");
        for (cert, key) in [("rsa-ca.pem", "rsa-ca.key"), ("ec-ca.pem", "ec-ca.key")] {
            let cert_pem = std::fs::read_to_string(format!("{dir}/{cert}")).unwrap();
            let key_pem = std::fs::read_to_string(format!("{dir}/{key}")).unwrap();
            let ca = MitmCa::from_pem(&cert_pem, &key_pem).unwrap_or_else(|e| panic!("{key}: {e}"));
            ca.mint("api.openai.com")
                .unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        // Same keys, swapped: each is refused as not matching.
        let rsa_cert = std::fs::read_to_string(format!("{dir}/rsa-ca.pem")).unwrap();
        let ec_key = std::fs::read_to_string(format!("{dir}/ec-ca.key")).unwrap();
        assert!(matches!(
            MitmCa::from_pem(&rsa_cert, &ec_key),
            Err(TlsError::KeyMismatch { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn ca_files_are_written_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let (cert, key) = write_ca_files(&out).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert) & 0o600, 0o600);
        MitmCa::load(&cert, &key).unwrap();
        let err = write_ca_files(&out).unwrap_err();
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err}");

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = MitmCa::load(&cert, &key).unwrap_err();
        assert!(
            matches!(err, TlsError::KeyTooOpen { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn serials_are_positive_and_differ() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_ne!(a, b);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
    }
}

//! Reading PEM certificates and private keys, and turning every supported private key form into
//! an rcgen [`KeyPair`].
//!
//! rcgen on ring signs only with PKCS#8 keys, while corporate CAs often come as PKCS#1 RSA
//! (`BEGIN RSA PRIVATE KEY`) or SEC1 EC (`BEGIN EC PRIVATE KEY`). Both are wrapped here into the
//! equivalent PKCS#8 structure (RFC 5208: version 0, the algorithm identifier, the original key
//! as an OCTET STRING); nothing about the key changes. A SEC1 key must carry its public key (as
//! OpenSSL writes it), because ring requires it.
//!
//! Not here: deciding whether a certificate may act as a CA (`ca`).

use std::path::Path;

use rcgen::KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::TlsError;

/// Every certificate in a PEM file, in file order (at least one).
pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    let certs = rustls_pemfile::certs(&mut text.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_path_buf(),
            detail: format!("unreadable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file, in whichever form it was written.
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(path)?;
    parse_private_key(&text, path)
}

pub(crate) fn parse_private_key(
    text: &[u8],
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    // `BEGIN ENCRYPTED PRIVATE KEY` (PKCS#8) or `Proc-Type: 4,ENCRYPTED` (legacy OpenSSL).
    if contains(text, b"ENCRYPTED") {
        return Err(TlsError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    let key = rustls_pemfile::private_key(&mut &text[..]).map_err(|e| TlsError::BadKey {
        path: path.to_path_buf(),
        detail: format!("unreadable PEM: {e}"),
    })?;
    key.ok_or_else(|| TlsError::NoKey {
        path: path.to_path_buf(),
    })
}

/// An rcgen signing key from any supported key form.
pub(crate) fn key_pair(key: &PrivateKeyDer<'_>, path: &Path) -> Result<KeyPair, TlsError> {
    let bad = |detail: String| TlsError::BadKey {
        path: path.to_path_buf(),
        detail,
    };
    match key {
        PrivateKeyDer::Pkcs8(k) => KeyPair::try_from(k).map_err(|e| {
            bad(format!(
                "unsupported PKCS#8 key ({e}); supported: RSA (2048-8192 bits), ECDSA P-256/P-384, Ed25519"
            ))
        }),
        PrivateKeyDer::Pkcs1(k) => {
            let pkcs8 = pkcs8_wrap(RSA_ENCRYPTION_ALG_ID, k.secret_pkcs1_der());
            KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8)).map_err(|e| {
                bad(format!(
                    "unsupported PKCS#1 RSA key ({e}); RSA keys must be 2048 to 8192 bits"
                ))
            })
        }
        PrivateKeyDer::Sec1(k) => {
            // The curve is not needed up front: only the right one parses (ring checks the
            // key length and any curve named inside the SEC1 structure).
            for alg_id in [EC_P256_ALG_ID, EC_P384_ALG_ID] {
                let pkcs8 = pkcs8_wrap(alg_id, k.secret_sec1_der());
                if let Ok(pair) = KeyPair::try_from(&PrivatePkcs8KeyDer::from(pkcs8)) {
                    return Ok(pair);
                }
            }
            Err(bad(
                "unsupported SEC1 EC key: only P-256 and P-384 keys that include their public key are supported (convert with `openssl pkcs8 -topk8 -nocrypt`)".into(),
            ))
        }
        _ => Err(bad("unsupported private key format".into())),
    }
}

/// AlgorithmIdentifier { rsaEncryption, NULL }.
const RSA_ENCRYPTION_ALG_ID: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
const EC_P256_ALG_ID: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
/// AlgorithmIdentifier { id-ecPublicKey, secp384r1 }.
const EC_P384_ALG_ID: &[u8] = &[
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
    0x00, 0x22,
];

/// PrivateKeyInfo ::= SEQUENCE { version 0, algorithm, privateKey OCTET STRING }.
fn pkcs8_wrap(alg_id: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(alg_id);
    body.extend(der_tlv(0x04, key));
    der_tlv(0x30, &body)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_use_the_short_and_long_forms() {
        assert_eq!(der_tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der_tlv(0x04, &[0u8; 200]);
        assert_eq!(&long[..3], &[0x04, 0x81, 200]);
        let longer = der_tlv(0x04, &[0u8; 1200]);
        assert_eq!(&longer[..4], &[0x04, 0x82, 0x04, 0xb0]);
    }

    #[test]
    fn a_pkcs8_key_round_trips() {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = pair.serialize_pem();
        let der = parse_private_key(pem.as_bytes(), Path::new("k.pem")).unwrap();
        let back = key_pair(&der, Path::new("k.pem")).unwrap();
        assert_eq!(back.public_key_raw(), pair.public_key_raw());
    }

    #[test]
    fn encrypted_and_missing_keys_are_named() {
        let enc =
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(matches!(
            parse_private_key(enc, Path::new("k")),
            Err(TlsError::EncryptedKey { .. })
        ));
        assert!(matches!(
            parse_private_key(b"hello", Path::new("k")),
            Err(TlsError::NoKey { .. })
        ));
    }
}

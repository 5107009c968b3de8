//! The key vault: personal provider keys encrypted at rest with AES-256-GCM.
//!
//! The vault key comes from `TOLLGATE_SECRET_KEY` (64 hex characters or base64 of 32 bytes) or,
//! failing that, from a key file that Tollgate generates on first start with mode 0600. Each
//! sealed key has its own random nonce and is bound to its owner and provider (associated data),
//! so a ciphertext copied to another user's row does not decrypt.
//!
//! [`StoredKeyCache`] keeps what the vault decrypted for a short while, so a request with a
//! stored key costs no database round trip.
//!
//! Not here: which key a request uses (key policy) or where ciphertexts are stored (store).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use parking_lot::Mutex;
use rand::RngCore;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("TOLLGATE_SECRET_KEY must be 32 bytes as 64 hex characters or base64")]
    BadSecret,
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("a stored provider key could not be decrypted (wrong TOLLGATE_SECRET_KEY?)")]
    Decrypt,
}

pub struct KeyVault {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for KeyVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyVault(<secret>)")
    }
}

/// A sealed provider key as stored.
pub struct Sealed {
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

fn decode_secret(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?
    };
    bytes.try_into().ok()
}

impl KeyVault {
    pub fn from_key(key: [u8; 32]) -> KeyVault {
        KeyVault {
            cipher: Aes256Gcm::new(&key.into()),
        }
    }

    /// The vault from `TOLLGATE_SECRET_KEY` if set, else from `key_file` (created with mode 0600
    /// when missing; refused when readable by others).
    pub fn load(env_secret: Option<&str>, key_file: &Path) -> Result<KeyVault, VaultError> {
        if let Some(s) = env_secret {
            return decode_secret(s)
                .map(KeyVault::from_key)
                .ok_or(VaultError::BadSecret);
        }
        let err = |reason: String| VaultError::KeyFile {
            path: key_file.display().to_string(),
            reason,
        };
        if key_file.exists() {
            check_private(key_file).map_err(err)?;
            let text = std::fs::read_to_string(key_file).map_err(|e| err(e.to_string()))?;
            return decode_secret(&text)
                .map(KeyVault::from_key)
                .ok_or_else(|| err("does not hold 32 bytes in hex".into()));
        }
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        if let Some(parent) = key_file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(key_file).map_err(|e| err(e.to_string()))?;
        file.write_all(format!("{}\n", hex::encode(key)).as_bytes())
            .map_err(|e| err(e.to_string()))?;
        Ok(KeyVault::from_key(key))
    }

    pub fn seal(&self, owner: &str, provider: &str, secret: &str) -> Sealed {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = format!("{owner}\u{0}{provider}");
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            // AES-GCM encryption only fails for messages beyond 64 GiB.
            .unwrap_or_default();
        Sealed {
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    pub fn open(&self, owner: &str, provider: &str, sealed: &Sealed) -> Result<String, VaultError> {
        if sealed.nonce.len() != 12 {
            return Err(VaultError::Decrypt);
        }
        let aad = format!("{owner}\u{0}{provider}");
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| VaultError::Decrypt)
    }
}

/// Refuses a key file that group or others can read.
fn check_private(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| e.to_string())?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "mode {:o} lets others read it; chmod 600",
                mode & 0o777
            ));
        }
    }
    Ok(())
}

/// A decrypted key (or "none stored") and when it was looked up.
type CachedStoredKey = (Option<String>, Instant);

/// Decrypted stored provider keys per (user, provider), trusted for the key cache TTL so a
/// BYOK user does not cost a database round trip per request.
pub(crate) struct StoredKeyCache {
    entries: Mutex<HashMap<(Uuid, String), CachedStoredKey>>,
    ttl: Duration,
}

impl StoredKeyCache {
    pub(crate) fn new(ttl: Duration) -> StoredKeyCache {
        StoredKeyCache {
            entries: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    pub(crate) fn get(&self, user: Uuid, provider: &str) -> Option<Option<String>> {
        let entries = self.entries.lock();
        let (key, at) = entries.get(&(user, provider.to_string()))?;
        (at.elapsed() < self.ttl).then(|| key.clone())
    }

    pub(crate) fn put(&self, user: Uuid, provider: &str, key: Option<String>) {
        let mut entries = self.entries.lock();
        if entries.len() > 100_000 {
            entries.clear();
        }
        entries.insert((user, provider.to_string()), (key, Instant::now()));
    }

    pub(crate) fn clear(&self) {
        self.entries.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_bound_to_owner() {
        let v = KeyVault::from_key([7; 32]);
        let s = v.seal("user-1", "openai", "sk-secret");
        assert!(!s.ciphertext.windows(9).any(|w| w == b"sk-secret"));
        assert_eq!(v.open("user-1", "openai", &s).unwrap(), "sk-secret");
        assert!(v.open("user-2", "openai", &s).is_err());
        assert!(v.open("user-1", "anthropic", &s).is_err());
        assert!(KeyVault::from_key([8; 32])
            .open("user-1", "openai", &s)
            .is_err());
    }

    #[test]
    fn key_file_is_generated_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret.key");
        let a = KeyVault::load(None, &path).unwrap();
        let sealed = a.seal("u", "p", "k");
        let b = KeyVault::load(None, &path).unwrap();
        assert_eq!(b.open("u", "p", &sealed).unwrap(), "k");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(KeyVault::load(None, &path).is_err());
        }
    }

    #[test]
    fn env_secret_formats() {
        assert!(KeyVault::load(Some(&"ab".repeat(32)), Path::new("/nonexistent")).is_ok());
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        assert!(KeyVault::load(Some(&b64), Path::new("/nonexistent")).is_ok());
        assert!(matches!(
            KeyVault::load(Some("short"), Path::new("/x")),
            Err(VaultError::BadSecret)
        ));
    }
}

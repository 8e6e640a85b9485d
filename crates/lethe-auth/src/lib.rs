//! API keys: how principals prove who they are to lethe.
//!
//! A key is `lethe_<id>_<secret>`: the id (public, 12 hex digits) finds the
//! record, the secret (32 random bytes, base64url) proves possession. The key
//! is shown once, when created; lethe stores only its HMAC-SHA256 digest
//! under a server secret kept in the data directory (mode 0600), so a leaked
//! key file does not reveal working keys, and a leaked key file *and* secret
//! still do not (HMAC is one-way). Verification compares digests in constant
//! time (`ring::hmac::verify`) and does the same work for unknown ids.
//!
//! Keys bind to a principal name; whether that principal exists and what it
//! may read is the policy's business, checked by the caller at use time, so a
//! principal removed from the policy loses access at once.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Errors of key management and authentication.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The key file or secret is damaged.
    #[error("key store is damaged: {0}")]
    Corrupt(String),
    /// The presented key is malformed, unknown, revoked or wrong. One variant
    /// on purpose: callers must not learn which.
    #[error("invalid API key")]
    InvalidKey,
    /// No key with this id.
    #[error("no key with id {0:?}")]
    UnknownId(String),
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is stored about a key: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public identifier, part of the key.
    pub id: String,
    /// The principal the key authenticates.
    pub principal: String,
    /// HMAC-SHA256 of the full key under the server secret, hex.
    pub digest: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_s: u64,
    /// Revoked keys authenticate nobody.
    pub revoked: bool,
}

/// A freshly created key: the only moment the secret exists outside the caller.
#[derive(Debug)]
pub struct NewKey {
    /// The full key to hand to the principal.
    pub key: String,
    /// What was stored.
    pub record: KeyRecord,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeyFile {
    keys: BTreeMap<String, KeyRecord>,
}

/// The key store of one data directory: `keys.json` and `server.secret`.
#[derive(Debug)]
pub struct KeyStore {
    keys_path: PathBuf,
    hmac_key: hmac::Key,
    keys: RwLock<KeyFile>,
    rng: SystemRandom,
}

const PREFIX: &str = "lethe_";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

impl KeyStore {
    /// Opens the key store in `dir`, creating the server secret on first use.
    pub fn open(dir: &Path) -> Result<KeyStore> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let rng = SystemRandom::new();
        let secret_path = dir.join("server.secret");
        let secret = match std::fs::read(&secret_path) {
            Ok(s) if s.len() == 32 => s,
            Ok(s) => {
                return Err(Error::Corrupt(format!(
                    "server.secret has {} bytes, expected 32",
                    s.len()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut s = vec![0u8; 32];
                rng.fill(&mut s).map_err(|_| Error::Random)?;
                lethe_durable::atomic_write(&secret_path, &s)
                    .map_err(|e| io_err(&secret_path, e))?;
                restrict_permissions(&secret_path)?;
                s
            }
            Err(e) => return Err(io_err(&secret_path, e)),
        };
        let keys_path = dir.join("keys.json");
        let keys = match std::fs::read(&keys_path) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| Error::Corrupt(format!("keys.json: {e}")))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => KeyFile::default(),
            Err(e) => return Err(io_err(&keys_path, e)),
        };
        Ok(KeyStore {
            keys_path,
            hmac_key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            keys: RwLock::new(keys),
            rng,
        })
    }

    /// Creates a key for `principal`. The returned key is not stored anywhere.
    pub fn create(&self, principal: &str) -> Result<NewKey> {
        let mut id_bytes = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        self.rng.fill(&mut id_bytes).map_err(|_| Error::Random)?;
        self.rng.fill(&mut secret).map_err(|_| Error::Random)?;
        let id = hex::encode(id_bytes);
        let key = format!(
            "{PREFIX}{id}_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let record = KeyRecord {
            id: id.clone(),
            principal: principal.to_string(),
            digest: hex::encode(hmac::sign(&self.hmac_key, key.as_bytes()).as_ref()),
            created_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            revoked: false,
        };
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        keys.keys.insert(id, record.clone());
        if let Err(e) = self.persist(&keys) {
            keys.keys.remove(&record.id);
            return Err(e);
        }
        Ok(NewKey { key, record })
    }

    /// Returns the principal a key authenticates, or [`Error::InvalidKey`].
    pub fn authenticate(&self, key: &str) -> Result<String> {
        let id = parse_id(key);
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let record = id.and_then(|id| keys.keys.get(id));
        // Verify against a real digest or a dummy one, so unknown ids cost the same.
        let dummy = [0u8; 32];
        let expected = record
            .and_then(|r| hex::decode(&r.digest).ok())
            .unwrap_or_else(|| dummy.to_vec());
        let ok = hmac::verify(&self.hmac_key, key.as_bytes(), &expected).is_ok();
        match record {
            Some(r) if ok && !r.revoked => Ok(r.principal.clone()),
            _ => Err(Error::InvalidKey),
        }
    }

    /// Revokes a key by id.
    pub fn revoke(&self, id: &str) -> Result<KeyRecord> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let record = keys
            .keys
            .get_mut(id)
            .ok_or_else(|| Error::UnknownId(id.to_string()))?;
        let was = record.revoked;
        record.revoked = true;
        let out = record.clone();
        if let Err(e) = self.persist(&keys) {
            if let Some(r) = keys.keys.get_mut(id) {
                r.revoked = was;
            }
            return Err(e);
        }
        Ok(out)
    }

    /// Every key record, by id.
    pub fn list(&self) -> Vec<KeyRecord> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.keys.values().cloned().collect()
    }

    fn persist(&self, keys: &KeyFile) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(keys).map_err(|e| Error::Corrupt(e.to_string()))?;
        lethe_durable::atomic_write(&self.keys_path, &bytes)
            .map_err(|e| io_err(&self.keys_path, e))?;
        restrict_permissions(&self.keys_path)
    }
}

fn parse_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == ID_BYTES * 2 && !secret.is_empty()).then_some(id)
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err(path, e))
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) -> Result<()> {
    Ok(())
}

fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_their_principal_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        let a = store.create("alice").unwrap();
        let b = store.create("bob").unwrap();
        assert_eq!(store.authenticate(&a.key).unwrap(), "alice");
        assert_eq!(store.authenticate(&b.key).unwrap(), "bob");
        // A key with one character changed, another id, garbage: all invalid.
        let mut tampered = a.key.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        for bad in [
            tampered.as_str(),
            "",
            "lethe_",
            "lethe_zzzzzzzzzzzz_abc",
            "Bearer x",
            &a.key[..20],
        ] {
            assert!(
                matches!(store.authenticate(bad), Err(Error::InvalidKey)),
                "{bad:?}"
            );
        }
        // Swapping the secret parts of two keys does not work either.
        let a_id = &a.record.id;
        let b_secret = b.key.rsplit_once('_').unwrap().1;
        assert!(store
            .authenticate(&format!("lethe_{a_id}_{b_secret}"))
            .is_err());
    }

    #[test]
    fn only_digests_are_stored_and_they_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = {
            let store = KeyStore::open(dir.path()).unwrap();
            store.create("alice").unwrap().key
        };
        let on_disk = std::fs::read_to_string(dir.path().join("keys.json")).unwrap();
        let secret = key.rsplit_once('_').unwrap().1;
        assert!(
            !on_disk.contains(secret),
            "the secret must never be written"
        );
        let store = KeyStore::open(dir.path()).unwrap();
        assert_eq!(store.authenticate(&key).unwrap(), "alice");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("server.secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn another_server_secret_rejects_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyStore::open(dir.path())
            .unwrap()
            .create("alice")
            .unwrap()
            .key;
        std::fs::remove_file(dir.path().join("server.secret")).unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        assert!(store.authenticate(&key).is_err());
    }

    #[test]
    fn revoked_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        let k = store.create("alice").unwrap();
        store.revoke(&k.record.id).unwrap();
        assert!(store.authenticate(&k.key).is_err());
        assert!(matches!(store.revoke("nope"), Err(Error::UnknownId(_))));
        let reopened = KeyStore::open(dir.path()).unwrap();
        assert!(reopened.authenticate(&k.key).is_err());
        assert_eq!(reopened.list().len(), 1);
    }

    #[test]
    fn damaged_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server.secret"), b"short").unwrap();
        assert!(matches!(KeyStore::open(dir.path()), Err(Error::Corrupt(_))));
        std::fs::remove_file(dir.path().join("server.secret")).unwrap();
        std::fs::write(dir.path().join("keys.json"), b"{not json").unwrap();
        assert!(matches!(KeyStore::open(dir.path()), Err(Error::Corrupt(_))));
    }
}

//! App secrets at rest: values are sealed with XChaCha20-Poly1305 under a
//! key kept beside the RIB (`secrets.key`, 32 random bytes, mode 0600),
//! so the RIB file alone does not reveal them. Each value is sealed with a
//! fresh random nonce, stored in front of the ciphertext, and bound to its
//! app and name (as associated data), so a sealed value copied to another
//! row does not open.
//!
//! [`ClusterKey`], the credential the parts of one cluster present to each
//! other, lives here too: it is kept the same way.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use std::path::Path;

const NONCE_LEN: usize = 24;
/// Keys' and the cluster credential's length, in bytes.
const KEY_LEN: usize = 32;

/// The "app" under which custom certificates' private keys are sealed,
/// with the hostname as the name.
pub const CERTIFICATE_KEYS: &str = "certificates";

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("key {path}: {source}")]
    Key {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key {0}: must be exactly 32 bytes")]
    BadKey(String),
    #[error("secret {0} does not open with this key (wrong key or tampered row)")]
    Open(String),
}

/// Seals and opens secret values.
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl SecretBox {
    /// Loads the key at `path`, creating it (mode 0600) if missing.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        let cipher = XChaCha20Poly1305::new_from_slice(&key_file(path)?)
            .map_err(|_| SecretError::BadKey(path.display().to_string()))?;
        Ok(Self { cipher })
    }

    /// Seals `value` for `app`'s secret `name`.
    pub fn seal(&self, app: &str, name: &str, value: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = format!("{app}/{name}");
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: aad.as_bytes(),
                },
            )
            .expect("sealing in memory cannot fail");
        [nonce.as_slice(), &sealed].concat()
    }

    /// Opens what [`SecretBox::seal`] sealed for the same app and name.
    pub fn open(&self, app: &str, name: &str, sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        let fail = || SecretError::Open(format!("{app}/{name}"));
        if sealed.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let aad = format!("{app}/{name}");
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| fail())
    }
}

/// The cluster credential: the secret every part of one cluster presents
/// to the others (flaps and proxies to flyd, a proxy to its peers), kept in
/// `cluster.key` (32 random bytes, mode 0600) in the data dir and presented
/// as hex. Copy the file to a host to let it into the cluster.
pub struct ClusterKey {
    token: String,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// Loads the credential at `path` (32 random bytes, presented as hex),
    /// creating it (mode 0600) if missing.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        let key = key_file(path)?;
        if key.len() != KEY_LEN {
            return Err(SecretError::BadKey(path.display().to_string()));
        }
        Ok(Self {
            token: key.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// The credential, to present.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Whether `presented` is the credential, compared in time that does
    /// not depend on where they differ.
    pub fn admits(&self, presented: &[u8]) -> bool {
        let ours = self.token.as_bytes();
        presented.len() == ours.len()
            && presented
                .iter()
                .zip(ours)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }

    /// Whether an `Authorization` header's value carries the credential
    /// (`Bearer <credential>`).
    pub fn admits_bearer(&self, header: Option<&[u8]>) -> bool {
        header
            .and_then(|h| h.strip_prefix(b"Bearer "))
            .is_some_and(|t| self.admits(t))
    }
}

/// The key kept at `path`, or a new one of [`KEY_LEN`] random bytes written
/// there (mode 0600) when there is none.
fn key_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    let io = |source| SecretError::Key {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = vec![0u8; KEY_LEN];
            rand::rng().fill_bytes(&mut key);
            write_private(path, &key).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Creates `path` with `bytes`, readable by the owner only. Not
/// [`crate::files::write_atomically`], which replaces: a key, once made,
/// must never be replaced (what it sealed would be lost), so a second
/// creator fails instead.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_refuses_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let sb = SecretBox::load_or_create(&path).unwrap();
        let sealed = sb.seal("app", "DB_URL", b"postgres://x");
        assert!(
            !sealed.windows(8).any(|w| w == b"postgres"),
            "value stored in clear"
        );
        assert_eq!(sb.open("app", "DB_URL", &sealed).unwrap(), b"postgres://x");
        // Same key after reload; bound to its row.
        let again = SecretBox::load_or_create(&path).unwrap();
        assert_eq!(
            again.open("app", "DB_URL", &sealed).unwrap(),
            b"postgres://x"
        );
        assert!(again.open("other", "DB_URL", &sealed).is_err());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(again.open("app", "DB_URL", &tampered).is_err());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Another key does not open it.
        let other = SecretBox::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("app", "DB_URL", &sealed).is_err());
    }

    #[test]
    fn the_cluster_key_is_created_private_and_admits_only_itself() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let key = ClusterKey::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = ClusterKey::load_or_create(&path).unwrap();
        assert_eq!(key.token(), again.token());
        let bearer = format!("Bearer {}", key.token());
        assert!(key.admits_bearer(Some(bearer.as_bytes())));
        assert!(!key.admits_bearer(None));
        assert!(!key.admits_bearer(Some(key.token().as_bytes())));
        assert!(!key.admits_bearer(Some(&bearer.as_bytes()[..bearer.len() - 1])));
        let mut wrong = bearer.into_bytes();
        *wrong.last_mut().unwrap() ^= 1;
        assert!(!key.admits_bearer(Some(&wrong)));
        std::fs::write(&path, "short").unwrap();
        assert!(ClusterKey::load_or_create(&path).is_err());
    }
}

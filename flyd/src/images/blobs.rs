//! [`Blobs`]: content-addressed storage of image blobs (manifests'
//! configs and layers, as the registry served them), shared by every image
//! on the host. A blob is written under `tmp/` and renamed to
//! `blobs/sha256/<hex>` only once its digest is checked, so a blob in
//! place is always whole and true to its name.

use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The blob directory of an image store.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
    tmp: PathBuf,
}

/// The hex part of a `sha256:<hex>` digest, when it is one.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(hex)
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Blobs {
    /// Blobs under `dir`, staged in `tmp` (on the same file system).
    pub fn new(dir: PathBuf, tmp: PathBuf) -> Self {
        Self { dir, tmp }
    }

    /// Where the blob `digest` lives (whether or not it is there yet).
    /// `None` for anything but a well-formed sha256 digest, so a digest
    /// from a manifest can never name a path of its own choosing.
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|hex| self.dir.join("sha256").join(hex))
    }

    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_some_and(|p| p.is_file())
    }

    /// A new staging file (in `tmp`), for a blob being fetched.
    pub fn stage(&self) -> io::Result<(PathBuf, std::fs::File)> {
        let path = self.tmp.join(format!("blob-{}", ulid::Ulid::new()));
        let file = super::private_file(&path)?;
        Ok((path, file))
    }

    /// Moves the staged file at `staged` into place as `digest`, after
    /// hashing it: a file whose content is not `digest` is removed and
    /// reported as `Err(actual digest)`.
    pub fn adopt(&self, staged: &Path, digest: &str) -> io::Result<Result<(), String>> {
        let Some(target) = self.path(digest) else {
            let _ = std::fs::remove_file(staged);
            return Ok(Err(format!("{digest:?} is not a sha256 digest")));
        };
        let actual = hash_file(staged)?;
        if actual != digest {
            let _ = std::fs::remove_file(staged);
            return Ok(Err(actual));
        }
        std::fs::File::open(staged)?.sync_all()?;
        super::private_dir(target.parent().expect("blob paths have a parent"))?;
        std::fs::rename(staged, &target)?;
        Ok(Ok(()))
    }

    /// Stores `bytes` (a config, or a layer Hangar assembled) and returns
    /// its digest.
    pub fn put(&self, bytes: &[u8]) -> io::Result<String> {
        let digest = digest_of(bytes);
        if self.has(&digest) {
            return Ok(digest);
        }
        let (staged, mut file) = self.stage()?;
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
        match self.adopt(&staged, &digest)? {
            Ok(()) => Ok(digest),
            Err(actual) => Err(io::Error::other(format!(
                "blob {digest} changed while stored (now {actual})"
            ))),
        }
    }

    /// The blob's content, read whole (configs and manifests: small).
    pub fn read(&self, digest: &str) -> io::Result<Vec<u8>> {
        let path = self
            .path(digest)
            .ok_or_else(|| io::Error::other(format!("{digest:?} is not a sha256 digest")))?;
        std::fs::read(path)
    }

    /// Opens the blob for reading (layers: streamed).
    pub fn open(&self, digest: &str) -> io::Result<std::fs::File> {
        let path = self
            .path(digest)
            .ok_or_else(|| io::Error::other(format!("{digest:?} is not a sha256 digest")))?;
        std::fs::File::open(path)
    }

    /// Removes the blob; one already gone is fine.
    pub fn remove(&self, digest: &str) -> io::Result<()> {
        let Some(path) = self.path(digest) else {
            return Ok(());
        };
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every stored blob's digest.
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("sha256")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(|hex| format!("sha256:{hex}")))
            .collect()
    }
}

/// `sha256:<hex>` of the file at `path`.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hash.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_named_by_their_content_and_checked_before_they_land() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("tmp")).unwrap();
        let blobs = Blobs::new(tmp.path().join("blobs"), tmp.path().join("tmp"));
        let digest = blobs.put(b"layer").unwrap();
        assert_eq!(digest, digest_of(b"layer"));
        assert_eq!(blobs.read(&digest).unwrap(), b"layer");
        assert_eq!(blobs.list(), std::slice::from_ref(&digest));

        let (staged, mut file) = blobs.stage().unwrap();
        file.write_all(b"not what the manifest said").unwrap();
        let wrong = blobs.adopt(&staged, &digest_of(b"other")).unwrap();
        assert_eq!(wrong, Err(digest_of(b"not what the manifest said")));
        assert!(!staged.exists(), "a blob that fails its digest is not kept");
        assert!(!blobs.has(&digest_of(b"other")));

        blobs.remove(&digest).unwrap();
        blobs.remove(&digest).unwrap();
        assert!(!blobs.has(&digest));
    }

    #[test]
    fn only_sha256_digests_name_paths() {
        let blobs = Blobs::new("/b".into(), "/t".into());
        for bad in [
            "sha256:../../etc/passwd",
            "md5:abc",
            "sha256:ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789",
            "sha256:abc",
        ] {
            assert_eq!(blobs.path(bad), None, "{bad}");
        }
        let good = digest_of(b"");
        assert!(blobs.path(&good).unwrap().starts_with("/b/sha256"));
    }
}

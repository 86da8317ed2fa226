//! `hangar images import`: images from an archive, for hosts without a
//! registry. Two formats, plain or gzipped:
//!
//! - an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`),
//!   as `docker save` (25 and later), `skopeo copy oci-archive:` or
//!   `buildah push` write it; image names come from the
//!   `io.containerd.image.name` or a full `org.opencontainers.image.ref.name`
//!   annotation;
//! - a `docker save` archive of the older kind (`manifest.json` naming each
//!   image's config and layer files, with `RepoTags`), for which an OCI
//!   manifest is written here.
//!
//! The archive is read once, front to back: every file goes into the blob
//! store under its content's digest (a file under `blobs/sha256/` must
//! match its name), the small metadata files are kept in memory, and the
//! images are then put together from the blobs. Blobs no image uses are
//! removed at the end.

use super::blobs::{digest_of, hash_file, sha256_hex};
use super::{ImageError, ImageRecord, Images, canonical_name};
use oci_client::Reference;
use oci_client::manifest::{OciDescriptor, OciImageIndex, OciImageManifest};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

/// Largest metadata file read into memory.
const MAX_METADATA: u64 = 4 << 20;
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// What one pass over the archive found.
#[derive(Default)]
struct Contents {
    /// Each file stored as a blob, by its path in the archive.
    files: HashMap<PathBuf, String>,
    /// Symlinks, by path, to the path they resolve to.
    links: HashMap<PathBuf, PathBuf>,
    /// `index.json` and `manifest.json`, when present.
    metadata: HashMap<String, Vec<u8>>,
}

/// `docker save`'s `manifest.json`, one entry per image.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn invalid(what: impl std::fmt::Display) -> ImageError {
    ImageError::Invalid(format!("archive: {what}"))
}

/// A path inside the archive, `..` resolved within it.
fn normal(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::ParentDir if !out.pop() => return None,
            _ => {}
        }
    }
    Some(out)
}

impl Contents {
    /// The blob behind `path`, through symlinks (bounded).
    fn blob(&self, path: &str) -> Result<String, ImageError> {
        let mut at = normal(Path::new(path)).ok_or_else(|| invalid(format!("{path:?}")))?;
        for _ in 0..16 {
            if let Some(digest) = self.files.get(&at) {
                return Ok(digest.clone());
            }
            match self.links.get(&at) {
                Some(next) => at = next.clone(),
                None => break,
            }
        }
        Err(invalid(format!("{path} is named but not in the archive")))
    }
}

impl Images {
    /// Imports every image in the archive at `path`.
    pub async fn import(&self, path: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let _one = self.storing.lock().await;
        let (blobs, path2) = (self.blobs.clone(), path.to_path_buf());
        let contents = tokio::task::spawn_blocking(move || read_archive(&blobs, &path2))
            .await
            .map_err(|e| ImageError::Io(format!("reading the archive: {e}")))??;
        let result = self.assemble(&contents).await;
        // Files that are not part of an image (docker's per-layer `json`
        // and `VERSION`, other platforms) are not kept.
        self.sweep_blobs()?;
        result
    }

    async fn assemble(&self, contents: &Contents) -> Result<Vec<ImageRecord>, ImageError> {
        // (names, manifest digest, manifest)
        let mut found: Vec<(Vec<String>, String, OciImageManifest)> = Vec::new();
        if let Some(index) = contents.metadata.get("index.json") {
            let index: OciImageIndex =
                serde_json::from_slice(index).map_err(|e| invalid(format!("index.json: {e}")))?;
            for entry in &index.manifests {
                let names = entry_names(entry.annotations.as_ref());
                self.manifests_of(&entry.media_type, &entry.digest, names, &mut found)?;
            }
        } else if let Some(list) = contents.metadata.get("manifest.json") {
            let entries: Vec<DockerEntry> =
                serde_json::from_slice(list).map_err(|e| invalid(format!("manifest.json: {e}")))?;
            for entry in entries {
                let (digest, manifest) = self.docker_manifest(contents, &entry)?;
                let names = entry
                    .repo_tags
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|t| canonical_name(t))
                    .collect();
                found.push((names, digest, manifest));
            }
        } else {
            return Err(invalid(
                "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
            ));
        }
        if found.is_empty() {
            return Err(invalid("no image for this host's platform in it"));
        }
        let mut imported = Vec::new();
        for (names, digest, manifest) in found {
            let config = self
                .blobs
                .read(&manifest.config.digest)
                .map_err(|_| invalid(format!("config {} is missing", manifest.config.digest)))?;
            for layer in &manifest.layers {
                if !self.blobs.has(&layer.digest) {
                    return Err(invalid(format!("layer {} is missing", layer.digest)));
                }
            }
            let first = names.first().and_then(|n| n.parse::<Reference>().ok());
            let (registry, repository) = first
                .map(|r| (r.registry().to_string(), r.repository().to_string()))
                .unwrap_or_default();
            let label = names.first().cloned().unwrap_or_else(|| digest.clone());
            if self.ready(&digest).is_none() {
                let record =
                    self.record(&label, &registry, &repository, &digest, &manifest, &config)?;
                self.unpack(&record).await?;
                self.insert(record)?;
            }
            for name in &names {
                self.name(&digest, name)?;
            }
            imported.extend(self.get(&digest));
        }
        Ok(imported)
    }

    /// The image manifests under `digest` (a manifest, or an index whose
    /// entries for this platform are followed).
    fn manifests_of(
        &self,
        media_type: &str,
        digest: &str,
        names: Vec<String>,
        found: &mut Vec<(Vec<String>, String, OciImageManifest)>,
    ) -> Result<(), ImageError> {
        let bytes = self
            .blobs
            .read(digest)
            .map_err(|_| invalid(format!("{digest} is named in index.json but missing")))?;
        if INDEX_TYPES.contains(&media_type) {
            let index: OciImageIndex =
                serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{digest}: {e}")))?;
            let chosen = oci_client::client::current_platform_resolver(&index.manifests)
                .ok_or_else(|| invalid(format!("{digest} has no image for this platform")))?;
            let entry = index
                .manifests
                .iter()
                .find(|m| m.digest == chosen)
                .expect("the resolver picks an entry");
            // Nested indexes are not followed further.
            if INDEX_TYPES.contains(&entry.media_type.as_str()) {
                return Err(invalid(format!("{digest}: an index inside an index")));
            }
            return self.manifests_of(&entry.media_type, &entry.digest, names, found);
        }
        let manifest: OciImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{digest}: {e}")))?;
        found.push((names, digest.to_string(), manifest));
        Ok(())
    }

    /// An OCI manifest for one image of an older `docker save` archive,
    /// stored as a blob.
    fn docker_manifest(
        &self,
        contents: &Contents,
        entry: &DockerEntry,
    ) -> Result<(String, OciImageManifest), ImageError> {
        let config = contents.blob(&entry.config)?;
        let descriptor = |digest: String, media_type: &str| -> Result<OciDescriptor, ImageError> {
            let path = self.blobs.path(&digest).expect("stored blobs have paths");
            let size = std::fs::metadata(&path)
                .map_err(|e| ImageError::from_io("reading a blob", e))?
                .len();
            Ok(OciDescriptor {
                media_type: media_type.to_string(),
                digest,
                size: size as i64,
                urls: None,
                annotations: None,
            })
        };
        let mut layers = Vec::new();
        for layer in &entry.layers {
            let digest = contents.blob(layer)?;
            let media_type = if self.gzipped(&digest)? {
                OCI_LAYER_GZIP
            } else {
                OCI_LAYER
            };
            layers.push(descriptor(digest, media_type)?);
        }
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            config: descriptor(config, OCI_CONFIG)?,
            layers,
            subject: None,
            artifact_type: None,
            annotations: None,
        };
        let bytes = serde_json::to_vec(&manifest).expect("manifests serialize");
        let digest = self
            .blobs
            .put(&bytes)
            .map_err(|e| ImageError::from_io("storing a manifest", e))?;
        debug_assert_eq!(digest, digest_of(&bytes));
        Ok((digest, manifest))
    }

    fn gzipped(&self, digest: &str) -> Result<bool, ImageError> {
        let mut file = self
            .blobs
            .open(digest)
            .map_err(|e| ImageError::from_io("reading a layer", e))?;
        let mut magic = [0u8; 2];
        Ok(file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b])
    }
}

/// Full image names an index entry's annotations give.
fn entry_names(annotations: Option<&BTreeMap<String, String>>) -> Vec<String> {
    let Some(a) = annotations else {
        return Vec::new();
    };
    [
        "io.containerd.image.name",
        "org.opencontainers.image.ref.name",
    ]
    .iter()
    .filter_map(|key| a.get(*key))
    // A bare tag (`latest`, as `ref.name` often is) names no image.
    .filter(|name| name.contains('/') || name.contains(':'))
    .filter_map(|name| canonical_name(name))
    .take(1)
    .collect()
}

/// Reads the archive once, storing every file as a blob.
fn read_archive(blobs: &super::blobs::Blobs, path: &Path) -> Result<Contents, ImageError> {
    let file =
        std::fs::File::open(path).map_err(|e| ImageError::from_io("opening the archive", e))?;
    let mut reader = BufReader::new(file);
    let gzip = reader
        .fill_buf()
        .map_err(|e| ImageError::from_io("reading the archive", e))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(reader);
    let mut contents = Contents::default();
    let unreadable = |e: io::Error| invalid(format!("not a readable tar archive: {e}"));
    let entries = archive.entries().map_err(unreadable)?;
    for entry in entries {
        let mut entry = entry.map_err(unreadable)?;
        let raw = entry.path().map_err(invalid)?.into_owned();
        let Some(at) = normal(&raw) else {
            return Err(invalid(format!(
                "{} climbs out of the archive",
                raw.display()
            )));
        };
        match entry.header().entry_type() {
            tar::EntryType::Symlink => {
                let target = entry.link_name().map_err(invalid)?.unwrap_or_default();
                let resolved = at.parent().unwrap_or(Path::new("")).join(target);
                if let Some(resolved) = normal(&resolved) {
                    contents.links.insert(at, resolved);
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let name = at.to_string_lossy().into_owned();
                if matches!(
                    name.as_str(),
                    "index.json" | "manifest.json" | "oci-layout" | "repositories"
                ) {
                    let mut bytes = Vec::new();
                    (&mut entry)
                        .take(MAX_METADATA + 1)
                        .read_to_end(&mut bytes)
                        .map_err(invalid)?;
                    if bytes.len() as u64 > MAX_METADATA {
                        return Err(invalid(format!("{name} is too large")));
                    }
                    contents.metadata.insert(name, bytes);
                    continue;
                }
                let (staged, mut out) = blobs
                    .stage()
                    .map_err(|e| ImageError::from_io("staging a blob", e))?;
                let copied = io::copy(&mut entry, &mut out);
                drop(out);
                if let Err(e) = copied {
                    let _ = std::fs::remove_file(&staged);
                    return Err(ImageError::from_io("reading the archive", e));
                }
                // A file under blobs/ must be what its name says.
                let named = at
                    .strip_prefix("blobs")
                    .ok()
                    .and_then(|p| p.to_str())
                    .and_then(|p| p.strip_prefix("sha256/"))
                    .map(|hex| format!("sha256:{hex}"));
                let digest = match named {
                    Some(d) if sha256_hex(&d).is_some() => d,
                    Some(d) => {
                        let _ = std::fs::remove_file(&staged);
                        return Err(invalid(format!("{d:?} is not a sha256 digest")));
                    }
                    None => {
                        hash_file(&staged).map_err(|e| ImageError::from_io("hashing a blob", e))?
                    }
                };
                match blobs.adopt(&staged, &digest) {
                    Ok(Ok(())) => {}
                    Ok(Err(actual)) => {
                        return Err(ImageError::DigestMismatch {
                            image: path.display().to_string(),
                            expected: digest,
                            actual,
                        });
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&staged);
                        return Err(ImageError::from_io("storing a blob", e));
                    }
                }
                contents.files.insert(at, digest);
            }
            _ => {}
        }
    }
    Ok(contents)
}

//! [`Images`]: the host's OCI images, pulled from registries or imported
//! from archives, stored once and unpacked once for every machine that
//! runs them.
//!
//! ```text
//! <data dir>/images/            (mode 0700: nothing in it is the workloads')
//!   index.json                  every image: digest, names, layers, config
//!   blobs/sha256/<hex>          configs and layers, as served (blobs.rs)
//!   rootfs/<hex>/               an image unpacked, owners shifted (unpack.rs)
//!   tmp/                        blobs and roots on their way in; emptied at open
//! ```
//!
//! An image is known by its manifest's digest; its names (`registry/
//! repo:tag`) point at one digest each. A blob or a root lands in place
//! only once it is whole (a rename from `tmp/`) and the index is written
//! after both, so a crash at any point leaves either the image whole or
//! nothing but `tmp/`, which the next open clears.
//!
//! - [`blobs`]: content-addressed blob storage.
//! - [`registry`]: pulling through `oci-client`.
//! - [`archive`]: importing an OCI layout or a `docker save` archive.
//! - [`builtin`]: `hangar/echo`, assembled here without a registry.
//! - [`unpack`]: applying a layer inside a root it cannot leave.

pub mod archive;
pub mod blobs;
pub mod builtin;
pub mod registry;
pub mod unpack;

use blobs::Blobs;
use oci_client::Reference;
use oci_client::config::ConfigFile;
use oci_client::manifest::OciImageManifest;
use parking_lot::Mutex;
use registry::{Registries, RegistryConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
pub use unpack::IdShift;

/// The `[flyd.images]` config table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesConfig {
    /// The first host id of the range machines' ids map to (65536 ids):
    /// an image's root user is this id on the host.
    pub id_base: u32,
    /// Credentials and protocol per registry, by `host[:port]`.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// An image no machine has used for this long is removed (0: never;
    /// `hangar images prune` removes them at once).
    pub collect_unused_after_s: u64,
    /// Testing only, set from `flyd.crash_at`: `"image/<point>"` kills the
    /// process there (`fetched`: blobs stored, nothing unpacked;
    /// `unpacking`: one layer applied; `unpacked`: the root in place, the
    /// index not written).
    #[serde(skip)]
    pub crash_at: Option<String>,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            id_base: 1_000_000_000,
            registries: BTreeMap::new(),
            collect_unused_after_s: 86_400,
            crash_at: None,
        }
    }
}

/// Ids each machine has: root and the usual 65535 others.
pub const IDS_PER_MACHINE: u32 = 65536;

/// Why an image could not be had, or removed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    #[error("image {image:?} is not a valid reference: {reason}")]
    BadReference { image: String, reason: String },
    #[error("image {0} was not found in its registry")]
    NotFound(String),
    #[error(
        "registry {registry} refused access to image {image} (check the credentials in [flyd.images.registries])"
    )]
    Unauthorized { image: String, registry: String },
    #[error("registry {registry} is unreachable: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("registry {registry} failed: {reason}")]
    Registry { registry: String, reason: String },
    #[error("image {image}: content {expected} arrived with digest {actual}")]
    DigestMismatch {
        image: String,
        expected: String,
        actual: String,
    },
    /// A manifest, config, layer or archive that is malformed, or asks for
    /// something Hangar does not do.
    #[error("{0}")]
    Invalid(String),
    #[error("disk full while {0}")]
    DiskFull(String),
    #[error("no image {0} on this host")]
    Unknown(String),
    #[error("image {image} is used by machine(s) {machines}")]
    InUse { image: String, machines: String },
    #[error("{0}")]
    Io(String),
}

impl ImageError {
    /// An I/O failure while `doing`, a full disk told apart.
    pub fn from_io(doing: &str, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::QuotaExceeded {
            Self::DiskFull(doing.to_string())
        } else {
            Self::Io(format!("{doing}: {e}"))
        }
    }

    fn from_unpack(image: &str, e: unpack::UnpackError) -> Self {
        if e.is_disk_full() {
            return Self::DiskFull(format!("unpacking image {image}"));
        }
        match e {
            unpack::UnpackError::Refused(reason) => {
                Self::Invalid(format!("image {image}: {reason}"))
            }
            io => Self::Io(format!("unpacking image {image}: {io}")),
        }
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadReference { .. } => 400,
            Self::Unknown(_) => 404,
            Self::InUse { .. } => 409,
            Self::NotFound(_) | Self::Unauthorized { .. } | Self::Invalid(_) => 422,
            Self::Unreachable { .. } | Self::Registry { .. } | Self::DigestMismatch { .. } => 502,
            Self::DiskFull(_) => 507,
            Self::Io(_) => 500,
        }
    }
}

/// What of an image's config a machine runs with (OCI image config
/// `config`: Entrypoint, Cmd, Env, WorkingDir, User, StopSignal, Labels).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub stop_signal: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl RunConfig {
    fn of(config: &ConfigFile) -> Self {
        let Some(c) = &config.config else {
            return Self::default();
        };
        Self {
            entrypoint: c.entrypoint.clone().unwrap_or_default(),
            cmd: c.cmd.clone().unwrap_or_default(),
            env: c.env.clone().unwrap_or_default(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            user: c.user.clone().unwrap_or_default(),
            stop_signal: c.stop_signal.clone(),
            labels: c.labels.clone().unwrap_or_default().into_iter().collect(),
        }
    }
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The blob as stored (compressed or not).
    pub digest: String,
    /// The uncompressed tar's digest, from the image config.
    pub diff_id: String,
    pub size: u64,
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The manifest's digest: the image's identity.
    pub digest: String,
    /// Names pointing at it (`registry/repository:tag`).
    pub names: BTreeSet<String>,
    /// Where it came from.
    pub registry: String,
    pub repository: String,
    pub config_digest: String,
    pub layers: Vec<LayerRecord>,
    pub config: RunConfig,
    /// Bytes of its blobs.
    pub size: u64,
    pub stored_at: String,
}

impl ImageRecord {
    /// The `image_ref` of a machine that asked for `name` and got this.
    pub fn image_ref(&self, name: &str) -> hangar_api::machine::ImageRef {
        let tag = name
            .parse::<Reference>()
            .ok()
            .and_then(|r| r.tag().map(str::to_string))
            .unwrap_or_default();
        hangar_api::machine::ImageRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag,
            digest: self.digest.clone(),
            labels: self.config.labels.clone(),
        }
    }
}

/// What `index.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// The id base the roots were unpacked with (0: owners not set, by an
    /// unprivileged flyd): roots of another are unpacked again.
    id_base: u32,
    images: BTreeMap<String, ImageRecord>,
    /// Images held by [`ImagePin`]s: machines being created or updated on
    /// them, not recorded yet, so no removal may take them.
    #[serde(skip)]
    pins: HashMap<String, usize>,
}

/// Keeps an image from being removed while it is held (from the moment
/// a create or update has it until the machine's record names it).
#[must_use]
pub struct ImagePin {
    index: Arc<Mutex<Index>>,
    digest: String,
}

impl Drop for ImagePin {
    fn drop(&mut self) {
        let mut index = self.index.lock();
        if let Some(n) = index.pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                index.pins.remove(&self.digest);
            }
        }
    }
}

/// The host's images.
pub struct Images {
    dir: PathBuf,
    blobs: Blobs,
    ids: IdShift,
    registries: Registries,
    index: Arc<Mutex<Index>>,
    /// One fetch or unpack at a time: two machines asking for one image
    /// unpack it once.
    storing: tokio::sync::Mutex<()>,
    /// The digest of `hangar/echo` as this process assembled it.
    echo: std::sync::OnceLock<String>,
    crash_at: Option<String>,
}

impl Images {
    /// Opens (or makes) the store in `dir`, clearing what a crash left in
    /// `tmp/` and any root the index does not name.
    pub fn open(dir: &Path, config: &ImagesConfig) -> Result<Self, ImageError> {
        let fail = |e| ImageError::from_io("opening the image store", e);
        private_dir(dir).map_err(fail)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        }
        let tmp = dir.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        for sub in [&tmp, &dir.join("blobs/sha256"), &dir.join("rootfs")] {
            private_dir(sub).map_err(fail)?;
        }
        let ids = IdShift {
            base: config.id_base,
            size: IDS_PER_MACHINE,
            owners: nix::unistd::geteuid().is_root(),
        };
        // What the roots' owners are: shifted by the base, or (unprivileged)
        // left as 0, so a change either way unpacks them again.
        let owned_by = if ids.owners { ids.base } else { 0 };
        let mut index: Index = match std::fs::read(dir.join("index.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ImageError::Io(format!("{}/index.json does not decode: {e}", dir.display()))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index {
                id_base: owned_by,
                ..Index::default()
            },
            Err(e) => return Err(fail(e)),
        };
        let keep: HashSet<String> = if index.id_base == owned_by {
            index
                .images
                .keys()
                .filter_map(|d| blobs::sha256_hex(d).map(str::to_string))
                .collect()
        } else {
            index.id_base = owned_by;
            HashSet::new() // every root is unpacked again, for the new ids
        };
        for entry in std::fs::read_dir(dir.join("rootfs"))
            .map_err(fail)?
            .flatten()
        {
            if !entry.file_name().to_str().is_some_and(|n| keep.contains(n)) {
                std::fs::remove_dir_all(entry.path()).map_err(fail)?;
            }
        }
        let images = Self {
            dir: dir.to_path_buf(),
            blobs: Blobs::new(dir.join("blobs"), tmp),
            ids,
            registries: Registries::new(config.registries.clone())?,
            index: Arc::new(Mutex::new(index)),
            storing: tokio::sync::Mutex::new(()),
            echo: std::sync::OnceLock::new(),
            crash_at: config.crash_at.clone(),
        };
        // Blobs of a pull a crash cut short.
        images.sweep_blobs()?;
        Ok(images)
    }

    /// Removes every blob no image in the index uses.
    fn sweep_blobs(&self) -> Result<(), ImageError> {
        let used: std::collections::HashSet<String> = self
            .index
            .lock()
            .images
            .values()
            .flat_map(|r| {
                r.layers
                    .iter()
                    .map(|l| l.digest.clone())
                    .chain([r.config_digest.clone()])
            })
            .collect();
        for blob in self.blobs.list() {
            if !used.contains(&blob) {
                self.blobs
                    .remove(&blob)
                    .map_err(|e| ImageError::from_io("removing a blob", e))?;
            }
        }
        Ok(())
    }

    /// Kills this process at the configured crash point (tests only).
    fn failpoint(&self, point: &str) {
        if self.crash_at.as_deref() == Some(&format!("image/{point}")) {
            crash(point);
        }
    }

    /// Where uploads are staged: on the store's file system, cleared at
    /// open.
    pub fn staging(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// The ids machines' ids map to.
    pub fn ids(&self) -> IdShift {
        self.ids
    }

    /// Where the root of image `digest` is unpacked (whether or not it is).
    pub fn rootfs_path(&self, digest: &str) -> Option<PathBuf> {
        blobs::sha256_hex(digest).map(|hex| self.dir.join("rootfs").join(hex))
    }

    /// The image `digest`, if stored.
    pub fn get(&self, digest: &str) -> Option<ImageRecord> {
        self.index.lock().images.get(digest).cloned()
    }

    /// Every image, newest first.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut all: Vec<ImageRecord> = self.index.lock().images.values().cloned().collect();
        all.sort_by(|a, b| b.stored_at.cmp(&a.stored_at));
        all
    }

    /// The image a name, a digest or a digest's first 12+ hex digits
    /// stands for.
    pub fn find(&self, what: &str) -> Option<ImageRecord> {
        let index = self.index.lock();
        if let Some(rec) = index.images.get(what) {
            return Some(rec.clone());
        }
        let name = canonical_name(what);
        let hex = what.strip_prefix("sha256:").unwrap_or(what);
        index
            .images
            .values()
            .find(|rec| {
                rec.names.contains(what)
                    || name.as_ref().is_some_and(|n| rec.names.contains(n))
                    || (hex.len() >= 12
                        && blobs::sha256_hex(&rec.digest).is_some_and(|h| h.starts_with(hex)))
            })
            .cloned()
    }

    /// The image `image` names, held until the pin drops: the built-in
    /// one, the copy on this host when there is one (as `docker run` does:
    /// deploys name new tags or digests, and an imported image needs no
    /// registry), else pulled from its registry.
    pub async fn pull(&self, image: &str) -> Result<(ImageRecord, ImagePin), ImageError> {
        if image == hangar_api::machine::ECHO_IMAGE {
            return self.builtin_echo().await;
        }
        let reference = parse(image)?;
        let here = match reference.digest() {
            Some(digest) => self.pinned(digest),
            None => self
                .find(&reference.whole())
                .and_then(|rec| self.pinned(&rec.digest)),
        };
        match here {
            Some(held) => Ok(held),
            None => self.fetch(&reference).await,
        }
    }

    /// Pulls `image` from its registry even when a copy is here: `hangar
    /// images pull`, to move a name to what its registry has now.
    pub async fn refresh(&self, image: &str) -> Result<(ImageRecord, ImagePin), ImageError> {
        if image == hangar_api::machine::ECHO_IMAGE {
            return self.builtin_echo().await;
        }
        self.fetch(&parse(image)?).await
    }

    async fn fetch(&self, reference: &Reference) -> Result<(ImageRecord, ImagePin), ImageError> {
        let image = reference.whole();
        let fetched = self.registries.manifest(reference).await?;
        let _one = self.storing.lock().await;
        if self.ready(&fetched.digest).is_none() {
            let stored = async {
                for layer in &fetched.manifest.layers {
                    self.registries.blob(reference, layer, &self.blobs).await?;
                }
                self.failpoint("fetched");
                let record = self.record(
                    &image,
                    reference.registry(),
                    reference.repository(),
                    &fetched.digest,
                    &fetched.manifest,
                    &fetched.config,
                )?;
                self.unpack(&record).await?;
                self.insert(record)
            }
            .await;
            if let Err(e) = stored {
                // A failed pull leaves nothing, not even the blobs that
                // did arrive whole.
                if let Err(sweep) = self.sweep_blobs() {
                    tracing::warn!(error = %sweep, "removing a failed pull's blobs");
                }
                return Err(e);
            }
        }
        if reference.digest().is_none() {
            self.name(&fetched.digest, &image)?;
        }
        self.pinned(&fetched.digest)
            .ok_or_else(|| ImageError::Io(format!("image {image} vanished while stored")))
    }

    /// The stored image `digest`, once its root is unpacked.
    fn ready(&self, digest: &str) -> Option<ImageRecord> {
        let rec = self.get(digest)?;
        self.rootfs_path(digest)?.is_dir().then_some(rec)
    }

    /// The stored image `digest`, held until the pin drops.
    fn pinned(&self, digest: &str) -> Option<(ImageRecord, ImagePin)> {
        let mut index = self.index.lock();
        let rec = index.images.get(digest)?.clone();
        if !self.rootfs_path(digest)?.is_dir() {
            return None;
        }
        *index.pins.entry(digest.to_string()).or_default() += 1;
        let pin = ImagePin {
            index: self.index.clone(),
            digest: digest.to_string(),
        };
        Some((rec, pin))
    }

    /// A record for a manifest whose blobs are stored, its config checked.
    fn record(
        &self,
        image: &str,
        registry: &str,
        repository: &str,
        digest: &str,
        manifest: &OciImageManifest,
        config: &[u8],
    ) -> Result<ImageRecord, ImageError> {
        let config_digest = self
            .blobs
            .put(config)
            .map_err(|e| ImageError::from_io("storing an image config", e))?;
        if config_digest != manifest.config.digest {
            return Err(ImageError::DigestMismatch {
                image: image.to_string(),
                expected: manifest.config.digest.clone(),
                actual: config_digest,
            });
        }
        let parsed: ConfigFile = serde_json::from_slice(config)
            .map_err(|e| ImageError::Invalid(format!("image {image}: its config: {e}")))?;
        let diff_ids = &parsed.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Invalid(format!(
                "image {image}: {} layers but {} diff ids in its config",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        let layers: Vec<LayerRecord> = manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| LayerRecord {
                digest: l.digest.clone(),
                diff_id: diff_id.clone(),
                size: u64::try_from(l.size).unwrap_or(0),
            })
            .collect();
        let size = layers.iter().map(|l| l.size).sum::<u64>() + config.len() as u64;
        Ok(ImageRecord {
            digest: digest.to_string(),
            names: BTreeSet::new(),
            registry: registry.to_string(),
            repository: repository.to_string(),
            config_digest,
            layers,
            config: RunConfig::of(&parsed),
            size,
            stored_at: crate::record::now_rfc3339(),
        })
    }

    /// Unpacks the image's layers into `rootfs/<hex>`, each checked
    /// against its diff id, by way of `tmp/`.
    async fn unpack(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let target = self
            .rootfs_path(&rec.digest)
            .ok_or_else(|| ImageError::Invalid(format!("{:?} is not a digest", rec.digest)))?;
        if target.is_dir() {
            return Ok(());
        }
        let staging = self
            .dir
            .join("tmp")
            .join(format!("rootfs-{}", ulid::Ulid::new()));
        let (blobs, ids, rec2, staging2) =
            (self.blobs.clone(), self.ids, rec.clone(), staging.clone());
        let crash = self.crash_at.as_deref() == Some("image/unpacking");
        let unpacked = tokio::task::spawn_blocking(move || {
            unpack_layers(&blobs, ids, &rec2, &staging2, crash)
        })
        .await
        .map_err(|e| ImageError::Io(format!("unpacking: {e}")))
        .and_then(|r| r);
        let landed = unpacked.and_then(|()| {
            std::fs::rename(&staging, &target)
                .map_err(|e| ImageError::from_io("moving an unpacked image into place", e))
        });
        if landed.is_ok() {
            self.failpoint("unpacked");
        }
        if landed.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        landed
    }

    /// Adds `rec` to the index (and writes it).
    fn insert(&self, rec: ImageRecord) -> Result<(), ImageError> {
        let mut index = self.index.lock();
        let names = index
            .images
            .get(&rec.digest)
            .map(|old| old.names.clone())
            .unwrap_or_default();
        let mut rec = rec;
        rec.names.extend(names);
        index.images.insert(rec.digest.clone(), rec);
        self.save(&index)
    }

    /// Points `name` at `digest` (and at nothing else).
    fn name(&self, digest: &str, name: &str) -> Result<(), ImageError> {
        let mut index = self.index.lock();
        if index
            .images
            .get(digest)
            .is_some_and(|r| r.names.contains(name))
        {
            return Ok(());
        }
        for rec in index.images.values_mut() {
            rec.names.remove(name);
        }
        if let Some(rec) = index.images.get_mut(digest) {
            rec.names.insert(name.to_string());
        }
        self.save(&index)
    }

    /// Writes the index: a new file, synced, renamed over the old.
    fn save(&self, index: &Index) -> Result<(), ImageError> {
        let fail = |e| ImageError::from_io("writing the image index", e);
        let text = serde_json::to_vec_pretty(index).expect("the index serializes");
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("index-{}", ulid::Ulid::new()));
        let mut file = private_file(&tmp).map_err(fail)?;
        let written = io::Write::write_all(&mut file, &text).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
        std::fs::rename(&tmp, self.dir.join("index.json")).map_err(fail)
    }

    /// Removes what `what` names (see [`Images::find`]): a name is taken
    /// off its image, and an image left without names, or named by its
    /// digest, goes with its root and the blobs no other image shares.
    /// An image a machine uses (`in_use`: digest → machine ids) stays.
    pub async fn remove(
        &self,
        what: &str,
        in_use: &BTreeMap<String, Vec<String>>,
    ) -> Result<ImageRecord, ImageError> {
        let _one = self.storing.lock().await;
        let rec = self
            .find(what)
            .ok_or_else(|| ImageError::Unknown(what.to_string()))?;
        let by_name = canonical_name(what)
            .filter(|n| rec.names.contains(n))
            .or_else(|| rec.names.contains(what).then(|| what.to_string()));
        if let Some(name) = &by_name
            && rec.names.len() > 1
        {
            let mut index = self.index.lock();
            if let Some(r) = index.images.get_mut(&rec.digest) {
                r.names.remove(name);
            }
            self.save(&index)?;
            return Ok(rec);
        }
        if let Some(machines) = in_use.get(&rec.digest) {
            return Err(ImageError::InUse {
                image: what.to_string(),
                machines: machines.join(", "),
            });
        }
        if self.delete(std::slice::from_ref(&rec.digest))?.is_empty() {
            return Err(ImageError::InUse {
                image: what.to_string(),
                machines: "being created".to_string(),
            });
        }
        Ok(rec)
    }

    /// Removes every image no machine uses; returns them.
    pub async fn prune(
        &self,
        in_use: &BTreeMap<String, Vec<String>>,
        only: impl Fn(&ImageRecord) -> bool,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let _one = self.storing.lock().await;
        let unused: Vec<ImageRecord> = self
            .list()
            .into_iter()
            .filter(|rec| !in_use.contains_key(&rec.digest) && only(rec))
            .collect();
        let digests: Vec<String> = unused.iter().map(|r| r.digest.clone()).collect();
        let removed = self.delete(&digests)?;
        Ok(unused
            .into_iter()
            .filter(|rec| removed.contains(&rec.digest))
            .collect())
    }

    /// Drops images from the index, then their roots and the blobs no
    /// image left holds. The index goes first: a crash after it leaves
    /// only files no image names, which the next open or delete clears.
    /// The caller holds `storing`, so no pull is between its blobs and
    /// its index entry. A pinned image stays (checked under the index's
    /// lock, which pinning takes too). Returns the digests removed.
    fn delete(&self, digests: &[String]) -> Result<Vec<String>, ImageError> {
        let removed: Vec<String> = {
            let mut index = self.index.lock();
            let index = &mut *index;
            let removed: Vec<String> = digests
                .iter()
                .filter(|d| !index.pins.contains_key(*d) && index.images.remove(*d).is_some())
                .cloned()
                .collect();
            self.save(index)?;
            removed
        };
        for d in &removed {
            if let Some(root) = self.rootfs_path(d) {
                match std::fs::remove_dir_all(&root) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(ImageError::from_io("removing an image's root", e));
                    }
                    _ => {}
                }
            }
        }
        self.sweep_blobs()?;
        Ok(removed)
    }
}

/// Unpacks every layer of `rec` into `staging`, checking diff ids.
fn unpack_layers(
    blobs: &Blobs,
    ids: IdShift,
    rec: &ImageRecord,
    staging: &Path,
    crash_after_a_layer: bool,
) -> Result<(), ImageError> {
    let image = rec
        .names
        .first()
        .cloned()
        .unwrap_or_else(|| rec.digest.clone());
    std::fs::create_dir(staging).map_err(|e| ImageError::from_io("making a root", e))?;
    if ids.owners {
        rustix::fs::chown(
            staging,
            Some(rustix::fs::Uid::from_raw(ids.base)),
            Some(rustix::fs::Gid::from_raw(ids.base)),
        )
        .map_err(|e| ImageError::from_io("making a root", e.into()))?;
    }
    for layer in &rec.layers {
        let file = blobs
            .open(&layer.digest)
            .map_err(|e| ImageError::from_io(&format!("opening layer {}", layer.digest), e))?;
        let applied = unpack::apply(staging, io::BufReader::new(file), ids)
            .map_err(|e| ImageError::from_unpack(&image, e))?;
        if crash_after_a_layer {
            crash("unpacking");
        }
        if applied.diff_id != layer.diff_id {
            return Err(ImageError::DigestMismatch {
                image,
                expected: layer.diff_id.clone(),
                actual: applied.diff_id,
            });
        }
    }
    Ok(())
}

/// SIGKILLs this process, as an operator's `kill -9` (tests only).
fn crash(point: &str) {
    tracing::error!(failpoint = point, "crash_at reached: killing this process");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
}

/// Makes `path` and its missing parents, readable by the owner only: the
/// store is flyd's (the roots in it carry their images' own modes).
fn private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Creates the new file `path`, readable by the owner only.
pub(crate) fn private_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// `image` as a reference.
fn parse(image: &str) -> Result<Reference, ImageError> {
    image.parse().map_err(|e| ImageError::BadReference {
        image: image.to_string(),
        reason: format!("{e}"),
    })
}

/// A reference's canonical name (`docker.io/library/busybox:latest` for
/// `busybox`), or `None` for what is not a reference.
fn canonical_name(what: &str) -> Option<String> {
    what.parse::<Reference>().ok().map(|r| r.whole())
}

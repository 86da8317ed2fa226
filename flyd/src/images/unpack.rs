//! Applying one image layer to a root directory, as the OCI image spec's
//! changesets say (`layer.md`: entries replace what lower layers had,
//! `.wh.<name>` removes a lower entry, `.wh..wh..opq` empties a lower
//! directory), without letting any entry reach outside that root.
//!
//! Every path is resolved by the kernel inside the root (`openat2` with
//! `RESOLVE_IN_ROOT`), as the machine itself will see it: a symlink
//! `var/run -> /run` leads to the root's `run`, and `../../etc` stops at
//! the root. Each entry is then created, replaced or removed by name in the
//! directory so found, never following a symlink in its last component.
//! So no entry, hard link, whiteout or symlink, however crafted, touches
//! anything but the root's own files.
//!
//! What an entry can grant is bounded too: owners are shifted into the
//! machines' id range (an image's root is `ids.base` on the host), so a
//! setuid file is setuid to an unprivileged host id; device nodes are not
//! created (the runtime gives a machine its `/dev`); extended attributes,
//! file capabilities among them, are not applied.

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// The host ids a machine's ids map to: id `n` of the image is host id
/// `base + n`, for `n < size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdShift {
    pub base: u32,
    pub size: u32,
    /// Whether owners are set at all: only root can, and only root runs
    /// sandboxes that need them. (An unprivileged flyd keeps its own.)
    pub owners: bool,
}

impl IdShift {
    fn host(self, id: u64, what: &str, path: &Path) -> Result<u32, UnpackError> {
        if id >= u64::from(self.size) {
            return Err(UnpackError::Refused(format!(
                "{}: {what} {id} is outside the {} ids a machine has",
                path.display(),
                self.size
            )));
        }
        Ok(self.base + id as u32)
    }
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer is malformed or asks for something not allowed.
    #[error("{0}")]
    Refused(String),
    /// Reading the layer or writing the root failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The disk (or the file system's inodes) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull
            || source.raw_os_error() == Some(Errno::DQUOT.raw_os_error()))
    }
}

/// What applying a layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `sha256:<hex>` of the uncompressed layer: its diff id.
    pub diff_id: String,
    /// Entries created or replaced.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Device nodes left out.
    pub devices_skipped: u64,
}

/// Layer compression, told by the first bytes (a `docker save` archive
/// names no media types).
fn decompressed<'a>(layer: impl Read + 'a) -> Result<Box<dyn Read + 'a>, UnpackError> {
    let mut reader = BufReader::with_capacity(64 * 1024, layer);
    let head = reader
        .fill_buf()
        .map_err(|e| UnpackError::io("reading the layer", e))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(UnpackError::Refused(
            "zstd-compressed layers are not supported yet; push the image with gzip layers".into(),
        ))
    } else {
        Ok(Box::new(reader))
    }
}

/// Hashes what passes through it: the uncompressed layer, for its diff id.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Applies the layer read from `layer` (a tar, plain or gzipped) to the
/// directory `root`, shifting owners by `ids`.
pub fn apply(root: &Path, layer: impl Read, ids: IdShift) -> Result<Applied, UnpackError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::io(format!("opening {}", root.display()), e))?;
    let mut applier = Applier {
        root: root_fd,
        ids,
        written: HashSet::new(),
        applied: Applied::default(),
    };
    let mut archive = tar::Archive::new(Hashing {
        inner: decompressed(layer)?,
        hash: Sha256::new(),
    });
    let entries = archive
        .entries()
        .map_err(|e| UnpackError::io("reading the layer", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| UnpackError::io("reading the layer", e))?;
        applier.entry(entry)?;
    }
    // The diff id covers the whole tar, its end blocks and padding too.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| UnpackError::io("reading the layer", e))?;
    applier.applied.diff_id = format!("sha256:{}", hex::encode(rest.hash.finalize()));
    Ok(applier.applied)
}

struct Applier {
    root: OwnedFd,
    ids: IdShift,
    /// Paths this layer wrote: its own whiteouts must not remove them.
    written: HashSet<PathBuf>,
    applied: Applied,
}

/// An entry's path made relative to the root. `..` is refused: no image
/// builder writes it, and it can only be an attempt to climb out.
fn relative(path: &Path) -> Result<PathBuf, UnpackError> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(name) => out.push(name),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(UnpackError::Refused(format!(
                    "layer entry {} climbs out of the image with '..'",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

impl Applier {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let path = relative(
            &entry
                .path()
                .map_err(|e| UnpackError::io("reading an entry's path", e))?,
        )?;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(()); // the root itself: its owner and mode are ours
        };
        let parent = parent.to_path_buf();
        let name = name.to_os_string();
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header
            .mode()
            .map_err(|e| UnpackError::io("reading a mode", e))?
            & 0o7777;
        let uid = self.ids.host(header.uid().unwrap_or(0), "uid", &path)?;
        let gid = self.ids.host(header.gid().unwrap_or(0), "gid", &path)?;
        let mtime = header.mtime().unwrap_or(0);
        let dir = self.dir(&parent)?;

        if let Some(hidden) = name.to_str().and_then(|n| n.strip_prefix(WHITEOUT)) {
            // `.wh..` would name the directory's parent, `.wh.` the
            // directory itself.
            if matches!(hidden, "" | "." | "..") {
                return Err(UnpackError::Refused(format!(
                    "whiteout {} names no entry",
                    path.display()
                )));
            }
            if name == OPAQUE {
                self.clear_lower(&parent)?;
            } else if !self.written.contains(&parent.join(hidden)) {
                remove_all(&dir, Path::new(hidden), &path)?;
            }
            return Ok(());
        }

        use tar::EntryType as T;
        match kind {
            T::Directory => {
                let existing = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW);
                match existing {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    Ok(_) => {
                        remove_all(&dir, Path::new(&name), &path)?;
                        mkdir(&dir, &name, &path)?;
                    }
                    Err(Errno::NOENT) => mkdir(&dir, &name, &path)?,
                    Err(e) => return Err(UnpackError::io(path.display().to_string(), e)),
                }
                let fd = rustix::fs::openat(
                    &dir,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| UnpackError::io(path.display().to_string(), e))?;
                own(
                    &fd,
                    self.ids.owners.then_some((uid, gid)),
                    mode,
                    mtime,
                    &path,
                )?;
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                remove_all(&dir, Path::new(&name), &path)?;
                let fd = rustix::fs::openat(
                    &dir,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| UnpackError::io(path.display().to_string(), e))?;
                let mut file = std::fs::File::from(fd);
                let n = io::copy(&mut entry, &mut file)
                    .map_err(|e| UnpackError::io(path.display().to_string(), e))?;
                self.applied.bytes += n;
                // Owner first: chown clears the setuid and setgid bits.
                own(
                    &file,
                    self.ids.owners.then_some((uid, gid)),
                    mode,
                    mtime,
                    &path,
                )?;
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| UnpackError::io(path.display().to_string(), e))?
                    .ok_or_else(|| {
                        UnpackError::Refused(format!("symlink {} has no target", path.display()))
                    })?
                    .into_owned();
                remove_all(&dir, Path::new(&name), &path)?;
                rustix::fs::symlinkat(&target, &dir, &name)
                    .map_err(|e| UnpackError::io(path.display().to_string(), e))?;
                chown_at(self.ids, &dir, &name, (uid, gid), &path)?;
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| UnpackError::io(path.display().to_string(), e))?
                    .ok_or_else(|| {
                        UnpackError::Refused(format!("hard link {} has no target", path.display()))
                    })?;
                let target = relative(&target)?;
                let (Some(target_parent), Some(target_name)) =
                    (target.parent(), target.file_name())
                else {
                    return Err(UnpackError::Refused(format!(
                        "hard link {} points at the image's root",
                        path.display()
                    )));
                };
                let source_dir = self.dir_existing(target_parent, &path)?;
                remove_all(&dir, Path::new(&name), &path)?;
                // Without AT_SYMLINK_FOLLOW: a link to a symlink is a link to
                // the symlink itself, never to what it points at.
                rustix::fs::linkat(&source_dir, target_name, &dir, &name, AtFlags::empty())
                    .map_err(|e| {
                        UnpackError::io(
                            format!("hard link {} to {}", path.display(), target.display()),
                            e,
                        )
                    })?;
            }
            T::Fifo => {
                remove_all(&dir, Path::new(&name), &path)?;
                let fail = |e: Errno| UnpackError::io(path.display().to_string(), e);
                rustix::fs::mknodat(&dir, &name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(fail)?;
                // A FIFO cannot be opened to be changed without a writer:
                // go by name, which is this FIFO, just made.
                chown_at(self.ids, &dir, &name, (uid, gid), &path)?;
                rustix::fs::chmodat(&dir, &name, Mode::from_raw_mode(mode), AtFlags::empty())
                    .map_err(fail)?;
            }
            T::Char | T::Block => {
                self.applied.devices_skipped += 1;
                return Ok(());
            }
            // Metadata records (pax, GNU long names) are folded into the
            // entries they describe by the tar reader; anything else
            // carries nothing a root file system needs.
            _ => return Ok(()),
        }
        self.applied.entries += 1;
        self.written.insert(path);
        Ok(())
    }

    /// The directory at `rel` inside the root, made (mode 0755, owned by
    /// the image's root) where missing, as `tar` does for entries whose
    /// parents the layer does not list.
    fn dir(&self, rel: &Path) -> Result<OwnedFd, UnpackError> {
        match self.open_dir(rel) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(UnpackError::io(format!("{}", rel.display()), e)),
        }
        // Walk down from the root, making what is missing.
        let mut at = PathBuf::new();
        for part in rel.components() {
            let parent = self
                .open_dir(&at)
                .map_err(|e| UnpackError::io(format!("{}", at.display()), e))?;
            at.push(part);
            match self.open_dir(&at) {
                Ok(_) => continue,
                Err(Errno::NOENT) => {}
                Err(e) => return Err(UnpackError::io(format!("{}", at.display()), e)),
            }
            mkdir(&parent, part.as_os_str(), &at)?;
            let root = (self.ids.base, self.ids.base);
            chown_at(self.ids, &parent, part.as_os_str(), root, &at)?;
            // 0755 whatever flyd's umask: every user of the image walks it.
            rustix::fs::chmodat(
                &parent,
                part.as_os_str(),
                Mode::from_raw_mode(0o755),
                AtFlags::empty(),
            )
            .map_err(|e| UnpackError::io(format!("{}", at.display()), e))?;
        }
        self.open_dir(rel)
            .map_err(|e| UnpackError::io(format!("{}", rel.display()), e))
    }

    /// The directory at `rel`, which must exist (a hard link's source).
    fn dir_existing(&self, rel: &Path, entry: &Path) -> Result<OwnedFd, UnpackError> {
        self.open_dir(rel).map_err(|e| {
            UnpackError::io(
                format!("hard link {}: its target's directory", entry.display()),
                e,
            )
        })
    }

    fn open_dir(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        rustix::fs::openat2(
            &self.root,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )
    }

    /// An opaque whiteout in `rel`: everything lower layers put there goes;
    /// what this layer wrote stays.
    fn clear_lower(&self, rel: &Path) -> Result<(), UnpackError> {
        let dir = self.dir(rel)?;
        for name in children(&dir, rel)? {
            let child = rel.join(&name);
            if !self.written.contains(&child) {
                remove_all(&dir, Path::new(&name), &child)?;
            } else if is_dir(&dir, &name) {
                self.clear_lower(&child)?;
            }
        }
        Ok(())
    }
}

/// Sets the owner of `name` in `dir` (not following a symlink), where
/// owners are set.
fn chown_at(
    ids: IdShift,
    dir: &impl AsFd,
    name: &std::ffi::OsStr,
    (uid, gid): (u32, u32),
    path: &Path,
) -> Result<(), UnpackError> {
    if !ids.owners {
        return Ok(());
    }
    rustix::fs::chownat(
        dir,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| UnpackError::io(path.display().to_string(), e))
}

fn mkdir(dir: &impl AsFd, name: &std::ffi::OsStr, path: &Path) -> Result<(), UnpackError> {
    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755))
        .map_err(|e| UnpackError::io(path.display().to_string(), e))
}

/// Sets owner (where owners are set), mode and modification time through
/// an open descriptor.
fn own(
    fd: &impl AsFd,
    owner: Option<(u32, u32)>,
    mode: u32,
    mtime: u64,
    path: &Path,
) -> Result<(), UnpackError> {
    let fail = |e: Errno| UnpackError::io(path.display().to_string(), e);
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(fail)?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(fail)?;
    let at = Timespec {
        tv_sec: mtime.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    rustix::fs::futimens(
        fd,
        &Timestamps {
            last_access: at,
            last_modification: at,
        },
    )
    .map_err(fail)
}

fn is_dir(dir: &impl AsFd, name: &std::ffi::OsStr) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}

/// The names in the open directory `dir` (at `path`), but `.` and `..`.
fn children(dir: &impl AsFd, path: &Path) -> Result<Vec<std::ffi::OsString>, UnpackError> {
    use std::os::unix::ffi::OsStrExt;
    let entries = rustix::fs::Dir::read_from(dir)
        .map_err(|e| UnpackError::io(format!("listing {}", path.display()), e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| UnpackError::io(format!("listing {}", path.display()), e))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(std::ffi::OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// Removes `name` in `dir`, whatever it is (a directory with all it holds;
/// a symlink itself, never what it points at). Nothing there is fine.
fn remove_all(dir: &impl AsFd, name: &Path, path: &Path) -> Result<(), UnpackError> {
    let fail = |e: Errno| UnpackError::io(format!("removing {}", path.display()), e);
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(fail(e)),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            let inner = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(fail)?;
            for child in children(&inner, path)? {
                remove_all(&inner, Path::new(&child), &path.join(&child))?;
            }
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(fail)
        }
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(fail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const IDS: IdShift = IdShift {
        base: 1_000_000,
        size: 65536,
        owners: true,
    };

    /// A layer's entries, as an image builder would write them.
    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8], u32),
        Symlink(&'a str, &'a str),
        Link(&'a str, &'a str),
        Device(&'a str),
        Fifo(&'a str),
    }

    /// Raw names are written byte for byte: `tar`'s builder refuses `..`,
    /// and an attacker's archive does not ask it.
    fn layer(entries: &[E<'_>]) -> Vec<u8> {
        let mut out = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (name, kind, data, mode): (&str, tar::EntryType, &[u8], u32) = match e {
                E::Dir(n) => (n, tar::EntryType::Directory, b"", 0o755),
                E::File(n, d, m) => (n, tar::EntryType::Regular, d, *m),
                E::Symlink(n, t) | E::Link(n, t) => {
                    h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                    let kind = if matches!(e, E::Symlink(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    };
                    (n, kind, b"", 0o777)
                }
                E::Device(n) => (n, tar::EntryType::Char, b"", 0o666),
                E::Fifo(n) => (n, tar::EntryType::Fifo, b"", 0o644),
            };
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            out.append(&h, data).unwrap();
        }
        out.into_inner().unwrap()
    }

    /// A root to unpack into, and a directory beside it standing for the
    /// host, holding a secret.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let host = tmp.path().join("host");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&host).unwrap();
        std::fs::write(host.join("secret"), "host secret").unwrap();
        (tmp, root, host)
    }

    /// Every file under `dir`, relative, sorted.
    fn tree(dir: &Path) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    fn host_untouched(host: &Path) {
        assert_eq!(tree(host), ["secret"]);
        assert_eq!(std::fs::read(host.join("secret")).unwrap(), b"host secret");
        assert_eq!(std::fs::metadata(host.join("secret")).unwrap().nlink(), 1);
    }

    #[test]
    fn a_layer_unpacks_with_owners_shifted_and_modes_kept() {
        let (_tmp, root, _) = setup();
        let data = layer(&[
            E::Dir("bin/"),
            E::File("bin/tool", b"#!/bin/sh\n", 0o4755),
            E::File("etc/deep/conf", b"x=1", 0o640),
            E::Symlink("bin/sh", "busybox"),
            E::Link("bin/tool2", "bin/tool"),
            E::Fifo("run/pipe"),
        ]);
        let applied = apply(&root, &data[..], IDS).unwrap();
        assert_eq!(applied.entries, 6);
        assert_eq!(applied.bytes, 13);
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        assert_eq!(applied.diff_id, expected);

        let tool = std::fs::metadata(root.join("bin/tool")).unwrap();
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!((tool.uid(), tool.gid()), (IDS.base, IDS.base));
        assert_eq!(tool.nlink(), 2, "hard link made");
        let made = std::fs::metadata(root.join("etc/deep")).unwrap();
        assert_eq!(
            made.uid(),
            IDS.base,
            "missing parents belong to the image's root"
        );
        assert_eq!(
            made.permissions().mode() & 0o7777,
            0o755,
            "and every user walks them"
        );
        let link = std::fs::symlink_metadata(root.join("bin/sh")).unwrap();
        assert_eq!(link.uid(), IDS.base);
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
    }

    #[test]
    fn the_same_layer_gzipped_has_the_same_diff_id() {
        let (_tmp, root, _) = setup();
        let data = layer(&[E::File("a", b"hello", 0o644)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &data).unwrap();
        let applied = apply(&root, &gz.finish().unwrap()[..], IDS).unwrap();
        assert_eq!(
            applied.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&data)))
        );
        assert_eq!(std::fs::read(root.join("a")).unwrap(), b"hello");
    }

    #[test]
    fn symlinks_lead_nowhere_but_inside_the_root() {
        let (_tmp, root, host) = setup();
        let abs = host.display().to_string();
        let data = layer(&[
            E::Dir("host/"),
            E::Symlink("up", "../../host"),
            E::Symlink("slash", "/"),
            // Written through the links: inside the root, or refused.
            E::File("up/secret", b"owned", 0o644),
            E::File("slash/etc/passwd", b"root::0:0::/:/bin/sh", 0o644),
        ]);
        apply(&root, &data[..], IDS).unwrap();
        host_untouched(&host);
        // `../../host` from the root is the root's own `host`.
        assert_eq!(std::fs::read(root.join("host/secret")).unwrap(), b"owned");
        assert!(root.join("etc/passwd").is_file());

        // A file through an absolute link to a host path that does not
        // exist inside the root is refused, not written to the host.
        let (_tmp, root, host) = setup();
        let data = layer(&[
            E::Symlink("abs", &abs),
            E::File("abs/secret", b"owned", 0o644),
        ]);
        assert!(apply(&root, &data[..], IDS).is_err());
        host_untouched(&host);
    }

    #[test]
    fn hard_links_cannot_reach_host_files() {
        let secret = |host: &Path| host.join("secret").display().to_string();
        // Straight at the host path, through a symlinked directory, and up.
        for attempt in ["abs", "via-link", "up"] {
            let (_tmp, root, host) = setup();
            let s = secret(&host);
            let abs_dir = host.display().to_string();
            let entries = match attempt {
                "abs" => vec![E::Link("stolen", &s)],
                "via-link" => vec![E::Symlink("d", &abs_dir), E::Link("stolen", "d/secret")],
                _ => vec![E::Link("stolen", "../host/secret")],
            };
            let data = layer(&entries);
            let result = apply(&root, &data[..], IDS);
            assert!(result.is_err(), "{attempt}: {result:?}");
            host_untouched(&host);
            assert!(!root.join("stolen").exists(), "{attempt}");
        }
    }

    #[test]
    fn a_link_to_a_symlink_links_the_symlink() {
        let (_tmp, root, host) = setup();
        let s = host.join("secret").display().to_string();
        let data = layer(&[E::Symlink("l", &s), E::Link("l2", "l")]);
        apply(&root, &data[..], IDS).unwrap();
        let meta = std::fs::symlink_metadata(root.join("l2")).unwrap();
        assert!(meta.file_type().is_symlink());
        host_untouched(&host);
    }

    #[test]
    fn dot_dot_entries_are_refused() {
        let (_tmp, root, host) = setup();
        let data = layer(&[E::File("../host/secret", b"owned", 0o644)]);
        let e = apply(&root, &data[..], IDS).unwrap_err();
        assert!(e.to_string().contains("climbs out"), "{e}");
        host_untouched(&host);
    }

    #[test]
    fn whiteouts_cannot_remove_anything_outside() {
        for name in [".wh..", ".wh...", "a/.wh..", "a/.wh...", ".wh.", "a/.wh."] {
            let (tmp, root, host) = setup();
            std::fs::create_dir(root.join("a")).unwrap();
            std::fs::write(root.join("a/keep"), "x").unwrap();
            let data = layer(&[E::File(name, b"", 0o644)]);
            let result = apply(&root, &data[..], IDS);
            assert!(result.is_err(), "{name}: {result:?}");
            host_untouched(&host);
            assert!(tmp.path().join("root/a/keep").exists(), "{name}");
        }
    }

    #[test]
    fn whiteouts_remove_what_lower_layers_made() {
        let (_tmp, root, _) = setup();
        let lower = layer(&[
            E::File("a/x", b"1", 0o644),
            E::File("a/y", b"2", 0o644),
            E::File("b/z", b"3", 0o644),
            E::File("c/old", b"4", 0o644),
            E::File("c/sub/old", b"5", 0o644),
        ]);
        apply(&root, &lower[..], IDS).unwrap();
        let upper = layer(&[
            E::File("a/.wh.x", b"", 0o644),
            E::File(".wh.b", b"", 0o644),
            // The layer's own entry survives its directory's opaque marker,
            // wherever the marker stands.
            E::File("c/new", b"6", 0o644),
            E::File("c/.wh..wh..opq", b"", 0o644),
            E::File("c/sub/new", b"7", 0o644),
            // A whiteout of an entry of the same layer does not remove it.
            E::File("d/mine", b"8", 0o644),
            E::File("d/.wh.mine", b"", 0o644),
        ]);
        apply(&root, &upper[..], IDS).unwrap();
        assert_eq!(
            tree(&root),
            [
                "a",
                "a/y",
                "c",
                "c/new",
                "c/sub",
                "c/sub/new",
                "d",
                "d/mine"
            ]
        );
    }

    #[test]
    fn entries_replace_what_was_there() {
        let (_tmp, root, host) = setup();
        let lower = layer(&[
            E::File("f", b"file", 0o644),
            E::File("d/inner", b"x", 0o644),
            E::Symlink("s", "/"),
        ]);
        apply(&root, &lower[..], IDS).unwrap();
        let upper = layer(&[
            E::Dir("f/"),
            E::File("d", b"now a file", 0o644),
            E::File("s", b"no longer a link", 0o644),
        ]);
        apply(&root, &upper[..], IDS).unwrap();
        assert!(root.join("f").is_dir());
        assert_eq!(std::fs::read(root.join("d")).unwrap(), b"now a file");
        assert!(
            !std::fs::symlink_metadata(root.join("s"))
                .unwrap()
                .is_symlink()
        );
        host_untouched(&host);
    }

    #[test]
    fn device_nodes_are_not_made_and_foreign_ids_are_refused() {
        let (_tmp, root, _) = setup();
        let data = layer(&[E::Device("dev/kmem"), E::File("ok", b"", 0o644)]);
        let applied = apply(&root, &data[..], IDS).unwrap();
        assert_eq!(applied.devices_skipped, 1);
        assert!(!root.join("dev/kmem").exists());

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("owned-by-host-root").unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(u64::from(IDS.size));
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        let e = apply(&root, &b.into_inner().unwrap()[..], IDS).unwrap_err();
        assert!(e.to_string().contains("outside the 65536 ids"), "{e}");
    }

    #[test]
    fn a_corrupt_layer_is_an_error() {
        let (_tmp, root, _) = setup();
        let mut data = layer(&[E::File("a", b"hello", 0o644)]);
        data[148] ^= 0xff; // the header's checksum
        assert!(apply(&root, &data[..], IDS).is_err());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &layer(&[E::File("a", b"x", 0o644)])).unwrap();
        let mut gz = gz.finish().unwrap();
        gz.truncate(gz.len() / 2);
        assert!(apply(&root, &gz[..], IDS).is_err());
    }
}

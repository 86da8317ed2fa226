//! `hangar/echo`, the built-in image: a real OCI image (manifest, config,
//! one layer) that Hangar assembles in its own store the first time a
//! machine asks for it, so the walkthrough and the tests need no registry.
//!
//! Its program is Hangar's own binary, which every machine gets read-only
//! at [`HANGAR_MOUNT`] (as Fly gives each machine its init); the layer holds
//! what that binary needs to run in a root of its own: the dynamic loader
//! and the shared libraries this process has loaded (read from
//! `/proc/self/maps`, at their paths on the host), `/etc/passwd`, and the
//! directories a root is expected to have. It also holds a few of the
//! host's tools ([`TOOLS`]: a shell, `env`, `cat`...) with their libraries
//! (as `ldd` finds them), so that `machines exec` has a shell to run, as
//! it has in most images. Entries are written in a fixed
//! order with fixed times, so the same libraries give the same digest on
//! every start and nothing is stored twice.

use super::blobs::digest_of;
use super::{ImageError, ImageRecord, Images};
use hangar_api::machine::ECHO_IMAGE;
use oci_client::manifest::OciImageManifest;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where a machine sees Hangar's binary (read-only).
pub const HANGAR_MOUNT: &str = "/.hangar/hangar";

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PASSWD: &str =
    "root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

/// The host's tools the image carries, at `/bin/<name>`, when the host
/// has them.
const TOOLS: [&str; 10] = [
    "sh", "env", "cat", "echo", "ls", "sleep", "true", "false", "id", "hostname",
];

/// Each tool's path on the host, and the libraries it needs.
fn tools() -> (BTreeMap<String, PathBuf>, BTreeSet<PathBuf>) {
    let mut found = BTreeMap::new();
    let mut libraries = BTreeSet::new();
    for tool in TOOLS {
        let Some(path) = ["/bin", "/usr/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(tool))
            .find(|p| p.is_file())
            .and_then(|p| p.canonicalize().ok())
        else {
            continue;
        };
        let Ok(out) = std::process::Command::new("ldd").arg(&path).output() else {
            continue;
        };
        // `libc.so.6 => /lib/.../libc.so.6 (0x...)`, or `/lib64/ld-... (0x...)`.
        let needs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let l = l.split("=>").last()?.trim();
                let p = Path::new(l.split_whitespace().next()?);
                // Under the name the loader looks for (its soname, often a
                // symlink to a versioned file), in its directory's real
                // path (`/lib` may be a link to `/usr/lib`).
                let dir = p
                    .parent()
                    .filter(|_| p.is_absolute())?
                    .canonicalize()
                    .ok()?;
                Some(dir.join(p.file_name()?))
            })
            .collect();
        if out.status.success() {
            libraries.extend(needs);
            found.insert(tool.to_string(), path);
        }
    }
    (found, libraries)
}

/// The shared objects this process maps, loader included: what Hangar's
/// binary needs to run elsewhere.
pub(crate) fn loaded_libraries() -> Result<BTreeSet<PathBuf>, ImageError> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| ImageError::from_io("reading /proc/self/maps", e))?;
    let exe = std::fs::read_link("/proc/self/exe").ok();
    Ok(maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter_map(|p| Path::new(p).canonicalize().ok())
        .filter(|p| {
            p.is_absolute()
                && Some(p) != exe.as_ref()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains(".so"))
                && p.is_file()
        })
        .collect())
}

/// The dynamic loader this process was started with.
pub(crate) fn own_interpreter() -> Option<PathBuf> {
    interpreter(&std::fs::read("/proc/self/exe").ok()?)
}

/// The program interpreter named in an ELF64 executable's `PT_INTERP`.
fn interpreter(exe: &[u8]) -> Option<PathBuf> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(exe.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(exe.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(exe.get(o..o + 8)?.try_into().ok()?));
    // ELF magic, 64-bit, little-endian.
    if exe.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(32)?).ok()?;
    let phentsize = usize::from(u16_at(54)?);
    let phnum = usize::from(u16_at(56)?);
    const PT_INTERP: u32 = 3;
    (0..phnum).find_map(|i| {
        let ph = phoff + i * phentsize;
        if u32_at(ph)? != PT_INTERP {
            return None;
        }
        let offset = usize::try_from(u64_at(ph + 8)?).ok()?;
        let size = usize::try_from(u64_at(ph + 32)?).ok()?;
        let text = exe.get(offset..offset + size)?;
        let text = text.strip_suffix(b"\0").unwrap_or(text);
        Some(PathBuf::from(std::str::from_utf8(text).ok()?))
    })
}

/// The echo image's one layer, as an uncompressed tar.
fn layer() -> Result<Vec<u8>, ImageError> {
    let fail = |e| ImageError::from_io("assembling hangar/echo", e);
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    let mut dirs = BTreeSet::new();
    for dir in [".hangar", "bin", "etc", "tmp", "proc", "sys", "dev"] {
        dirs.insert(PathBuf::from(dir));
    }
    let (tools, tool_libraries) = tools();
    let mut libraries = loaded_libraries()?;
    libraries.extend(tool_libraries);
    for lib in &libraries {
        let mut at = PathBuf::new();
        for part in lib.parent().into_iter().flat_map(Path::components).skip(1) {
            at.push(part);
            dirs.insert(at.clone());
        }
    }
    for dir in &dirs {
        let mode = if dir == Path::new("tmp") {
            0o1777
        } else {
            0o755
        };
        let mut h = header(tar::EntryType::Directory, mode, 0);
        tar.append_data(&mut h, dir, std::io::empty())
            .map_err(fail)?;
    }
    for (name, text) in [("etc/passwd", PASSWD), ("etc/group", GROUP)] {
        let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64);
        tar.append_data(&mut h, name, text.as_bytes())
            .map_err(fail)?;
    }
    for lib in &libraries {
        let bytes = std::fs::read(lib).map_err(fail)?;
        let mut h = header(tar::EntryType::Regular, 0o755, bytes.len() as u64);
        let name = lib.strip_prefix("/").unwrap_or(lib);
        tar.append_data(&mut h, name, &bytes[..]).map_err(fail)?;
    }
    for (tool, path) in &tools {
        let bytes = std::fs::read(path).map_err(fail)?;
        let mut h = header(tar::EntryType::Regular, 0o755, bytes.len() as u64);
        tar.append_data(&mut h, format!("bin/{tool}"), &bytes[..])
            .map_err(fail)?;
    }
    // The loader at the path the binary names, when that is not where the
    // host keeps it (`/lib64/...` on merged-/usr systems).
    let exe = std::fs::read("/proc/self/exe").map_err(fail)?;
    if let Some(interp) = interpreter(&exe)
        && !libraries.contains(&interp)
        && let Some(real) = libraries
            .iter()
            .find(|l| l.file_name() == interp.file_name())
    {
        let name = interp.strip_prefix("/").unwrap_or(&interp);
        if let Some(parent) = name.parent().filter(|p| !dirs.contains(*p)) {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            tar.append_data(&mut h, parent, std::io::empty())
                .map_err(fail)?;
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, name, real).map_err(fail)?;
    }
    tar.into_inner().map_err(fail)
}

impl Images {
    /// The built-in echo image, assembled and stored if it is not yet.
    pub(super) async fn builtin_echo(&self) -> Result<(ImageRecord, super::ImagePin), ImageError> {
        // Assembled once per process; stored again only if removed since.
        if let Some(digest) = self.echo.get()
            && let Some(held) = self.pinned(digest)
        {
            return Ok(held);
        }
        let _one = self.storing.lock().await;
        let layer = layer()?;
        let diff_id = digest_of(&layer);
        let config = serde_json::json!({
            "architecture": oci_arch(),
            "os": "linux",
            "config": {
                "Entrypoint": [HANGAR_MOUNT, "echo"],
                "Env": [PATH],
                "WorkingDir": "/",
                "StopSignal": "SIGTERM",
                "Labels": {"org.opencontainers.image.title": "hangar/echo"},
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        });
        let config = serde_json::to_vec(&config).expect("serializes");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(&config),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": diff_id,
                "size": layer.len(),
            }],
        });
        let manifest = serde_json::to_vec(&manifest).expect("serializes");
        let digest = digest_of(&manifest);
        if self.ready(&digest).is_none() {
            self.blobs
                .put(&layer)
                .map_err(|e| ImageError::from_io("storing hangar/echo", e))?;
            let manifest: OciImageManifest =
                serde_json::from_slice(&manifest).expect("the manifest reads back");
            let record = self.record(ECHO_IMAGE, "", ECHO_IMAGE, &digest, &manifest, &config)?;
            self.unpack(&record).await?;
            self.insert(record)?;
        }
        self.name(&digest, ECHO_IMAGE)?;
        let _ = self.echo.set(digest.clone());
        self.pinned(&digest)
            .ok_or_else(|| ImageError::Io("hangar/echo vanished while stored".into()))
    }
}

/// This host's architecture, in OCI's words.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interpreter_is_read_from_the_running_binary() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let interp = interpreter(&exe).expect("a dynamically linked test binary");
        assert!(interp.is_absolute(), "{interp:?}");
        assert!(
            interp
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("ld-")
        );
        assert_eq!(interpreter(b"not an elf"), None);
    }

    #[test]
    fn the_layer_is_the_same_every_time_and_holds_the_loader_and_libc() {
        let a = layer().unwrap();
        assert_eq!(digest_of(&a), digest_of(&layer().unwrap()));
        let mut names = Vec::new();
        for e in tar::Archive::new(&a[..]).entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert!(names.iter().any(|n| n.ends_with("/libc.so.6")), "{names:?}");
        assert!(names.iter().any(|n| n.contains("ld-linux")), "{names:?}");
        assert!(names.contains(&"etc/passwd".to_string()));
        assert!(names.contains(&"bin/sh".to_string()), "{names:?}");
    }
}

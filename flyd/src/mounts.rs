//! Removing what flyd mounted for machines (a machine's root, the bundles'
//! memory file system), from flyd or from a machine's pilot alike.

use std::io;
use std::path::Path;

/// Unmounts `path` (lazily: a process still inside keeps its view) and
/// removes the mount point, a directory or a file. Nothing mounted there,
/// or nothing there at all, is fine.
pub fn remove_mount(path: &Path) -> Result<(), String> {
    use nix::errno::Errno;
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(format!("unmounting {}: {e}", path.display())),
    }
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(format!("removing {}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

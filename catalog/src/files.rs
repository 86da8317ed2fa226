//! Files in the data dir, written whole or not at all.

use std::io::Write;
use std::path::Path;

/// Writes `contents` to a temporary file beside `path` created with `mode`,
/// flushes it to disk, then renames it over `path`: a reader (or the next
/// start after a crash) sees the old file or the new one, never half of
/// one, and a private file is never readable by others, not even briefly.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    // A leftover temp file may carry other permissions; `mode` only applies
    // to files this call creates.
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_whole_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        // A leftover temp file open to everyone is not reused.
        std::fs::write(dir.path().join("key.pem.tmp"), "old").unwrap();
        std::fs::set_permissions(
            dir.path().join("key.pem.tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        write_atomically(&path, b"first", 0o600).unwrap();
        write_atomically(&path, b"second", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("key.pem.tmp").exists());
    }
}

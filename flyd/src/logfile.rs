//! A machine's log: the workload's stdout and stderr, appended to
//! `machine.log` and rotated by size, so a chatty workload fills only its
//! own few files: past `max_bytes` the file becomes `machine.log.1` (and
//! `.1` becomes `.2`, ...), keeping `keep` old files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The log file being written, and how much it holds.
pub(crate) struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    written: u64,
}

impl RotatingLog {
    /// Opens `path` for appending (creating it), rotating past `max_bytes`
    /// and keeping `keep` rotated files.
    pub(crate) fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        let file = Self::append(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            written,
        })
    }

    fn append(path: &Path) -> std::io::Result<File> {
        OpenOptions::new().create(true).append(true).open(path)
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Appends `bytes`, rotating whenever the file is full: no file ever
    /// holds more than `max_bytes` (a write may be split across two).
    pub(crate) fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.written >= self.max_bytes {
                self.rotate()?;
            }
            let room = usize::try_from(self.max_bytes - self.written).unwrap_or(usize::MAX);
            let (now, later) = bytes.split_at(room.min(bytes.len()));
            self.file.write_all(now)?;
            self.written += now.len() as u64;
            bytes = later;
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.keep == 0 {
            // Nothing kept: start the file again.
            self.file.set_len(0)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
            self.file = Self::append(&self.path)?;
        }
        self.written = 0;
        Ok(())
    }
}

/// Copies the workload's stdout and stderr into `log` until both end.
pub(crate) async fn copy_output(
    mut stdout: impl AsyncRead + Unpin,
    mut stderr: impl AsyncRead + Unpin,
    mut log: RotatingLog,
) {
    let (mut out, mut err) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut out_open, mut err_open) = (true, true);
    let mut write = |bytes: &[u8]| {
        if let Err(e) = log.write(bytes) {
            tracing::warn!(error = %e, "writing machine.log");
        }
    };
    while out_open || err_open {
        tokio::select! {
            n = stdout.read(&mut out), if out_open => match n {
                Ok(n) if n > 0 => write(&out[..n]),
                _ => out_open = false,
            },
            n = stderr.read(&mut err), if err_open => match n {
                Ok(n) if n > 0 => write(&err[..n]),
                _ => err_open = false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_a_few_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine.log");
        let stream: Vec<u8> = (0..47u8).map(|i| b'a' + i % 26).collect();
        let mut log = RotatingLog::open(&path, 10, 2).unwrap();
        for chunk in stream.chunks(7) {
            log.write(chunk).unwrap();
        }
        let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
        let (two, one, now) = (
            read("machine.log.2"),
            read("machine.log.1"),
            read("machine.log"),
        );
        assert!(!dir.path().join("machine.log.3").exists());
        assert_eq!((two.len(), one.len(), now.len()), (10, 10, 7));
        // The newest bytes, in order, none lost within what is kept.
        assert_eq!([two, one, now].concat(), &stream[stream.len() - 27..]);
        // A new writer goes on where the file is.
        let mut again = RotatingLog::open(&path, 10, 2).unwrap();
        again.write(b"0123").unwrap();
        assert_eq!(read("machine.log"), b"3");
        assert_eq!(read("machine.log.1"), [&stream[40..], b"012"].concat());
    }
}

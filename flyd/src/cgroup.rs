//! Memory limits through cgroup v2, where the hierarchy is writable.
//!
//! At start flyd looks for a cgroup v2 hierarchy (`cgroup.controllers` in
//! `cgroup_root` naming `memory`), creates `hangar-<host id>` under it, and
//! delegates the memory controller to it. Each machine then gets a child
//! cgroup whose `memory.max` is its `guest.memory_mb`; pilot moves itself
//! into it before starting the workload, so the workload and everything it
//! spawns are confined (pilot's own few hundred KB count too). A workload
//! over its limit is OOM-killed, which shows as an exit by SIGKILL.
//!
//! Without a writable cgroup v2 hierarchy (cgroup v1 hosts, containers
//! without delegation), flyd logs that once and reservations remain
//! bookkeeping for placement.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a destroy waits for a machine's cgroup to empty (pilot's
/// linger after the workload's exit, plus a margin).
const REMOVE_WAIT: Duration = Duration::from_secs(4);

/// flyd's cgroup, under which each machine gets its own.
#[derive(Debug, Clone)]
pub struct Cgroups {
    base: PathBuf,
}

fn write(path: &Path, text: &str) -> io::Result<()> {
    std::fs::write(path, text)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl Cgroups {
    /// Sets up `hangar-<host_id>` under `root` with the memory controller,
    /// or says why it cannot.
    pub fn setup(root: &Path, host_id: &str) -> Result<Self, String> {
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(|_| format!("no cgroup v2 hierarchy at {}", root.display()))?;
        if !controllers.split_whitespace().any(|c| c == "memory") {
            return Err(format!(
                "the memory controller is not available at {}",
                root.display()
            ));
        }
        let base = root.join(format!("hangar-{host_id}"));
        let attempt = || -> io::Result<()> {
            write(&root.join("cgroup.subtree_control"), "+memory")?;
            std::fs::create_dir_all(&base)?;
            write(&base.join("cgroup.subtree_control"), "+memory")
        };
        attempt().map_err(|e| format!("cgroup v2 is not writable here: {e}"))?;
        Ok(Self { base })
    }

    /// Creates (or updates) the machine's cgroup with its memory limit and
    /// returns its path, for pilot.
    pub fn machine(&self, id: &str, memory_mb: u64) -> io::Result<PathBuf> {
        let dir = self.base.join(id);
        std::fs::create_dir_all(&dir)?;
        write(
            &dir.join("memory.max"),
            &(memory_mb * 1024 * 1024).to_string(),
        )?;
        Ok(dir)
    }

    /// Removes the machine's cgroup once its processes are gone: pilot
    /// lingers briefly after its workload exits, so this retries for a
    /// bounded time.
    pub async fn remove_when_empty(&self, id: &str) {
        let dir = self.base.join(id);
        let deadline = tokio::time::Instant::now() + REMOVE_WAIT;
        loop {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "machine cgroup left behind");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

/// Moves the calling process into `cgroup` (pilot, before it starts the
/// workload, so the workload inherits it).
pub fn enter(cgroup: &Path) -> io::Result<()> {
    write(
        &cgroup.join("cgroup.procs"),
        &std::process::id().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory shaped like a cgroup v2 root: real writes, no kernel.
    fn fake_root(controllers: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), controllers).unwrap();
        dir
    }

    #[test]
    fn sets_up_limits_where_memory_is_delegated() {
        let root = fake_root("cpu io memory pids");
        let cg = Cgroups::setup(root.path(), "h1").unwrap();
        let subtree = std::fs::read_to_string(root.path().join("hangar-h1/cgroup.subtree_control"));
        assert_eq!(subtree.unwrap(), "+memory");
        let dir = cg.machine("m1", 256).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            "268435456"
        );
        enter(&dir).unwrap();
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert_eq!(procs, std::process::id().to_string());
    }

    #[tokio::test]
    async fn removes_a_machine_cgroup() {
        let root = fake_root("memory");
        let cg = Cgroups::setup(root.path(), "h1").unwrap();
        let dir = cg.machine("m1", 64).unwrap();
        // A real cgroup's files vanish with it; a plain directory needs emptying.
        for f in ["memory.max", "cgroup.procs"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        cg.remove_when_empty("m1").await;
        assert!(!dir.exists());
        cg.remove_when_empty("m1").await;
    }

    #[test]
    fn says_why_without_cgroup_v2_or_memory() {
        let none = tempfile::tempdir().unwrap();
        assert!(
            Cgroups::setup(none.path(), "h1")
                .unwrap_err()
                .contains("no cgroup v2")
        );
        let no_memory = fake_root("cpu pids");
        assert!(
            Cgroups::setup(no_memory.path(), "h1")
                .unwrap_err()
                .contains("memory controller")
        );
    }
}

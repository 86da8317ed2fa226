//! [`Processes`]: workloads under their pilots. Each machine has a
//! directory (`<data dir>/machines/<id>`) holding its pilot's socket, the
//! exit pilot records and its logs, and, for a machine that runs an image,
//! its sandbox's bundle and upper layer. Its pilot serves the calls below
//! on its socket. A machine that runs an image runs in its sandbox; a host
//! command (`hangar/host`) runs as a process group under pilot, its memory
//! limit in a cgroup where cgroup v2 is writable. Where this host cannot
//! make sandboxes, the built-in image alone still runs, as a host process
//! (Hangar's own binary is all it runs).

use super::sandbox::Sandboxes;
use super::{Launch, RunFuture, Runtime, RuntimeError};
use crate::cgroup::Cgroups;
use crate::images::builtin::HANGAR_MOUNT;
use crate::pilot::{self, ExecCall, ExitInfo, PilotError, PilotSpec};
use hangar_api::machine::{ExecResponse, ProcessStat};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a pilot may take to report ready.
const LAUNCH_WAIT: Duration = Duration::from_secs(10);

/// How long a readiness probe waits for a connection to a service port.
const CONNECT_WAIT: Duration = Duration::from_millis(250);

/// Machines as host processes under their pilots.
pub struct Processes {
    /// The `hangar` executable, which runs pilot.
    exe: PathBuf,
    /// `<data dir>/machines`.
    dir: PathBuf,
    /// Memory limits of host commands, where cgroup v2 is writable.
    cgroups: Option<Cgroups>,
    /// The sandboxes, or why this host cannot make them.
    sandboxes: Result<Sandboxes, String>,
    /// What a machine's log keeps: bytes per file, files.
    logs: (u64, u32),
}

impl Processes {
    /// Machines under `dir`, their pilots run by `exe`, memory limits in
    /// `cgroups` (when there are), logs rotated at `logs` (bytes, files).
    pub fn new(
        exe: PathBuf,
        dir: PathBuf,
        cgroups: Option<Cgroups>,
        sandboxes: Result<Sandboxes, String>,
        logs: (u64, u32),
    ) -> Self {
        Self {
            exe,
            dir,
            cgroups,
            sandboxes,
            logs,
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
}

fn failed(e: PilotError) -> RuntimeError {
    match e {
        PilotError::Timeout { .. } => RuntimeError::Timeout(e.to_string()),
        other => RuntimeError::Failed(other.to_string()),
    }
}

impl Runtime for Processes {
    fn spawn<'a>(
        &'a self,
        id: &'a str,
        launch: &'a Launch,
    ) -> RunFuture<'a, Result<u32, RuntimeError>> {
        Box::pin(async move {
            let dir = self.dir(id);
            std::fs::create_dir_all(&dir)
                .map_err(|e| RuntimeError::Failed(format!("creating {}: {e}", dir.display())))?;
            // Earlier versions left the spec, secrets and all, on disk.
            let _ = std::fs::remove_file(dir.join("spec.json"));
            let mut spec = PilotSpec {
                machine_id: id.to_string(),
                argv: launch.argv.clone(),
                env: launch.env.clone(),
                cgroup: None,
                sandbox: None,
                log_max_bytes: self.logs.0,
                log_files: self.logs.1,
            };
            match (&launch.image, &self.sandboxes) {
                (Some(image), Ok(sandboxes)) => {
                    let sandbox = sandboxes
                        .prepare(id, &dir, launch, image)
                        .map_err(RuntimeError::Failed)?;
                    spec.sandbox = Some(sandbox);
                }
                (Some(image), Err(_)) if image.builtin => {
                    // Hangar's own binary, at its place on this host.
                    if spec.argv.first().is_some_and(|a| a == HANGAR_MOUNT) {
                        spec.argv[0] = self.exe.display().to_string();
                    }
                }
                (Some(_), Err(why)) => {
                    return Err(RuntimeError::Failed(format!(
                        "machines that run images need a sandbox, and this host has none: {why}"
                    )));
                }
                (None, _) => {
                    spec.cgroup = match &self.cgroups {
                        Some(cg) => Some(cg.machine(id, launch.memory_mb).map_err(|e| {
                            RuntimeError::Failed(format!("setting up the memory limit: {e}"))
                        })?),
                        None => None,
                    };
                }
            }
            let launched = pilot::launch(&self.exe, &dir, &spec, LAUNCH_WAIT).await;
            if launched.is_err()
                && spec.sandbox.is_some()
                && let Ok(sandboxes) = &self.sandboxes
            {
                // pilot cleans up after a failed runc; not after its own end.
                let _ = sandboxes.remove(id);
            }
            launched.map_err(failed)
        })
    }

    fn alive<'a>(&'a self, id: &'a str) -> RunFuture<'a, bool> {
        Box::pin(async move { pilot::alive(&self.dir(id)).await })
    }

    fn signal<'a>(&'a self, id: &'a str, signal: i32) -> RunFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move { pilot::signal(&self.dir(id), signal).await.map_err(failed) })
    }

    fn freeze<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        // Memory stays, the CPU is freed.
        Box::pin(async move { pilot::freeze(&self.dir(id), true).await.map_err(failed) })
    }

    fn thaw<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move { pilot::freeze(&self.dir(id), false).await.map_err(failed) })
    }

    fn exited<'a>(&'a self, id: &'a str) -> RunFuture<'a, Option<ExitInfo>> {
        Box::pin(async move {
            let dir = self.dir(id);
            // A pilot that no longer answers wrote the exit before it went.
            match pilot::status(&dir).await.and_then(|status| status.exit) {
                Some(exit) => Some(exit),
                None => pilot::recorded_exit(&dir),
            }
        })
    }

    fn wait_exit<'a>(&'a self, id: &'a str) -> RunFuture<'a, ExitInfo> {
        Box::pin(async move { pilot::wait_exit(&self.dir(id)).await })
    }

    fn accepts<'a>(&'a self, _id: &'a str, addr: SocketAddr) -> RunFuture<'a, bool> {
        // The machine's address is on the host's loopback, or behind its
        // bridge: a connection is made at once or refused, and one that
        // hangs (its SYN lost) is tried again rather than waited for.
        Box::pin(async move {
            let connect = tokio::net::TcpStream::connect(addr);
            matches!(tokio::time::timeout(CONNECT_WAIT, connect).await, Ok(Ok(_)))
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if let Some(cg) = &self.cgroups {
                cg.remove_when_empty(id).await;
            }
            if let Ok(sandboxes) = &self.sandboxes {
                sandboxes.remove(id).map_err(RuntimeError::Failed)?;
            }
            let dir = self.dir(id);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RuntimeError::Failed(format!(
                    "removing {}: {e}",
                    dir.display()
                ))),
            }
        })
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        call: &'a ExecCall,
    ) -> RunFuture<'a, Result<ExecResponse, RuntimeError>> {
        Box::pin(async move { pilot::exec(&self.dir(id), call).await.map_err(failed) })
    }

    fn ps<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<Vec<ProcessStat>, RuntimeError>> {
        Box::pin(async move { pilot::ps(&self.dir(id)).await.map_err(failed) })
    }

    fn machines(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flat_map(|entries| entries.flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if let Ok(sandboxes) = &self.sandboxes {
            ids.extend(sandboxes.machines());
        }
        ids.sort();
        ids.dedup();
        ids
    }

    fn shutdown(&self) {
        if let Ok(sandboxes) = &self.sandboxes {
            sandboxes.shutdown();
        }
    }

    fn image_network(&self) -> Option<hangar_api::AddrBlock> {
        self.sandboxes.as_ref().ok().map(Sandboxes::network_block)
    }
}

/// Where the machines of a data dir live.
pub fn machines_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("machines")
}

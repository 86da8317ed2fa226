//! [`Processes`]: the runtime of host processes. Each machine has a
//! directory (`<data dir>/machines/<id>`) holding its pilot's socket, the
//! exit pilot records and its logs; its workload runs as a process group
//! under that pilot, which serves the calls below on its socket. A memory
//! limit goes in a cgroup where cgroup v2 is writable.

use super::{Launch, RunFuture, Runtime, RuntimeError};
use crate::cgroup::Cgroups;
use crate::pilot::{self, ExecCall, ExitInfo, PilotError, PilotSpec};
use hangar_api::machine::{ExecResponse, ProcessStat};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;
/// How long a pilot may take to report ready.
const LAUNCH_WAIT: Duration = Duration::from_secs(10);

/// Machines as host processes under their pilots.
pub struct Processes {
    /// The `hangar` executable, which runs pilot.
    exe: PathBuf,
    /// `<data dir>/machines`.
    dir: PathBuf,
    /// Memory limits, where cgroup v2 is writable.
    cgroups: Option<Cgroups>,
    /// What a machine's log keeps: bytes per file, files.
    logs: (u64, u32),
}

impl Processes {
    /// Machines under `dir`, their pilots run by `exe`, memory limits in
    /// `cgroups` (when there are), logs rotated at `logs` (bytes, files).
    pub fn new(exe: PathBuf, dir: PathBuf, cgroups: Option<Cgroups>, logs: (u64, u32)) -> Self {
        Self {
            exe,
            dir,
            cgroups,
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
            let cgroup = match &self.cgroups {
                Some(cg) => Some(cg.machine(id, launch.memory_mb).map_err(|e| {
                    RuntimeError::Failed(format!("setting up the memory limit: {e}"))
                })?),
                None => None,
            };
            std::fs::create_dir_all(&dir)
                .map_err(|e| RuntimeError::Failed(format!("creating {}: {e}", dir.display())))?;
            // Earlier versions left the spec, secrets and all, on disk.
            let _ = std::fs::remove_file(dir.join("spec.json"));
            let spec = PilotSpec {
                machine_id: id.to_string(),
                argv: launch.argv.clone(),
                env: launch.env.clone(),
                cgroup,
                log_max_bytes: self.logs.0,
                log_files: self.logs.1,
            };
            pilot::launch(&self.exe, &dir, &spec, LAUNCH_WAIT)
                .await
                .map_err(failed)
        })
    }

    fn alive<'a>(&'a self, id: &'a str) -> RunFuture<'a, bool> {
        Box::pin(async move { pilot::alive(&self.dir(id)).await })
    }

    fn signal<'a>(&'a self, id: &'a str, signal: i32) -> RunFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move { pilot::signal(&self.dir(id), signal).await.map_err(failed) })
    }

    fn freeze<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        // SIGSTOP of the process group: memory stays, the CPU is freed.
        self.signal(id, SIGSTOP)
    }

    fn thaw<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        self.signal(id, SIGCONT)
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
        // The machine's address is on the host's loopback.
        Box::pin(async move { tokio::net::TcpStream::connect(addr).await.is_ok() })
    }

    fn remove<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if let Some(cg) = &self.cgroups {
                cg.remove_when_empty(id).await;
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
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// Where the machines of a data dir live.
pub fn machines_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("machines")
}

//! [`Runtime`]: how a machine's workload runs. The FSM engine launches,
//! signals, freezes, probes, waits for, kills and removes workloads only
//! through it, each by machine id; it never touches a process, a socket of
//! a pilot or a machine's files itself. So a second runtime (an OCI
//! sandbox) plugs in beside today's, and tests drive the engine with a fake
//! that fails and crashes on cue.
//!
//! - [`process`]: each workload under its own pilot (in its own session,
//!   so it outlives flyd): a machine that runs an image in a sandbox, a
//!   host command as a host process group.
//! - [`sandbox`]: the sandbox: an OCI container under runc, its root an
//!   overlay of the image.
//! - [`network`]: each sandbox's network namespace, on a host bridge.

pub mod network;
pub mod process;
pub mod sandbox;

use crate::pilot::{ExecCall, ExitInfo};
use hangar_api::machine::{ExecResponse, ProcessStat};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

/// What a runtime call returns: a boxed future, so the engine can hold the
/// runtime as `Arc<dyn Runtime>`.
pub type RunFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a workload is launched with.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// The whole environment: the config's, the app's secrets, Fly's.
    pub env: BTreeMap<String, String>,
    /// The memory the machine reserved, its limit where one can be set.
    pub memory_mb: u64,
    /// The image to run in a sandbox; `None` for a host command.
    pub image: Option<sandbox::LaunchImage>,
}

/// Why this host makes no sandboxes.
#[derive(Debug)]
pub enum NoSandboxes {
    /// It cannot (not root, no runc...): machines that need one fail to
    /// start, saying this, and the built-in image runs as a host process.
    Unable(String),
    /// Its config asks for what it cannot do: flyd does not start.
    Misconfigured(String),
}

impl From<String> for NoSandboxes {
    fn from(why: String) -> Self {
        Self::Unable(why)
    }
}

impl From<&str> for NoSandboxes {
    fn from(why: &str) -> Self {
        Self::Unable(why.to_string())
    }
}

/// `name`'s path on the PATH, if it is there.
pub(crate) fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A runtime call that failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// It did not finish in time (an `exec` past its timeout).
    #[error("{0}")]
    Timeout(String),
    /// Anything else, with the reason.
    #[error("{0}")]
    Failed(String),
}

/// How machines' workloads run on this host. Every call is idempotent in
/// the sense the FSM steps need: asking about a workload that never ran,
/// or has gone, answers as much (not running, no exit), and removing one
/// that is gone succeeds.
pub trait Runtime: Send + Sync + 'static {
    /// Launches the workload of machine `id`. Returns the id of this run
    /// of it (a pid): an exit is matched to the run it ended by it.
    fn spawn<'a>(
        &'a self,
        id: &'a str,
        launch: &'a Launch,
    ) -> RunFuture<'a, Result<u32, RuntimeError>>;

    /// Whether the workload runs (a frozen one does).
    fn alive<'a>(&'a self, id: &'a str) -> RunFuture<'a, bool>;

    /// Sends `signal` to every process of the workload.
    fn signal<'a>(&'a self, id: &'a str, signal: i32) -> RunFuture<'a, Result<(), RuntimeError>>;

    /// Stops the workload's processes where they are (memory kept).
    fn freeze<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>>;

    /// Lets a frozen workload run again (nothing for a running one).
    fn thaw<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>>;

    /// How the workload's last run ended, once it has (`None` while it
    /// runs, and for one that never ran).
    fn exited<'a>(&'a self, id: &'a str) -> RunFuture<'a, Option<ExitInfo>>;

    /// Waits until the workload's current run ends, and says how. For a
    /// workload not running: its last exit, or an unknown one.
    fn wait_exit<'a>(&'a self, id: &'a str) -> RunFuture<'a, ExitInfo>;

    /// Whether `addr`, where one of the machine's services listens,
    /// accepts connections.
    fn accepts<'a>(&'a self, id: &'a str, addr: SocketAddr) -> RunFuture<'a, bool>;

    /// Removes what the machine left (files, limits) once its workload is
    /// gone.
    fn remove<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>>;

    /// Runs a command beside the workload, in its environment.
    fn exec<'a>(
        &'a self,
        id: &'a str,
        call: &'a ExecCall,
    ) -> RunFuture<'a, Result<ExecResponse, RuntimeError>>;

    /// The workload's processes.
    fn ps<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<Vec<ProcessStat>, RuntimeError>>;

    /// The ids of every machine the runtime holds something of (running
    /// or not), so flyd can remove those it does not know.
    fn machines(&self) -> Vec<String>;

    /// Releases what the runtime holds for all machines, at flyd's
    /// shutdown (workloads left running keep what they have).
    fn shutdown(&self) {}

    /// The block a machine that runs an image takes its address from,
    /// where each such machine has a network of its own; `None` where
    /// machines share the host's (their addresses on its loopback).
    fn image_network(&self) -> Option<hangar_api::AddrBlock> {
        None
    }
}

/// How long a workload may take to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// SIGKILLs the workload of `id` and waits for its exit.
pub async fn kill(runtime: &dyn Runtime, id: &str) -> Result<ExitInfo, RuntimeError> {
    const SIGKILL: i32 = 9;
    let _ = runtime.signal(id, SIGKILL).await;
    tokio::time::timeout(KILL_WAIT, runtime.wait_exit(id))
        .await
        .map_err(|_| {
            RuntimeError::Failed(format!(
                "workload still running {KILL_WAIT:?} after SIGKILL"
            ))
        })
}

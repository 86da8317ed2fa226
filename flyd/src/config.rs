//! flyd's configuration: the `[flyd]` table of the config file.

use hangar_api::{AddrBlock, Region};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// How one flyd host runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlydConfig {
    /// Where the host RPC API listens (flaps and the proxy call it).
    pub listen: Listen,
    /// This host's id in the RIB; unique across hosts.
    pub host_id: String,
    /// The region this host is in.
    pub region: Region,
    /// Loopback block the addresses of machines without a network of
    /// their own come from (host commands, and every machine where this
    /// host cannot make sandboxes), as CIDR.
    pub private_range: AddrBlock,
    /// Grace period between the stop signal and SIGKILL, when neither the
    /// request nor `config.stop_config` sets one.
    pub stop_timeout_ms: u64,
    /// The longest grace period a stop may ask for (a request's or
    /// `stop_config`'s is cut to it), so no machine holds its host's
    /// operations or shutdown for long.
    pub max_stop_timeout_ms: u64,
    /// How long stopping every machine at shutdown may take in all; past
    /// it flyd exits and leaves the rest running under their pilots (the
    /// next start finds them again).
    pub shutdown_timeout_ms: u64,
    /// The restart policy's pause before the second restart in a row; it
    /// doubles with each further one, up to `restart_backoff_max_ms`. A run
    /// that lasted that long starts the count again.
    pub restart_backoff_ms: u64,
    pub restart_backoff_max_ms: u64,
    /// A machine's `machine.log` is rotated past `log_max_bytes`, keeping
    /// `log_files` rotated files (`machine.log.1`, ...).
    pub log_max_bytes: u64,
    pub log_files: u32,
    /// How long a start waits for the services' ports to accept connections
    /// before it reports the machine started anyway.
    pub ready_timeout_ms: u64,
    /// How long an operation waits for the one before it on the same machine.
    pub op_wait_ms: u64,
    /// The `hangar` binary that runs `pilot` and the built-in images.
    /// Unset means the running executable.
    pub exe: Option<PathBuf>,
    /// Host CPUs to schedule; unset means the CPUs this host has.
    pub cpus: Option<u64>,
    /// Host memory to schedule, in MB; unset means this host's memory.
    pub memory_mb: Option<u64>,
    /// Shared vCPUs per CPU (shared CPUs are time-sliced, as on Fly).
    pub cpu_overcommit: u64,
    /// Memory that may be reserved, as a multiple of `memory_mb`.
    pub memory_overcommit: f64,
    /// Where the cgroup v2 hierarchy is mounted (memory limits).
    pub cgroup_root: PathBuf,
    /// Whether machines may run `hangar/host`: a host command outside any
    /// image or sandbox, as flyd's own user. Off unless set.
    pub host_commands: bool,
    /// Sandboxes: the OCI runtime, where roots are mounted, limits.
    pub sandbox: crate::runtime::sandbox::SandboxConfig,
    /// Sandboxes' networks: the address block, outbound traffic.
    pub network: crate::runtime::network::NetworkConfig,
    /// Images: the id range machines map to, registry credentials.
    pub images: crate::images::ImagesConfig,
    /// Testing only: `"<fsm>/<step>/<before|after>"` (for example
    /// `"create/spawn/after"`) makes flyd kill its own process with SIGKILL
    /// at that point of the first run that reaches it, so crash recovery can
    /// be tested against the real binary.
    pub crash_at: Option<String>,
}

/// Where flyd's host API listens: a TCP address (`127.0.0.1:4281`), or a
/// unix socket (`unix:flyd.sock`, a relative path being under the host's
/// data dir) for a host whose callers all run on it, so it needs no network
/// listener at all.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.strip_prefix("unix:") {
            Some("") => Err("flyd.listen: unix: needs a socket path".into()),
            Some(path) => Ok(Self::Unix(PathBuf::from(path))),
            None => text.parse().map(Self::Tcp).map_err(|e| {
                format!("flyd.listen: {text:?} is neither ip:port nor unix:<path>: {e}")
            }),
        }
    }
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl Default for FlydConfig {
    fn default() -> Self {
        Self {
            listen: Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], 4281))),
            host_id: "dev-host-1".into(),
            region: "dev".parse().expect("a region name"),
            private_range: "127.10.0.0/16".parse().expect("an address block"),
            stop_timeout_ms: 5_000,
            max_stop_timeout_ms: 300_000,
            shutdown_timeout_ms: 60_000,
            restart_backoff_ms: 1_000,
            restart_backoff_max_ms: 60_000,
            log_max_bytes: 10 << 20,
            log_files: 3,
            ready_timeout_ms: 10_000,
            op_wait_ms: 30_000,
            exe: None,
            cpus: None,
            memory_mb: None,
            cpu_overcommit: 16,
            memory_overcommit: 1.0,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            host_commands: false,
            sandbox: crate::runtime::sandbox::SandboxConfig::default(),
            network: crate::runtime::network::NetworkConfig::default(),
            images: crate::images::ImagesConfig::default(),
            crash_at: None,
        }
    }
}

impl FlydConfig {
    /// Every problem with this config, one line each.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if !self.private_range.base().is_loopback() {
            problems.push(format!(
                "flyd.private_range: {} is not a loopback block (such as \"127.10.0.0/16\")",
                self.private_range
            ));
        }
        if let Err(problem) = self.network.validate() {
            problems.push(problem);
        }
        if self.network.block.overlaps(&self.private_range) {
            problems.push(format!(
                "flyd.network.block: {} overlaps flyd.private_range {}",
                self.network.block, self.private_range
            ));
        }
        if self.host_id.trim().is_empty() {
            problems.push("flyd.host_id: must not be empty".into());
        }
        if self.stop_timeout_ms > self.max_stop_timeout_ms {
            problems.push("flyd.stop_timeout_ms: must be at most max_stop_timeout_ms".into());
        }
        if self.restart_backoff_ms > self.restart_backoff_max_ms {
            problems.push("flyd.restart_backoff_ms: must be at most restart_backoff_max_ms".into());
        }
        if self.cpu_overcommit == 0 {
            problems.push("flyd.cpu_overcommit: must be at least 1".into());
        }
        if !(self.memory_overcommit > 0.0 && self.memory_overcommit <= 100.0) {
            problems.push("flyd.memory_overcommit: must be above 0 and at most 100".into());
        }
        let ids = self.images.id_base;
        if ids == 0 || ids.checked_add(crate::images::IDS_PER_MACHINE).is_none() {
            problems.push(format!(
                "flyd.images.id_base: {ids} must be above 0 and leave room for {} ids",
                crate::images::IDS_PER_MACHINE
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_range_must_be_a_loopback_block() {
        assert!(FlydConfig::default().validate().is_ok());
        let outside = FlydConfig {
            private_range: "10.0.0.0/16".parse().unwrap(),
            ..FlydConfig::default()
        };
        assert!(outside.validate().is_err());
        for bad in ["127.0.0.0", "127.0.0.0/31", "x/16"] {
            let json = serde_json::json!({ "private_range": bad });
            let e = serde_json::from_value::<FlydConfig>(json).unwrap_err();
            assert!(
                e.to_string().contains("is not an IPv4 CIDR block"),
                "{bad}: {e}"
            );
        }
    }
}

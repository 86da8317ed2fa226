//! Machines: their configuration, states, events, and the requests that act
//! on them, in the JSON shapes of Fly's Machines API.
//!
//! Config structs keep fields they do not know in `extra`, so a config a
//! client sends comes back unchanged even where Hangar does not use a field.

use crate::duration::GoDuration;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The image that runs Hangar's built-in echo server.
pub const ECHO_IMAGE: &str = "hangar/echo";

/// The pseudo-image of a host command (`init.exec`) run outside any image
/// or sandbox, as Hangar's own user: refused unless the host's config turns
/// `flyd.host_commands` on.
pub const HOST_IMAGE: &str = "hangar/host";

/// Most services one machine config may declare.
pub const MAX_SERVICES: usize = 16;
/// Most public ports, over all of a config's services.
pub const MAX_PORTS: usize = 32;
/// Most health checks, top-level and per service together.
pub const MAX_CHECKS: usize = 32;

/// A machine's lifecycle state, as Fly names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Created,
    Starting,
    Started,
    Stopping,
    Stopped,
    Suspending,
    Suspended,
    Replacing,
    Destroying,
    Destroyed,
    Failed,
}

impl MachineState {
    /// Every state, in lifecycle order (used to report counts by state).
    pub const ALL: [MachineState; 11] = [
        Self::Created,
        Self::Starting,
        Self::Started,
        Self::Stopping,
        Self::Stopped,
        Self::Suspending,
        Self::Suspended,
        Self::Replacing,
        Self::Destroying,
        Self::Destroyed,
        Self::Failed,
    ];

    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Started => "started",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Suspending => "suspending",
            Self::Suspended => "suspended",
            Self::Replacing => "replacing",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MachineState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown machine state {s:?}"))
    }
}

/// A Machine as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    pub region: String,
    /// Same as `version` (Fly keeps both).
    pub instance_id: String,
    pub version: String,
    /// The machine's own address; its services listen on it.
    pub private_ip: String,
    pub config: MachineConfig,
    /// The image the machine runs, resolved to its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<ImageRef>,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub cordoned: bool,
    #[serde(default)]
    pub host_status: String,
    /// The latest result of each check.
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
    /// The lease nonce, only in the answer to a create with `lease_ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Newest first.
    #[serde(default)]
    pub events: Vec<MachineEvent>,
}

/// `ImageRef`: where a machine's image came from, and the digest of the
/// manifest it runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One entry of a machine's event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineEvent {
    pub id: String,
    /// `launch`, `start`, `stop`, `exit`, `destroy`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The state the machine reached with this event.
    pub status: String,
    /// `user` for API calls, `flyd` for what flyd decided on its own.
    pub source: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
}

/// A machine's configuration (`fly.MachineConfig`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineConfig {
    #[serde(default)]
    pub image: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<MachineInit>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<MachineService>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<MachineGuest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_config: Option<StopConfig>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Machine-level checks by name: reported, but they do not gate routing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, MachineCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<MachineRestart>,
    /// Destroy the machine once its workload exits and is not restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_destroy: Option<bool>,
    /// Fields Hangar does not interpret, kept so they round-trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `fly.MachineInit`: what the machine runs instead of the image's default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineInit {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `fly.MachineGuest`: the resources a machine asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineGuest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_kind: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `fly.MachineRestart`: what flyd does when the workload exits by itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineRestart {
    /// `no`, `always` or `on-failure` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// With `on-failure`: restarts in a row before the machine stays stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// `fly.StopConfig`: how the machine is asked to stop.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StopConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<GoDuration>,
}

/// A service: one internal port exposed through the proxy on some public ports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineService {
    #[serde(default = "default_protocol")]
    pub protocol: String,
    pub internal_port: u16,
    #[serde(default)]
    pub ports: Vec<MachinePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// Unset means on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostop: Option<Autostop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_machines_running: Option<u32>,
    /// Checks whose failure takes the machine out of the proxy's choice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<MachineCheck>,
    /// Hangar's own (not in Fly's spec): pin each client to the machine
    /// that first served it, while that machine can take its requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// How the proxy recognises a client to pin to its machine: by a cookie
/// the proxy sets, or by a header the app hands out (an MCP server's
/// `Mcp-Session-Id`, say). Exactly one of the two.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sticky {
    /// The proxy sets `Set-Cookie: <cookie>=<machine id>` on a response
    /// and sends the client's later requests carrying it to that machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// A header the machine sets on a response and the client sends back
    /// on its later requests: the proxy remembers which machine gave out
    /// each value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// How long a pin lasts unused, in seconds (the cookie's `Max-Age`);
    /// default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

impl Sticky {
    /// Pins last this long unused when `ttl_secs` is not set.
    pub const DEFAULT_TTL_SECS: u64 = 3600;

    /// Checks that exactly one of `cookie` and `header` is a usable name.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let token = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        match (self.cookie.as_deref(), self.header.as_deref()) {
            (Some(name), None) | (None, Some(name)) if token(name) => {}
            (Some(name), None) => {
                return Err(format!("{at}.cookie: {name:?} is not a cookie name"));
            }
            (None, Some(name)) => {
                return Err(format!("{at}.header: {name:?} is not a header name"));
            }
            _ => return Err(format!("{at}: set exactly one of cookie and header")),
        }
        if self.ttl_secs == Some(0) {
            return Err(format!("{at}.ttl_secs: must be at least 1"));
        }
        Ok(())
    }
}

/// A health check (`fly.MachineCheck`, `fly.MachineServiceCheck`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachineCheck {
    /// `tcp` or `http`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Defaults to the service's `internal_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Default 15s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<GoDuration>,
    /// Default 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<GoDuration>,
    /// How long after a start before the first check. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `http` (the default) or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A check's latest result, as `machine.checks` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckStatus {
    pub name: String,
    /// `passing`, `warning` (not run yet) or `critical`.
    pub status: String,
    pub output: String,
    pub updated_at: String,
}

fn default_protocol() -> String {
    "tcp".to_string()
}

/// A public port of a service and the handlers the proxy applies on it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MachinePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_https: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_options: Option<HttpOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_proto_options: Option<ProxyProtoOptions>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `fly.ProxyProtoOptions`: which PROXY protocol header the `proxy_proto`
/// handler sends the machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProxyProtoOptions {
    /// `v1` (text, the default) or `v2` (binary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `fly.HTTPOptions`: how the proxy speaks HTTP on a port.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpOptions {
    /// Speak h2 (prior knowledge) to the machine instead of HTTP/1.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_backend: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HttpResponseOptions>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `fly.HTTPResponseOptions`: what the proxy does to responses.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpResponseOptions {
    /// Add none of the proxy's own headers (`Server`, `Via`,
    /// `fly-request-id`) to responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pristine: Option<bool>,
    /// Headers to set on responses: a string (or list of strings) sets the
    /// header, `false` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `fly.MachineServiceConcurrency`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Concurrency {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<u32>,
}

/// `autostop`: accepted as `"off" | "stop" | "suspend"` or a boolean, and
/// written back as `false`, `true` or `"suspend"`, as Fly does for older clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Autostop {
    Off,
    Stop,
    Suspend,
}

impl Serialize for Autostop {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => s.serialize_bool(false),
            Self::Stop => s.serialize_bool(true),
            Self::Suspend => s.serialize_str("suspend"),
        }
    }
}

impl<'de> Deserialize<'de> for Autostop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(false) => Ok(Self::Off),
            Value::Bool(true) => Ok(Self::Stop),
            Value::String(s) => match s.as_str() {
                "off" => Ok(Self::Off),
                "stop" => Ok(Self::Stop),
                "suspend" => Ok(Self::Suspend),
                other => Err(serde::de::Error::custom(format!(
                    "autostop: expected \"off\", \"stop\", \"suspend\" or a boolean, got {other:?}"
                ))),
            },
            other => Err(serde::de::Error::custom(format!(
                "autostop: expected \"off\", \"stop\", \"suspend\" or a boolean, got {other}"
            ))),
        }
    }
}

/// `POST /v1/apps/{app}/machines`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateMachineRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    pub config: MachineConfig,
    /// Create without starting: the machine stays `created`.
    #[serde(default)]
    pub skip_launch: bool,
    /// Start cordoned: the proxy sends it no traffic until uncordoned.
    #[serde(default)]
    pub skip_service_registration: bool,
    /// Take a lease of this many seconds with the create; its nonce comes
    /// back in the machine's `nonce`.
    #[serde(default)]
    pub lease_ttl: Option<u64>,
}

/// `POST .../stop`: signal and grace period, both optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StopRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<GoDuration>,
}

/// `POST /v1/apps/{app}/machines/{id}` (update): the whole new config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateMachineRequest {
    pub config: MachineConfig,
    /// Refuse (409) unless this is still the machine's version.
    #[serde(default)]
    pub current_version: Option<String>,
    /// Apply without starting (or restarting) the machine.
    #[serde(default)]
    pub skip_launch: bool,
    #[serde(default)]
    pub name: Option<String>,
}

/// One entry of `GET .../versions`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineVersion {
    pub version: String,
    pub user_config: MachineConfig,
}

/// A lease on a machine (`GET|POST .../lease`, inside `data`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub nonce: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub owner: String,
    #[serde(default)]
    pub description: String,
    /// The machine version the lease was taken on.
    #[serde(default)]
    pub version: String,
}

/// `POST .../lease`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateLeaseRequest {
    /// Seconds; default 30.
    #[serde(default)]
    pub ttl: Option<u64>,
    #[serde(default)]
    pub description: Option<String>,
}

/// `POST .../signal`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SignalRequest {
    pub signal: String,
}

/// `POST .../exec`: `command` (argv), or the older `cmd` (split on spaces).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub cmd: Option<String>,
    /// Seconds; default 30.
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub stdin: Option<String>,
}

/// The answer to `exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecResponse {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// One process of `GET .../ps`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessStat {
    pub pid: u32,
    pub command: String,
    /// CPU time used, in clock ticks (user + system).
    pub cpu: u64,
    /// Resident memory, in bytes.
    pub rss: u64,
    pub directory: String,
    #[serde(default)]
    pub listen_sockets: Vec<serde_json::Value>,
}

/// `PUT|PATCH .../metadata`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateMetadataRequest {
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `POST .../metadata/{key}`, and the answer to `GET .../metadata/{key}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetadataValue {
    pub value: String,
}

/// The answer to `GET .../wait` when the state was reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitResponse {
    pub ok: bool,
    pub state: MachineState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The answer to `POST .../start`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartResponse {
    pub previous_state: MachineState,
    pub migrated: bool,
    pub new_host: String,
}

/// The answer to stop and destroy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OkResponse {
    pub ok: bool,
}

/// A guest without `guest.cpus` reserves this many vCPUs (Fly's shared-cpu-1x).
pub const DEFAULT_GUEST_CPUS: u64 = 1;
/// A guest without `guest.memory_mb` reserves this much memory (MB).
pub const DEFAULT_GUEST_MEMORY_MB: u64 = 256;

impl MachineConfig {
    /// The vCPUs and memory (MB) this machine reserves on its host.
    pub fn reservation(&self) -> (u64, u64) {
        let guest = self.guest.as_ref();
        (
            guest
                .and_then(|g| g.cpus)
                .map(u64::from)
                .unwrap_or(DEFAULT_GUEST_CPUS),
            guest
                .and_then(|g| g.memory_mb)
                .map(u64::from)
                .unwrap_or(DEFAULT_GUEST_MEMORY_MB),
        )
    }

    /// Checks what flyd and the proxy rely on; each problem names its field.
    pub fn validate(&self) -> Result<(), String> {
        if self.image.trim().is_empty() {
            return Err("config.image: required".into());
        }
        // Each service, port and check costs the proxy and flyd listeners,
        // connections or timers: a config cannot ask for without bound.
        let ports: usize = self.services.iter().map(|s| s.ports.len()).sum();
        let checks =
            self.checks.len() + self.services.iter().map(|s| s.checks.len()).sum::<usize>();
        for (what, n, most) in [
            ("config.services", self.services.len(), MAX_SERVICES),
            ("config.services[].ports", ports, MAX_PORTS),
            (
                "config.checks and config.services[].checks",
                checks,
                MAX_CHECKS,
            ),
        ] {
            if n > most {
                return Err(format!("{what}: at most {most} in all, got {n}"));
            }
        }
        for (name, check) in &self.checks {
            check.validate(&format!("config.checks.{name}"))?;
            if check.port.is_none() {
                return Err(format!("config.checks.{name}.port: required"));
            }
        }
        for (i, svc) in self.services.iter().enumerate() {
            if svc.internal_port == 0 {
                return Err(format!(
                    "config.services[{i}].internal_port: must be 1-65535"
                ));
            }
            if !matches!(svc.protocol.as_str(), "tcp" | "udp") {
                return Err(format!(
                    "config.services[{i}].protocol: must be \"tcp\" or \"udp\", got {:?}",
                    svc.protocol
                ));
            }
            for (j, check) in svc.checks.iter().enumerate() {
                check.validate(&format!("config.services[{i}].checks[{j}]"))?;
            }
            if let Some(sticky) = &svc.sticky {
                sticky.validate(&format!("config.services[{i}].sticky"))?;
            }
            for (j, port) in svc.ports.iter().enumerate() {
                for h in &port.handlers {
                    if !matches!(
                        h.as_str(),
                        "http" | "tls" | "proxy_proto" | "pg_tls" | "edge_http"
                    ) {
                        return Err(format!(
                            "config.services[{i}].ports[{j}].handlers: unknown handler {h:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl MachineCheck {
    /// Checks the type and protocol; `at` names the check in messages.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        match self.kind.as_deref() {
            Some("tcp") | Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "{at}.type: must be \"tcp\" or \"http\", got {other:?}"
                ));
            }
            None => return Err(format!("{at}.type: required (\"tcp\" or \"http\")")),
        }
        if let Some(p) = self.protocol.as_deref().filter(|p| *p != "http") {
            return Err(format!(
                "{at}.protocol: only \"http\" is supported, got {p:?}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_unknown_fields_and_autostop() {
        let text = r#"{"image":"hangar/echo","schedule":"daily","services":[
            {"protocol":"tcp","internal_port":8080,"autostop":"stop","x":1,
             "ports":[{"port":80,"handlers":["http"]}]}]}"#;
        let cfg: MachineConfig = serde_json::from_str(text).unwrap();
        assert_eq!(cfg.services[0].autostop, Some(Autostop::Stop));
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back["schedule"], "daily");
        assert_eq!(back["services"][0]["x"], 1);
        assert_eq!(back["services"][0]["autostop"], true);
    }

    #[test]
    fn validation_names_the_field() {
        let cfg = MachineConfig::default();
        assert_eq!(cfg.validate().unwrap_err(), "config.image: required");
        let cfg: MachineConfig = serde_json::from_str(
            r#"{"image":"x","services":[{"internal_port":80,"ports":[{"handlers":["nope"]}]}]}"#,
        )
        .unwrap();
        assert!(
            cfg.validate()
                .unwrap_err()
                .starts_with("config.services[0].ports[0].handlers")
        );
        for (sticky, error) in [
            (
                r#"{}"#,
                "config.services[0].sticky: set exactly one of cookie and header",
            ),
            (
                r#"{"cookie":"a","header":"b"}"#,
                "config.services[0].sticky: set exactly one of cookie and header",
            ),
            (
                r#"{"cookie":"a b"}"#,
                "config.services[0].sticky.cookie: \"a b\" is not a cookie name",
            ),
            (
                r#"{"header":"Mcp-Session-Id","ttl_secs":0}"#,
                "config.services[0].sticky.ttl_secs: must be at least 1",
            ),
        ] {
            let cfg: MachineConfig = serde_json::from_str(&format!(
                r#"{{"image":"x","services":[{{"internal_port":80,"sticky":{sticky}}}]}}"#
            ))
            .unwrap();
            assert_eq!(cfg.validate().unwrap_err(), error, "{sticky}");
        }
    }
}

//! The RIB's rows, as its callers see them.

use hangar_api::machine::{MachineService, MachineState};

/// An app row (written by flaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRow {
    pub name: String,
    pub id: String,
    pub org_slug: String,
    pub network: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// A host row (written by its flyd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub id: String,
    pub region: String,
    /// The flyd RPC address, `ip:port`.
    pub address: String,
    pub updated_at: i64,
    /// What the host can schedule and what its machines reserve.
    pub capacity: HostCapacity,
}

/// A host's schedulable capacity (physical, times any overcommit) and what
/// its live machines reserve. Stored as JSON so it can grow fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HostCapacity {
    pub cpus: u64,
    pub memory_mb: u64,
    pub cpus_reserved: u64,
    pub memory_mb_reserved: u64,
}

impl HostCapacity {
    /// Whether a guest of `cpus` and `memory_mb` still fits.
    pub fn fits(&self, cpus: u64, memory_mb: u64) -> bool {
        self.cpus_reserved + cpus <= self.cpus
            && self.memory_mb_reserved + memory_mb <= self.memory_mb
    }
}

/// A machine row (written by the flyd that owns the machine).
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRow {
    pub id: String,
    pub app: String,
    pub region: String,
    pub host: String,
    pub state: MachineState,
    pub private_ip: String,
    pub instance_id: String,
    pub cordoned: bool,
    pub services: Vec<MachineService>,
    /// Whether every service check passes (true when there are none).
    pub healthy: bool,
    /// The app's primary region, from the config's `env.PRIMARY_REGION`.
    pub primary_region: Option<String>,
    /// Increases with every write by the owner; stale writes are dropped.
    pub row_version: u64,
    pub updated_at: i64,
}

/// A sealed app secret (written by flaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    pub name: String,
    /// Nonce and ciphertext, from [`crate::SecretBox::seal`].
    pub sealed: Vec<u8>,
    pub digest: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A custom certificate for a hostname of an app (written by flaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRow {
    pub hostname: String,
    pub app: String,
    /// PEM, leaf first.
    pub fullchain: String,
    /// The PEM private key, sealed with the secrets key (associated data:
    /// app `certificates`, name = hostname).
    pub sealed_key: Vec<u8>,
    pub created_at: i64,
}

/// An address assigned to an app (written by flaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRow {
    pub ip: String,
    pub app: String,
    /// The Fly type asked for; Hangar assigns `private_v6` (flycast).
    pub kind: String,
    pub network: String,
    pub region: String,
    pub service_name: String,
    pub created_at: i64,
}

/// A secret value as stored: sealed, with the digest of its clear value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub sealed: Vec<u8>,
    pub digest: String,
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub table: String,
    pub key: String,
    pub app: Option<String>,
    /// For a machine change, the machine as the FIB routes on it after the
    /// change (JSON of `RouteImage`).
    pub image: Option<String>,
}

/// What the FIB routes on of one machine, as a machine change carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RouteImage {
    pub id: String,
    pub app: String,
    pub region: String,
    pub host: String,
    pub state: MachineState,
    pub private_ip: String,
    pub cordoned: bool,
    pub healthy: bool,
    /// The services JSON, as the row stores it.
    pub services: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
}

impl RouteImage {
    pub fn row(&self) -> RouteRow<'_> {
        RouteRow {
            id: &self.id,
            app: &self.app,
            region: &self.region,
            host: &self.host,
            state: self.state,
            private_ip: &self.private_ip,
            cordoned: self.cordoned,
            healthy: self.healthy,
            services: &self.services,
            primary_region: self.primary_region.as_deref(),
        }
    }
}

/// A machine as the FIB reads it: borrowed columns, services still JSON so
/// the reader can share one decoded copy among machines with equal config.
pub(crate) struct RouteRow<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub region: &'a str,
    pub host: &'a str,
    pub state: MachineState,
    pub private_ip: &'a str,
    pub cordoned: bool,
    pub healthy: bool,
    pub services: &'a str,
    pub primary_region: Option<&'a str>,
}

/// Which machines [`RibView::for_each_route`] reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Routes<'a> {
    All,
    App(&'a str),
    Machine(&'a str),
}

/// One row of the `app_region_summaries` view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSummaryRow {
    pub region: String,
    pub started: u64,
    pub stopped: u64,
    pub suspended: u64,
    pub routable: u64,
}

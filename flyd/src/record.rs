//! The machine record flyd keeps for each of its machines, and its public view.

use hangar_api::machine::{
    CheckStatus, ImageRef, Lease, Machine, MachineConfig, MachineEvent, MachineState,
    MachineVersion,
};
use hangar_api::time::now_ms;
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

/// Everything flyd knows about one machine. Stored in redb; the source of
/// truth for the machine (the RIB row is derived from it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: String,
    pub name: String,
    pub app: String,
    pub region: String,
    pub host: String,
    pub state: MachineState,
    pub private_ip: String,
    pub config: MachineConfig,
    /// The image `config.image` resolved to, when the config was set.
    #[serde(default)]
    pub image_ref: Option<ImageRef>,
    /// A ULID, new for every config version.
    pub version: String,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub cordoned: bool,
    /// Newest first.
    #[serde(default)]
    pub events: Vec<MachineEvent>,
    /// Increases with every RIB write, so the RIB drops stale ones.
    #[serde(default)]
    pub rib_version: u64,
    /// The pid of the pilot of the current run, while there is one. A monitor
    /// compares it to tell its own run's exit from a later run's.
    #[serde(default)]
    pub pilot_pid: Option<u32>,
    /// The current lease, if one was taken (it may have expired).
    #[serde(default)]
    pub lease: Option<Lease>,
    /// Earlier configs, newest first, at most [`MAX_VERSIONS`].
    #[serde(default)]
    pub versions: Vec<MachineVersion>,
    /// Restarts flyd made in a row under the restart policy; a user's start
    /// resets it.
    #[serde(default)]
    pub restarts: u32,
    /// The latest result of each health check.
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
}

/// Most earlier versions kept per machine.
pub const MAX_VERSIONS: usize = 10;

/// Most events kept per machine; older ones are dropped.
const MAX_EVENTS: usize = 50;

/// Now, as RFC 3339 (`2026-01-02T03:04:05Z`), as Fly writes timestamps.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl MachineRecord {
    /// Moves to `state` and records the event that got it there.
    pub fn transition(
        &mut self,
        state: MachineState,
        kind: &str,
        source: &str,
        request: Option<serde_json::Value>,
    ) {
        self.state = state;
        self.updated_at = now_rfc3339();
        self.events.insert(
            0,
            MachineEvent {
                id: ulid::Ulid::new().to_string(),
                kind: kind.to_string(),
                status: state.to_string(),
                source: source.to_string(),
                timestamp: now_ms(),
                request,
            },
        );
        self.events.truncate(MAX_EVENTS);
    }

    /// How long the current run has been up: since the newest `started`
    /// event, if there is one.
    pub fn up_for(&self) -> Option<std::time::Duration> {
        let started = self.events.iter().find(|e| e.status == "started")?;
        u64::try_from(now_ms() - started.timestamp)
            .ok()
            .map(std::time::Duration::from_millis)
    }

    /// The lease, if one is held now.
    pub fn active_lease(&self) -> Option<&Lease> {
        let now = now_ms() / 1000;
        self.lease.as_ref().filter(|l| l.expires_at > now)
    }

    /// Whether the workload's process exists in this state.
    pub fn has_process(&self) -> bool {
        matches!(
            self.state,
            MachineState::Starting
                | MachineState::Started
                | MachineState::Stopping
                | MachineState::Suspending
                | MachineState::Suspended
        )
    }

    /// The machine as the API shows it.
    pub fn to_api(&self) -> Machine {
        Machine {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            region: self.region.clone(),
            instance_id: self.version.clone(),
            version: self.version.clone(),
            private_ip: self.private_ip.clone(),
            config: self.config.clone(),
            image_ref: self.image_ref.clone(),
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
            cordoned: self.cordoned,
            host_status: "ok".to_string(),
            checks: self.checks.clone(),
            nonce: None,
            events: self.events.clone(),
        }
    }

    /// The row the RIB keeps for routing, with the next row version.
    pub fn next_rib_row(&mut self) -> hangar_catalog::MachineRow {
        self.rib_version += 1;
        self.rib_row()
    }

    /// The row the RIB keeps for routing, at the current row version: what
    /// the RIB holds once every write reached it.
    pub fn rib_row(&self) -> hangar_catalog::MachineRow {
        hangar_catalog::MachineRow {
            id: self.id.clone(),
            app: self.app.clone(),
            region: self.region.clone(),
            host: self.host.clone(),
            state: self.state,
            private_ip: self.private_ip.clone(),
            instance_id: self.version.clone(),
            cordoned: self.cordoned,
            services: self.config.services.clone(),
            healthy: crate::checks::services_healthy(&self.checks),
            primary_region: self.config.env.get("PRIMARY_REGION").cloned(),
            row_version: self.rib_version,
            updated_at: now_ms(),
        }
    }
}

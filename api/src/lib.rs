//! Wire types shared by Hangar's servers and their clients.
//!
//! Everything here serializes to the JSON of Fly's public Machines API
//! (`machines-openapi.json`), so the same types serve flaps (the public API),
//! flyd (the per-host RPC API, which speaks the same shapes) and clients.
//!
//! - [`machine`]: `Machine`, `MachineConfig` and its parts, states and events.
//! - [`names`]: [`AppName`], [`Region`], [`MachineId`], [`AddrBlock`] and
//!   DNS names, each with its one rule.
//! - [`app`]: apps and organizations.
//! - [`auth`]: how a caller presents an API token.
//! - [`error`]: the `{"error": "..."}` body every failure answers with.
//! - [`duration`]: durations as Go strings (`"10s"`) or nanosecond numbers.
//! - [`host`]: flyd's host API: its one request of its own and its paths.
//! - [`list`]: a machine list's filters and paging.
//! - [`time`]: times as milliseconds since the epoch.

pub mod app;
pub mod auth;
pub mod duration;
pub mod error;
pub mod host;
pub mod list;
pub mod machine;
pub mod names;
pub mod time;

pub use app::{App, AppOrganization, CreateAppRequest, CreateAppResponse, ListAppsResponse};
pub use error::ErrorBody;
pub use machine::{
    CreateMachineRequest, Machine, MachineConfig, MachineEvent, MachinePort, MachineService,
    MachineState, StopRequest, WaitResponse,
};
pub use names::{AddrBlock, AppName, InvalidName, MachineId, Region};

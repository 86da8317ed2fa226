//! Wire types shared by Hangar's servers and their clients.
//!
//! Everything here serializes to the JSON of Fly's public Machines API
//! (`machines-openapi.json`), so the same types serve flaps (the public API),
//! flyd (the per-host RPC API, which speaks the same shapes) and clients.
//!
//! - [`machine`]: `Machine`, `MachineConfig` and its parts, states and events.
//! - [`app`]: apps and organizations, and the rule app names follow.
//! - [`auth`]: how a caller presents an API token.
//! - [`error`]: the `{"error": "..."}` body every failure answers with.
//! - [`duration`]: durations as Go strings (`"10s"`) or nanosecond numbers.
//! - [`host`]: the flyd host RPC requests and [`host::HostClient`], its HTTP client.
//! - [`list`]: a machine list's filters and paging.

pub mod app;
pub mod auth;
pub mod duration;
pub mod error;
pub mod host;
pub mod list;
pub mod machine;

pub use app::{App, AppOrganization, CreateAppRequest, CreateAppResponse, ListAppsResponse};
pub use error::ErrorBody;
pub use machine::{
    CreateMachineRequest, Machine, MachineConfig, MachineEvent, MachinePort, MachineService,
    MachineState, StopRequest, WaitResponse,
};

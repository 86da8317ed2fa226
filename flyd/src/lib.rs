//! flyd: the per-host orchestrator, and pilot, the per-machine supervisor.
//!
//! flyd owns the machines of one host. Every lifecycle operation is a
//! finite-state machine whose steps are recorded in redb before and after
//! they run, so a flyd killed at any moment resumes each operation at its
//! last step; machines keep running meanwhile because each runs under its
//! own pilot in its own session.
//!
//! - [`config`]: the `[flyd]` config table.
//! - [`capacity`]: what the host can schedule and what machines reserve.
//! - [`cgroup`]: memory limits through cgroup v2, where it is writable.
//! - [`images`]: OCI images, pulled or imported, stored and unpacked once.
//! - [`checks`]: health checks, reported in `machine.checks` and gating routing.
//! - [`store`]: redb tables of machine records and FSM runs.
//! - [`record`]: the machine record and its API and RIB views.
//! - [`fsm`]: the FSM kinds, their steps, and the run record.
//! - [`flyd`]: the FSM engine, recovery, and shared plumbing.
//! - [`ops`]: the lifecycle operations and read-only views.
//! - [`steps`]: the step bodies and the restart policy.
//! - [`lease`]: leases and metadata.
//! - [`workload`]: what a machine runs, and signal, exec, ps.
//! - [`runtime`]: [`runtime::Runtime`], how workloads run, and today's
//!   runtime of host processes under their pilots.
//! - [`init`]: a sandbox's PID 1: runs its command, passes signals on, reaps.
//! - [`pilot`]: the pilot process and the client for it.
//! - `logfile`: the machine's log, rotated by size.
//! - `mounts`: removing a machine's mounts.
//! - [`echo`]: the built-in image `hangar/echo`.
//! - [`rpc`]: the host RPC HTTP API.

pub mod capacity;
pub mod cgroup;
pub mod checks;
pub mod config;
pub mod echo;
pub mod flyd;
pub mod fsm;
pub mod images;
pub mod init;
pub mod lease;
mod logfile;
#[cfg(test)]
mod model;
mod mounts;
pub mod ops;
pub mod pilot;
pub mod record;
pub mod rpc;
pub mod runtime;
pub mod steps;
pub mod store;
pub mod workload;

pub use config::{FlydConfig, Listen};
pub use flyd::{Flyd, FlydError};

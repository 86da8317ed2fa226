//! Hangar's routing state.
//!
//! - [`catalog`]: [`Catalog`], one process's catalog from its config
//!   (`[catalog]`) to its end: the FIB, its follower, feed compaction, and
//!   the debug view.
//! - [`rib`]: the RIB, a SQLite database (WAL) holding orgs, tokens, apps,
//!   hosts and machines. Every write appends to a change feed in the same
//!   transaction; each row has one writer and a version, and an older version
//!   never overwrites a newer one. All of Hangar's SQL lives here.
//! - [`fib`]: the FIB (the Catalog), the proxy's in-memory routing table:
//!   loaded from the RIB, then following its change feed on its own thread
//!   under a watchdog. Readers take an immutable snapshot and never wait for
//!   a writer. Global (every machine) or regional (own region in detail,
//!   per-region summaries for the rest).
//! - [`secrets`]: app secrets sealed at rest, with a key beside the RIB, and
//!   the cluster credential its parts present to each other.
//! - [`files`]: files in the data dir, written whole or not at all.
//! - [`lock`]: [`lock::Guarded`], the only way shared mutable state is touched:
//!   through closures, with bounded, labelled waits.

pub mod catalog;
pub mod fib;
pub mod files;
pub mod lock;
pub mod rib;
pub mod secrets;

pub use catalog::{Catalog, CatalogConfig, CatalogError, CatalogMode};
pub use fib::{
    AppRoutes, Changed, Fib, FibOptions, FibSnapshot, FibStats, Follower, FollowerOptions, Load,
    Mode, RegionSummary, RemoteMachine, RouteMachine, Stall,
};
pub use rib::{
    AppRow, CertificateRow, Change, CommitHook, HostCapacity, HostRow, IpRow, MachineRow,
    RegionSummaryRow, Rib, RibError, RibView, SealedSecret, SecretRow,
};
pub use secrets::{ClusterKey, SecretBox};

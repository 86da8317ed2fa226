//! Hangar's routing state.
//!
//! - [`rib`]: the RIB, a SQLite database (WAL) holding orgs, tokens, apps,
//!   hosts and machines. Every write appends to a change feed in the same
//!   transaction; each row has one writer and a version, and an older version
//!   never overwrites a newer one. All of Hangar's SQL lives here.
//! - [`fib`]: the FIB (the Catalog), the proxy's in-memory routing table:
//!   loaded from the RIB, then following its change feed. Readers take an
//!   immutable snapshot and never wait for a writer.
//! - [`secrets`]: app secrets sealed at rest, with a key beside the RIB.
//! - [`lock`]: [`lock::Guarded`], the only way shared mutable state is touched:
//!   through closures, with bounded, labelled waits.

pub mod fib;
pub mod lock;
pub mod rib;
pub mod secrets;

pub use fib::{AppRoutes, Fib, FibSnapshot, RouteMachine};
pub use rib::{
    AppRow, CertificateRow, Change, HostCapacity, HostRow, IpRow, MachineRow, Rib, RibError,
    SealedSecret, SecretRow,
};
pub use secrets::SecretBox;

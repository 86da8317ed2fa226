//! `hangar bench <part>`: whole-system measurements a script can read.
//! Each prints a table, and with `--json` one JSON object on its last line.
//!
//! - `lifecycle`: machine lifecycle latencies through the Machines API.
//! - `catalog`: the catalog at scale: RIB build, FIB load time and memory,
//!   lookup latency and throughput (idle and under writes), and commit →
//!   visible propagation.
//! - `load`: HTTP requests at a fixed rate and their latency percentiles
//!   (what `benches/proxy-compare.sh` measures every proxy with).
//! - `handshakes`: new TLS sessions per second, each a full handshake and
//!   one request (what `benches/proxy-compare.sh` measures handshakes with).
//! - `coldstart`: a request to a stopped or suspended app through the
//!   proxy, which starts the machine, until the first byte.

mod catalog;
mod coldstart;
mod handshakes;
mod lifecycle;
mod load;

pub use catalog::{CatalogArgs, catalog};
pub use coldstart::{ColdstartArgs, coldstart};
pub use handshakes::{HandshakesArgs, handshakes};
pub use lifecycle::{LifecycleArgs, lifecycle};
pub use load::{LoadArgs, load};

/// The `q` quantile (0..=1) of sorted samples (nearest rank); 0 when empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

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
//! - `images`: pull + unpack of an image from a registry; pushes the small
//!   image `lifecycle` and `coldstart` run with `--image`.

mod catalog;
mod coldstart;
mod handshakes;
mod images;
mod lifecycle;
mod load;

pub use catalog::{CatalogArgs, catalog};
pub use coldstart::{ColdstartArgs, coldstart};
pub use handshakes::{HandshakesArgs, handshakes};
pub use images::{ImagesArgs, images};
pub use lifecycle::{LifecycleArgs, lifecycle};
pub use load::{LoadArgs, load};

use std::net::SocketAddr;

/// Where a request benchmark (`load`, `handshakes`) sends, and for how
/// long.
#[derive(clap::Args)]
struct Target {
    /// Where to send (host:port: plain HTTP for `load`, TLS for
    /// `handshakes`).
    #[arg(long)]
    addr: SocketAddr,
    /// The Host header, and the SNI over TLS (and so the app, through
    /// Hangar's proxy).
    #[arg(long, default_value = "localhost")]
    host: String,
    /// The request path and query.
    #[arg(long, default_value = "/")]
    path: String,
    /// How long to measure, in seconds (after a one-second warm-up).
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Connections at once.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Print one JSON object on the last line as well.
    #[arg(long)]
    json: bool,
}

/// What one connection measured: latencies in µs, and failures.
#[derive(Default)]
struct Tally {
    micros: Vec<f64>,
    errors: u64,
    last_error: Option<String>,
}

impl Tally {
    /// All connections' tallies in one, latencies sorted.
    fn merge(tallies: impl IntoIterator<Item = Tally>) -> Tally {
        let mut all = Tally::default();
        for t in tallies {
            all.micros.extend(t.micros);
            all.errors += t.errors;
            all.last_error = t.last_error.or(all.last_error);
        }
        all.micros.sort_by(f64::total_cmp);
        all
    }
}

/// The `q` quantile (0..=1) of sorted samples (nearest rank); 0 when empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

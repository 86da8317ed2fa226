//! [`Catalog`]: one process's catalog, from its config to its end: the FIB
//! loaded from the RIB, the follower that keeps it current (under its
//! watchdog), and the compaction of the RIB's change feed; and
//! [`debug_view`], what `/debug/catalog` shows of both halves.

use crate::fib::{Fib, FibOptions, Follower, FollowerOptions, Mode};
use crate::rib::{Rib, RibError};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// The `[catalog]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    /// How often the FIB polls the RIB for other processes' commits where
    /// the RIB's write-ahead log cannot be watched.
    pub poll_ms: u64,
    /// Changes the feed keeps when compacted; a follower further behind
    /// reloads the whole table.
    pub keep_changes: u64,
    /// How often the feed is compacted.
    pub compact_interval_ms: u64,
    /// `global` (every machine in detail) or `regional` (the detail of the
    /// proxy's region only, summaries for the other regions).
    pub mode: CatalogMode,
    /// How long a catalog writer waits for the writer lock.
    pub lock_wait_ms: u64,
    /// How long the follower may not answer before the watchdog aborts the
    /// process; 0 turns the watchdog off.
    pub watchdog_ms: u64,
}

/// `catalog.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogMode {
    Global,
    Regional,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            poll_ms: 2,
            keep_changes: 100_000,
            compact_interval_ms: 60_000,
            mode: CatalogMode::Global,
            lock_wait_ms: 1_000,
            watchdog_ms: 30_000,
        }
    }
}

impl CatalogConfig {
    /// Every problem with this config, one line each.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let problems: Vec<String> = [
            ("poll_ms", self.poll_ms),
            ("compact_interval_ms", self.compact_interval_ms),
            ("lock_wait_ms", self.lock_wait_ms),
        ]
        .into_iter()
        .filter(|(_, ms)| *ms == 0)
        .map(|(field, _)| format!("catalog.{field}: must be at least 1"))
        .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The FIB's options for a proxy in `region`.
    fn fib_options(&self, region: &str) -> FibOptions {
        FibOptions {
            mode: match self.mode {
                CatalogMode::Global => Mode::Global,
                CatalogMode::Regional => Mode::Regional(region.into()),
            },
            lock_wait: Duration::from_millis(self.lock_wait_ms),
        }
    }
}

/// Starting the catalog failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Loading the FIB from the RIB.
    #[error(transparent)]
    Rib(#[from] RibError),
    /// Starting the follower's thread.
    #[error("starting the FIB follower: {0}")]
    Follower(#[from] std::io::Error),
}

/// A running catalog: the FIB, followed; the feed, compacted. Dropping it
/// stops both.
pub struct Catalog {
    fib: Arc<Fib>,
    _follower: Follower,
    compactor: tokio::task::JoinHandle<()>,
}

impl Catalog {
    /// Loads the FIB of a proxy in `region` from `rib`, and starts its
    /// follower and the compaction of the RIB's feed (a task on the current
    /// tokio runtime; compacting twice is harmless, so every process with a
    /// catalog does).
    pub fn start(cfg: &CatalogConfig, rib: Arc<Rib>, region: &str) -> Result<Self, CatalogError> {
        let fib = Fib::load_with(&rib, cfg.fib_options(region))?;
        let follower = Follower::spawn(
            fib.clone(),
            rib.clone(),
            FollowerOptions {
                poll: Duration::from_millis(cfg.poll_ms),
                watchdog: (cfg.watchdog_ms > 0).then(|| Duration::from_millis(cfg.watchdog_ms)),
                ..FollowerOptions::default()
            },
        )?;
        let every = Duration::from_millis(cfg.compact_interval_ms);
        let compactor = tokio::spawn(compact_feed(rib.clone(), cfg.keep_changes, every));
        Ok(Self {
            fib,
            _follower: follower,
            compactor,
        })
    }

    /// The FIB, for the proxy.
    pub fn fib(&self) -> &Arc<Fib> {
        &self.fib
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        self.compactor.abort();
    }
}

/// The catalog as `/debug/catalog` shows it: the FIB's stats (sequence,
/// reloads, lock waits, stalls) and, with the RIB, its last sequence, how
/// far the FIB lags behind it, and the RIB's locks.
pub fn debug_view(fib: &Fib, rib: Option<&Rib>) -> serde_json::Value {
    let fib = fib.stats();
    let rib = rib.map(|rib| {
        let last_seq = rib.last_seq().ok();
        serde_json::json!({
            "last_seq": last_seq,
            "fib_lag_changes": last_seq.map(|last| last.saturating_sub(fib.seq)),
            "locks": rib.locks(),
        })
    });
    serde_json::json!({ "fib": fib, "rib": rib })
}

/// Compacts the RIB's change feed every `every`, keeping `keep` changes.
async fn compact_feed(rib: Arc<Rib>, keep: u64, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match rib.compact_feed(keep) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "compacted the rib change feed"),
            Err(e) => tracing::warn!(error = %e, "compacting the rib change feed"),
        }
    }
}

//! The whole configuration: one typed table per part, read from TOML
//! (`config/dev.toml` is compiled in as the default), then overridden by
//! command-line flags, then validated as a whole.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The shipped default, compiled in.
pub const DEV_TOML: &str = include_str!("../config/dev.toml");

/// Everything `hangar dev` runs with.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub flaps: hangar_flaps::FlapsConfig,
    pub flyd: hangar_flyd::FlydConfig,
    pub proxy: hangar_proxy::ProxyConfig,
    pub metrics: MetricsConfig,
    pub catalog: CatalogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".hangar"),
            flaps: Default::default(),
            flyd: Default::default(),
            proxy: Default::default(),
            metrics: Default::default(),
            catalog: Default::default(),
        }
    }
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` is served.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
        }
    }
}

/// The `[catalog]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    /// How often the FIB polls the RIB for other processes' commits.
    pub poll_ms: u64,
    /// Changes the feed keeps when compacted; a follower further behind
    /// reloads the whole table.
    pub keep_changes: u64,
    /// How often the feed is compacted.
    pub compact_interval_ms: u64,
    /// `global` (every machine in detail) or `regional` (the detail of
    /// `proxy.region` only, summaries for the other regions).
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

impl Config {
    /// Reads `path`, or the compiled-in default when `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (DEV_TOML.to_string(), "built-in config/dev.toml".to_string()),
        };
        toml::from_str(&text).with_context(|| format!("parsing {origin}"))
    }

    /// Every problem of every part, or nothing.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for result in [
            self.flaps.validate(),
            self.flyd.validate(),
            self.proxy.validate(),
        ] {
            if let Err(p) = result {
                problems.extend(p);
            }
        }
        if self.catalog.poll_ms == 0 {
            problems.push("catalog.poll_ms: must be at least 1".into());
        }
        if self.catalog.compact_interval_ms == 0 {
            problems.push("catalog.compact_interval_ms: must be at least 1".into());
        }
        if self.catalog.lock_wait_ms == 0 {
            problems.push("catalog.lock_wait_ms: must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid config:\n  {}", problems.join("\n  "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_loads_and_is_valid() {
        let cfg = Config::load(None).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.flaps.listen.port(), 4280);
        assert_eq!(cfg.proxy.http_addr.port(), 8080);
    }

    #[test]
    fn the_two_region_example_loads_and_is_valid() {
        for file in ["dev", "ord"] {
            let path =
                Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/regions/{file}.toml"));
            let cfg = Config::load(Some(&path)).unwrap();
            cfg.validate().unwrap();
            assert_eq!(cfg.proxy.region, file);
            assert_eq!(cfg.catalog.mode, CatalogMode::Regional);
            assert_eq!(cfg.proxy.peers.len(), 1);
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Config>("[flaps]\nlisten_addr = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }
}

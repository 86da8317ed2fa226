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
    pub catalog: hangar_catalog::CatalogConfig,
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
            self.catalog.validate(),
        ] {
            if let Err(p) = result {
                problems.extend(p);
            }
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
            assert_eq!(cfg.catalog.mode, hangar_catalog::CatalogMode::Regional);
            assert_eq!(cfg.proxy.peers.len(), 1);
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Config>("[flaps]\nlisten_addr = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }
}

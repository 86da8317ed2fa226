//! flaps's configuration: the `[flaps]` table of the config file.

use hangar_api::{AddrBlock, Region};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// How the Machines API gateway runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlapsConfig {
    /// Where the Machines API listens.
    pub listen: SocketAddr,
    /// The region machines go to when a create names none.
    pub default_region: Region,
    /// The org that `hangar dev` creates and gives its dev token to.
    pub dev_org: String,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// How long a call to a flyd host may take (waits carry their own).
    pub host_timeout_ms: u64,
    /// Loopback block flycast addresses come from, as CIDR.
    pub flycast_range: AddrBlock,
    /// Loopback block dedicated public addresses (type `v4`) come from.
    pub public_range: AddrBlock,
    /// Per token and action; Fly's published limits by default.
    pub rate_limits: crate::limits::RateLimitConfig,
    /// What one org may hold.
    pub quotas: crate::quotas::QuotaConfig,
    /// The domains the platform names apps under (`<app>.<domain>`): no
    /// app can claim a hostname in them. `localhost`, `flycast` and
    /// `internal` are always reserved.
    pub platform_domains: Vec<String>,
    /// A PEM file of the CA certificates a custom certificate must chain
    /// to; Mozilla's root program (webpki-roots) when unset.
    pub certificate_roots: Option<PathBuf>,
    /// Accept custom certificates that chain to no trusted root (self-signed
    /// ones): for development only.
    pub allow_self_signed_certificates: bool,
}

impl Default for FlapsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4280)),
            default_region: "dev".parse().expect("a region name"),
            dev_org: "personal".into(),
            max_body_bytes: 1 << 20,
            host_timeout_ms: 60_000,
            flycast_range: "127.20.0.0/16".parse().expect("an address block"),
            public_range: "127.30.0.0/16".parse().expect("an address block"),
            rate_limits: Default::default(),
            quotas: Default::default(),
            platform_domains: Vec::new(),
            certificate_roots: None,
            allow_self_signed_certificates: false,
        }
    }
}

impl FlapsConfig {
    /// Every problem with this config, one line each.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.dev_org.trim().is_empty() {
            problems.push("flaps.dev_org: must not be empty".to_string());
        }
        if self.max_body_bytes < 1024 {
            problems.push("flaps.max_body_bytes: must be at least 1024".to_string());
        }
        problems.extend(self.rate_limits.problems());
        for domain in &self.platform_domains {
            if !hangar_api::names::dns_name(domain) {
                problems.push(format!(
                    "flaps.platform_domains: {domain:?} is not a DNS name"
                ));
            }
        }
        if let Some(path) = &self.certificate_roots {
            if let Err(e) = crate::certificates::load_roots(path) {
                problems.push(format!("flaps.certificate_roots: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

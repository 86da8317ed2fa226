//! Per-org quotas (`[flaps.quotas]`): how many apps, machines, addresses,
//! certificates and secrets one org may have, so no tenant can take the
//! platform's capacity or the RIB's room from the others. Past a quota a
//! create answers 403 with status `quota_exceeded`, naming the quota.
//!
//! A quota is checked against the RIB before the create, so two creates at
//! the same moment may both pass at its edge: quotas bound what an org
//! holds, not to the unit.

use crate::Flaps;
use crate::error::ApiError;
use axum::http::StatusCode;
use hangar_api::machine::MachineState;
use serde::Deserialize;

/// The `[flaps.quotas]` table: the most of each an org may hold (0: no
/// limit).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    pub apps: usize,
    /// Machines not destroyed, over all the org's apps.
    pub machines: usize,
    /// Flycast and dedicated addresses.
    pub ips: usize,
    pub certificates: usize,
    /// Secrets, over all the org's apps.
    pub secrets: usize,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            apps: 100,
            machines: 1_000,
            ips: 100,
            certificates: 100,
            secrets: 1_000,
        }
    }
}

/// What a quota counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counted {
    Apps,
    Machines,
    Ips,
    Certificates,
    Secrets,
}

impl Counted {
    fn name(self) -> &'static str {
        match self {
            Self::Apps => "apps",
            Self::Machines => "machines",
            Self::Ips => "ips",
            Self::Certificates => "certificates",
            Self::Secrets => "secrets",
        }
    }
}

/// Checks that `org` may have `more` more of `what`.
pub(crate) fn check(flaps: &Flaps, org: &str, what: Counted, more: usize) -> Result<(), ApiError> {
    let q = &flaps.cfg.quotas;
    let most = match what {
        Counted::Apps => q.apps,
        Counted::Machines => q.machines,
        Counted::Ips => q.ips,
        Counted::Certificates => q.certificates,
        Counted::Secrets => q.secrets,
    };
    if most == 0 {
        return Ok(());
    }
    let held = held(flaps, org, what)?;
    if held + more <= most {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "org {org:?} has {held} {name}, and its quota is {most} (flaps.quotas.{name})",
            name = what.name()
        ),
    )
    .with_code("quota_exceeded"))
}

/// How many of `what` `org` holds now.
fn held(flaps: &Flaps, org: &str, what: Counted) -> Result<usize, ApiError> {
    let of_app = |app: &str| -> Result<usize, ApiError> {
        Ok(match what {
            Counted::Apps => 1,
            Counted::Machines => flaps
                .rib
                .machines_of_app(app)?
                .iter()
                .filter(|m| m.state != MachineState::Destroyed)
                .count(),
            Counted::Ips => flaps.rib.ips(Some(app))?.len(),
            Counted::Certificates => flaps.rib.certificates_of_app(app)?.len(),
            Counted::Secrets => flaps.rib.secrets(app)?.len(),
        })
    };
    flaps
        .rib
        .apps(Some(org))?
        .iter()
        .map(|app| of_app(&app.name))
        .sum()
}

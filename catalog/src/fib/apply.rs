//! Building snapshots: the whole table from the RIB ([`full`]), and a
//! batch of the change feed applied to a snapshot ([`apply`]): every app
//! the batch touches is rebuilt (patched, when that is cheaper than
//! reading it again), everything else is shared.

use super::build::{AppBuild, Interner};
use super::{AppRoutes, FibSnapshot, Mode};
use crate::rib::{CertificateRow, Change, RibError, RibView, RouteImage, RouteRow, Routes};
use compact_str::CompactString;
use hangar_api::machine::MachineState;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// The whole table from the RIB, keeping the in-flight counters of
/// `previous` for machines it already had.
pub(super) fn full(
    interner: &mut Interner,
    rib: &RibView<'_>,
    mode: &Mode,
    previous: Option<&FibSnapshot>,
) -> Result<FibSnapshot, RibError> {
    // Read the feed position first: anything committed after it is
    // replayed by the follower, and replaying is idempotent.
    let seq = rib.last_seq()?;
    let apps = rib.apps(None)?;
    let mut builds: HashMap<&str, (AppBuild<'_>, &str)> = apps
        .iter()
        .map(|a| {
            let old = previous.and_then(|p| p.app(&a.name)).map(|a| &**a);
            (a.name.as_str(), (AppBuild::new(old), a.org_slug.as_str()))
        })
        .collect();
    rib.for_each_route(Routes::All, |row| {
        // Machines of a deleted app wait for their rows to be forgotten.
        if let Some((build, _)) = builds.get_mut(row.app) {
            build.add(&row, mode, interner);
        }
    })?;
    let mut certificates: HashMap<String, Vec<Arc<CertificateRow>>> = HashMap::new();
    for cert in rib.certificates(None)? {
        certificates
            .entry(cert.app.clone())
            .or_default()
            .push(Arc::new(cert));
    }
    let mut flycast = flycast_of(rib, None)?;
    let mut snapshot = FibSnapshot::empty(seq, apps.len());
    for (name, (build, org)) in builds {
        let mut app = build.finish(name);
        app.org = org.into();
        app.certificates = certificates.remove(name).unwrap_or_default().into();
        app.flycast = flycast.remove(name).unwrap_or_default().into();
        snapshot.put(Arc::new(app));
    }
    Ok(snapshot)
}

/// Flycast addresses by app, of one app or all.
pub(super) fn flycast_of(
    rib: &RibView<'_>,
    app: Option<&str>,
) -> Result<HashMap<String, Vec<IpAddr>>, RibError> {
    let mut by_app: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for row in rib.ips(app)? {
        match row.ip.parse() {
            Ok(ip) => by_app.entry(row.app).or_default().push(ip),
            Err(_) => tracing::warn!(ip = row.ip, app = row.app, "fib: skipping a bad address"),
        }
    }
    Ok(by_app)
}

/// Which parts of an app a batch changed.
#[derive(Default)]
struct Touched<'c> {
    app: bool,
    machines: Machines<'c>,
    certificates: bool,
    flycast: bool,
}

/// Which of an app's machines a batch changed.
#[derive(Default)]
enum Machines<'c> {
    #[default]
    None,
    /// These ids (deduplicated), each with the image of its newest change
    /// when the change carries one.
    Some(Vec<(&'c str, Option<&'c str>)>),
    /// All of them (a bulk change, key `*`).
    All,
}

impl<'c> Machines<'c> {
    /// Adds a change; changes come oldest first, so a later image wins.
    fn add(&mut self, key: &'c str, image: Option<&'c str>) {
        match self {
            _ if key == "*" => *self = Self::All,
            Self::None => *self = Self::Some(vec![(key, image)]),
            Self::Some(ids) => match ids.iter_mut().find(|(id, _)| *id == key) {
                Some(seen) => seen.1 = image,
                None => ids.push((key, image)),
            },
            Self::All => {}
        }
    }
}

/// `current` with `changes` applied: every touched app is rebuilt (only
/// the parts its changes name), everything else is shared.
pub(super) fn apply(
    interner: &mut Interner,
    rib: &RibView<'_>,
    mode: &Mode,
    current: &FibSnapshot,
    changes: &[Change],
) -> Result<FibSnapshot, RibError> {
    let mut touched: HashMap<&str, Touched<'_>> = HashMap::new();
    for change in changes {
        let Some(app) = change.app.as_deref() else {
            continue; // Hosts: not part of the FIB.
        };
        let t = touched.entry(app).or_default();
        match change.table.as_str() {
            "apps" => t.app = true,
            "machines" => t.machines.add(&change.key, change.image.as_deref()),
            "certificates" => t.certificates = true,
            "ip_assignments" => t.flycast = true,
            _ => {}
        }
    }
    let mut next = current.clone();
    next.seq = changes.last().map_or(current.seq, |c| c.seq);
    for (name, t) in touched {
        let old = current.app(name).map(|a| &**a);
        let org: Option<CompactString> = if t.app {
            rib.app(name)?.map(|row| row.org_slug.into())
        } else {
            old.map(|old| old.org.clone())
        };
        let Some(org) = org else {
            next.remove(name);
            continue;
        };
        let mut app = match (old, t.machines) {
            // A new (or re-created) app is read whole.
            (None, _) => read_app(interner, rib, mode, name, None)?,
            (Some(old), _) if t.app => read_app(interner, rib, mode, name, Some(old))?,
            (Some(old), Machines::None) => old.clone(),
            (Some(old), Machines::Some(ids)) if patchable(old, &ids) => {
                patch_app(interner, rib, mode, old, &ids)?
            }
            (Some(old), _) => read_app(interner, rib, mode, name, Some(old))?,
        };
        if old.is_none() || t.app || t.certificates {
            app.certificates = rib
                .certificates(Some(name))?
                .into_iter()
                .map(Arc::new)
                .collect();
        }
        if old.is_none() || t.app || t.flycast {
            app.flycast = flycast_of(rib, Some(name))?
                .remove(name)
                .unwrap_or_default()
                .into();
        }
        app.org = org;
        next.put(Arc::new(app));
    }
    Ok(next)
}

/// An app's machines read whole from the RIB; certificates and addresses
/// carried over from `old`.
pub(super) fn read_app(
    interner: &mut Interner,
    rib: &RibView<'_>,
    mode: &Mode,
    name: &str,
    old: Option<&AppRoutes>,
) -> Result<AppRoutes, RibError> {
    let mut build = AppBuild::new(old);
    rib.for_each_route(Routes::App(name), |row| build.add(&row, mode, interner))?;
    let mut app = build.finish(name);
    if let Some(old) = old {
        app.certificates = old.certificates.clone();
        app.flycast = old.flycast.clone();
    }
    Ok(app)
}

/// Whether patching `old` with `ids` beats reading the app again: always
/// when every change carries its image (no row to read), else when only a
/// few of the app's machines changed.
pub(super) fn patchable(old: &AppRoutes, ids: &[(&str, Option<&str>)]) -> bool {
    ids.iter().all(|(_, image)| image.is_some())
        || ids.len() * 2 <= old.machines.len() + old.remote.len()
}

/// `old` with the machines of `ids` replaced by their new images (or their
/// rows, read again, for a change without one): every other machine
/// (detailed or remote) is kept as it was; counts and summaries are
/// recounted.
pub(super) fn patch_app(
    interner: &mut Interner,
    rib: &RibView<'_>,
    mode: &Mode,
    old: &AppRoutes,
    ids: &[(&str, Option<&str>)],
) -> Result<AppRoutes, RibError> {
    let changed = |id: &str| ids.iter().any(|(changed, _)| *changed == id);
    let mut build = AppBuild::new(Some(old));
    for m in old.machines.iter().filter(|m| !changed(&m.id)) {
        build.keep(m);
    }
    for m in old.remote.iter().filter(|m| !changed(&m.id)) {
        build.keep_remote(m);
    }
    // A machine never changes app; a row that says otherwise is not ours.
    let ours = |row: &RouteRow<'_>| *row.app == *old.name;
    for (id, image) in ids {
        let image = image.and_then(|json| match serde_json::from_str::<RouteImage>(json) {
            Ok(image) => Some(image),
            Err(e) => {
                tracing::warn!(machine = id, error = %e, "fib: unreadable change image; reading the row");
                None
            }
        });
        match image {
            Some(image) => {
                let row = image.row();
                if row.state != MachineState::Destroyed && ours(&row) {
                    build.add(&row, mode, interner);
                }
            }
            None => rib.for_each_route(Routes::Machine(id), |row| {
                if ours(&row) {
                    build.add(&row, mode, interner);
                }
            })?,
        }
    }
    let mut app = build.finish(&old.name);
    app.certificates = old.certificates.clone();
    app.flycast = old.flycast.clone();
    Ok(app)
}

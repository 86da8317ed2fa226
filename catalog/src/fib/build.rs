//! Building an app's routes from RIB rows.
//!
//! The same code builds one app (when the feed says it changed) and every
//! app (at load), so the two can never disagree. Strings every machine of a
//! host or region repeats are interned, and a services config is decoded
//! once and shared by every machine whose JSON is the same.

use super::{AppRoutes, Load, Mode, RegionSummary, RemoteMachine, RouteMachine, STATES};
use crate::rib::RouteRow;
use hangar_api::machine::{MachineService, MachineState};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Weak};

/// A machine's soft limit when its service sets none (Fly's default).
pub(crate) const DEFAULT_SOFT_LIMIT: u32 = 20;

/// What the FIB's writer keeps between batches. Only the follower (under the
/// FIB's writer lock) touches it.
#[derive(Default)]
pub(crate) struct Interner {
    strings: HashMap<Box<str>, Arc<str>>,
    services: HashMap<Box<str>, Weak<[MachineService]>>,
    /// Size of `services` after its last sweep of dead entries.
    swept_at: usize,
}

impl Interner {
    fn string(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = s.into();
        self.strings.insert(s.into(), shared.clone());
        shared
    }

    /// The decoded services of `json`, shared with every other machine that
    /// has the same JSON while any of them lives.
    fn services(&mut self, json: &str) -> Result<Arc<[MachineService]>, serde_json::Error> {
        if let Some(shared) = self.services.get(json).and_then(Weak::upgrade) {
            return Ok(shared);
        }
        let decoded: Arc<[MachineService]> = serde_json::from_str::<Vec<_>>(json)?.into();
        self.services.insert(json.into(), Arc::downgrade(&decoded));
        if self.services.len() > 2 * self.swept_at.max(512) {
            self.services.retain(|_, w| w.strong_count() > 0);
            self.swept_at = self.services.len();
        }
        Ok(decoded)
    }
}

/// One app's machines as rows arrive, then [`AppBuild::finish`]ed.
pub(crate) struct AppBuild<'p> {
    machines: Vec<RouteMachine>,
    remote: Vec<RemoteMachine>,
    regions: Vec<RegionSummary>,
    states: [u32; STATES],
    /// The app's previous routes, whose in-flight counters carry over.
    previous: Option<&'p AppRoutes>,
    previous_index: Option<HashMap<&'p str, &'p Load>>,
}

impl<'p> AppBuild<'p> {
    pub fn new(previous: Option<&'p AppRoutes>) -> Self {
        // A linear scan is faster than a map for the usual handful.
        let previous_index = previous.filter(|p| p.machines.len() > 16).map(|p| {
            p.machines
                .iter()
                .map(|m| (&*m.id, &m.load))
                .collect::<HashMap<_, _>>()
        });
        Self {
            machines: Vec::new(),
            remote: Vec::new(),
            regions: Vec::new(),
            states: [0; STATES],
            previous,
            previous_index,
        }
    }

    fn load(&self, id: &str) -> Load {
        let found = match &self.previous_index {
            Some(index) => index.get(id).copied(),
            None => self
                .previous
                .and_then(|p| p.machines.iter().find(|m| &*m.id == id))
                .map(|m| &m.load),
        };
        found.cloned().unwrap_or_default()
    }

    /// Adds one machine: to the detail when the mode keeps its region, to
    /// the counts and region summaries always. A row the FIB cannot use is
    /// logged and left out.
    pub fn add(&mut self, row: &RouteRow<'_>, mode: &Mode, interner: &mut Interner) {
        let Ok(private_ip) = row.private_ip.parse::<IpAddr>() else {
            tracing::warn!(
                machine = row.id,
                ip = row.private_ip,
                "fib: skipping machine with bad private ip"
            );
            return;
        };
        let services = match interner.services(row.services) {
            Ok(services) => services,
            Err(e) => {
                tracing::warn!(machine = row.id, error = %e, "fib: skipping machine with unreadable services");
                return;
            }
        };
        let routable = row.state == MachineState::Started && !row.cordoned && row.healthy;
        let capacity = soft_limit(&services);
        let region = self.count(row.region, row.state, routable, capacity, || {
            interner.string(row.region)
        });
        if !mode.keeps(row.region) {
            self.remote.push(RemoteMachine {
                id: row.id.into(),
                region,
                state: row.state,
                routable,
                capacity,
            });
            return;
        }
        self.machines.push(RouteMachine {
            id: row.id.into(),
            region,
            host: interner.string(row.host),
            state: row.state,
            private_ip,
            cordoned: row.cordoned,
            healthy: row.healthy,
            services,
            primary_region: row.primary_region.map(|r| interner.string(r)),
            load: self.load(row.id),
        });
    }

    /// Adds a machine the app already had, unchanged.
    pub fn keep(&mut self, m: &RouteMachine) {
        let capacity = soft_limit(&m.services);
        self.count(&m.region, m.state, m.routable(), capacity, || {
            m.region.clone()
        });
        self.machines.push(m.clone());
    }

    /// Adds a machine of another region the app already had, unchanged.
    pub fn keep_remote(&mut self, m: &RemoteMachine) {
        self.count(&m.region, m.state, m.routable, m.capacity, || {
            m.region.clone()
        });
        self.remote.push(m.clone());
    }

    /// Counts a machine in the state counts and its region's summary;
    /// returns the region's shared name.
    fn count(
        &mut self,
        region: &str,
        state: MachineState,
        routable: bool,
        capacity: u32,
        shared_name: impl FnOnce() -> Arc<str>,
    ) -> Arc<str> {
        self.states[state_index(state)] += 1;
        let summary = match self.regions.iter().position(|r| &*r.region == region) {
            Some(i) => &mut self.regions[i],
            None => {
                self.regions.push(RegionSummary::empty(shared_name()));
                self.regions.last_mut().expect("just pushed")
            }
        };
        match state {
            MachineState::Started => summary.started += 1,
            MachineState::Stopped => summary.stopped += 1,
            MachineState::Suspended => summary.suspended += 1,
            _ => {}
        }
        if routable {
            summary.routable += 1;
            summary.capacity += u64::from(capacity);
        }
        summary.region.clone()
    }

    /// The app's routes; certificates and flycast addresses are the caller's.
    pub fn finish(mut self, name: &str) -> AppRoutes {
        // A stable order, so two builds from the same rows are equal.
        self.regions
            .sort_unstable_by(|a, b| a.region.cmp(&b.region));
        self.remote.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        AppRoutes {
            regions: self.regions.into(),
            states: self.states,
            remote: self.remote.into(),
            ..AppRoutes::with_machines(name, self.machines)
        }
    }
}

/// What a machine adds to its region's capacity: its first service's soft
/// limit.
fn soft_limit(services: &[MachineService]) -> u32 {
    services
        .first()
        .and_then(|s| s.concurrency.as_ref())
        .and_then(|c| c.soft_limit)
        .unwrap_or(DEFAULT_SOFT_LIMIT)
}

pub(crate) fn state_index(state: MachineState) -> usize {
    MachineState::ALL
        .iter()
        .position(|s| *s == state)
        .expect("ALL lists every state")
}

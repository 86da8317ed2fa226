//! What the FIB holds of an app: its routes ([`AppRoutes`], machines
//! routable first), each machine's ([`RouteMachine`], with its [`Load`]),
//! the compact records of machines of regions kept only as summaries
//! ([`RemoteMachine`]), and the summaries ([`RegionSummary`]).

use super::STATES;
use super::build::state_index;
use crate::rib::CertificateRow;
use compact_str::CompactString;
use hangar_api::machine::{MachineService, MachineState};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A machine as the proxy routes to it.
#[derive(Debug, Clone)]
pub struct RouteMachine {
    /// Inline (no allocation) up to 24 bytes; Fly machine ids are 14.
    pub id: CompactString,
    pub region: Arc<str>,
    pub host: Arc<str>,
    pub state: MachineState,
    pub private_ip: IpAddr,
    pub cordoned: bool,
    /// Whether its service checks pass (true when it has none).
    pub healthy: bool,
    /// Shared by every machine with the same services config.
    pub services: Arc<[MachineService]>,
    /// The app's primary region, as the machine's config names it
    /// (`env.PRIMARY_REGION`).
    pub primary_region: Option<Arc<str>>,
    /// What the proxy has in flight to this machine. Shared by every
    /// snapshot that contains the machine.
    pub load: Load,
}

/// Requests (or connections) the proxy has in flight to one machine: one
/// counter per machine, carried from snapshot to snapshot so rebuilding an
/// app never resets it. The proxy takes a unit per request and gives it
/// back when the request ends; the catalog only carries it.
#[derive(Debug, Clone, Default)]
pub struct Load(Arc<AtomicUsize>);

impl Load {
    /// Units taken now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// Takes a unit unless `limit` are taken already, and says whether it
    /// did: racing takers cannot overshoot the limit.
    pub fn take_below(&self, limit: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Takes a unit whatever the load.
    pub fn take(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// Gives back a unit taken before.
    pub fn give(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RouteMachine {
    /// Whether the proxy may send new requests to this machine: started,
    /// not cordoned, and passing its service checks.
    pub fn routable(&self) -> bool {
        self.state == MachineState::Started && !self.cordoned && self.healthy
    }
}

/// A machine of a region a regional FIB keeps no detail for: just what its
/// region's summary counts, so a change to it is applied without reading
/// the app's other machines again.
#[derive(Debug, Clone)]
pub struct RemoteMachine {
    pub id: CompactString,
    pub region: Arc<str>,
    pub state: MachineState,
    pub routable: bool,
    /// Its soft limit, counted in the region's capacity while routable.
    pub capacity: u32,
}

/// An app's machines in one region, in every mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSummary {
    pub region: Arc<str>,
    pub started: u32,
    pub stopped: u32,
    pub suspended: u32,
    /// Started, uncordoned and healthy.
    pub routable: u32,
    /// The routable machines' soft limits, summed: the requests (or
    /// connections) the region takes before any machine is over its limit.
    pub capacity: u64,
}

impl RegionSummary {
    pub(super) fn empty(region: Arc<str>) -> Self {
        Self {
            region,
            started: 0,
            stopped: 0,
            suspended: 0,
            routable: 0,
            capacity: 0,
        }
    }
}

/// An app's routes. Machines are those of the kept regions (see [`Mode`](super::Mode)),
/// destroyed ones left out: the routable ones first, then the rest, each
/// part by id.
///
/// `repr(C)` keeps what a lookup reads (the name it compares, the machine
/// slice and how many are routable) at the front, in the cache line the
/// table probe brings in; names of up to 24 bytes are stored inline.
#[derive(Debug, Clone)]
#[repr(C)]
pub struct AppRoutes {
    pub name: CompactString,
    /// The org that owns the app: what flycast and replays are scoped to.
    pub org: CompactString,
    /// Routable first, then the rest, each part by id: built only by
    /// [`AppRoutes::with_machines`] and the FIB, which keep that order.
    pub(super) machines: Arc<[RouteMachine]>,
    /// How many of `machines` (the first ones) are routable.
    pub(super) routable: usize,
    /// Per region, by region code; covers every region in every mode.
    pub regions: Arc<[RegionSummary]>,
    pub certificates: Arc<[Arc<CertificateRow>]>,
    /// The app's own addresses: flycast (private) and dedicated public ones.
    /// The proxy listens on each, on the service ports of the app's machines.
    pub flycast: Arc<[IpAddr]>,
    /// The machines of the regions not kept in detail (regional mode).
    pub remote: Arc<[RemoteMachine]>,
    /// Machine counts by state (indexed like [`MachineState::ALL`]), over
    /// every region.
    pub states: [u32; STATES],
}

impl AppRoutes {
    /// An app with no machines, certificates or addresses.
    pub fn empty(name: &str) -> Self {
        Self {
            name: name.into(),
            org: CompactString::default(),
            machines: Arc::new([]),
            routable: 0,
            regions: Arc::new([]),
            certificates: Arc::new([]),
            flycast: Arc::new([]),
            remote: Arc::new([]),
            states: [0; STATES],
        }
    }

    /// An app with these machines, put in order (routable first, each part
    /// by id) and counted; no regions, certificates or addresses.
    pub fn with_machines(name: &str, mut machines: Vec<RouteMachine>) -> Self {
        machines.sort_unstable_by(|a, b| (!a.routable(), &a.id).cmp(&(!b.routable(), &b.id)));
        Self {
            routable: machines.iter().filter(|m| m.routable()).count(),
            machines: machines.into(),
            ..Self::empty(name)
        }
    }

    /// The app with these region summaries in place of its own (tests and
    /// benchmarks build apps this way).
    pub fn with_regions(mut self, regions: impl Into<Arc<[RegionSummary]>>) -> Self {
        self.regions = regions.into();
        self
    }

    /// Every machine of the kept regions, routable ones first.
    pub fn machines(&self) -> &[RouteMachine] {
        &self.machines
    }

    /// The machines the proxy may send new requests to.
    pub fn candidates(&self) -> &[RouteMachine] {
        &self.machines[..self.routable]
    }

    /// How many of the app's machines (in every region) are in `state`.
    pub fn count(&self, state: MachineState) -> u32 {
        self.states[state_index(state)]
    }

    /// The regions other than `own` with machines that can take requests
    /// now, the most capacity first: where a proxy with no candidate of its
    /// own would send the request.
    pub fn regions_elsewhere(&self, own: &str) -> Vec<&RegionSummary> {
        let mut elsewhere: Vec<_> = self
            .regions
            .iter()
            .filter(|r| r.routable > 0 && &*r.region != own)
            .collect();
        elsewhere.sort_by(|a, b| b.capacity.cmp(&a.capacity).then(a.region.cmp(&b.region)));
        elsewhere
    }

    /// The app's summary for `region`.
    pub fn region(&self, region: &str) -> Option<&RegionSummary> {
        self.regions.iter().find(|r| &*r.region == region)
    }
}

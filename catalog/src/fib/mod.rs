//! The FIB (the Catalog): the proxy's in-memory routing table.
//!
//! The table is an immutable [`FibSnapshot`] behind an `ArcSwap`: a lookup
//! is one atomic load and a hash probe, never a lock a writer could hold.
//! The writer is the [`Follower`]: it reads the RIB's change feed, rebuilds
//! only the apps a batch touches (and copies only the table shards holding
//! them, see `table`), and swaps in the new snapshot. Per-machine in-flight
//! counters are atomics shared between snapshots, so a rebuild never resets
//! the load the proxy balances on.
//!
//! Writers go through one [`Guarded`] lock ("fib.writer") with bounded,
//! labelled waits; its holder, last holder and waits are in [`Fib::stats`].
//!
//! In [`Mode::Regional`] the FIB keeps machine detail only for its own
//! region and, for every region, a [`RegionSummary`] of the app's machines
//! there: enough to know where to forward, at a fraction of the memory.
//! [`Mode::Global`] keeps every machine, for small deployments.

mod build;
mod follower;
mod table;

pub use follower::{Follower, FollowerOptions, Stall};

use crate::lock::{Guarded, LockStats};
use crate::rib::{CertificateRow, Change, Rib, RibError, RibView, RouteImage, RouteRow, Routes};
use arc_swap::ArcSwap;
use build::{AppBuild, Interner, state_index};
use compact_str::CompactString;
use hangar_api::machine::{MachineService, MachineState};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use table::AppTable;

/// How many machine states there are (the length of per-state counts).
pub const STATES: usize = MachineState::ALL.len();

/// Which machines a FIB keeps in detail; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Global,
    Regional(Arc<str>),
}

impl Mode {
    /// Whether machines of `region` are kept in detail.
    fn keeps(&self, region: &str) -> bool {
        match self {
            Self::Global => true,
            Self::Regional(own) => **own == *region,
        }
    }

    /// The region of a regional FIB.
    pub fn region(&self) -> Option<&str> {
        match self {
            Self::Global => None,
            Self::Regional(own) => Some(own),
        }
    }
}

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
    fn empty(region: Arc<str>) -> Self {
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

/// An app's routes. Machines are those of the kept regions (see [`Mode`]),
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
    machines: Arc<[RouteMachine]>,
    /// How many of `machines` (the first ones) are routable.
    routable: usize,
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

/// One immutable version of the whole table.
#[derive(Clone)]
pub struct FibSnapshot {
    /// The RIB change sequence number this snapshot reflects.
    pub seq: u64,
    apps: AppTable,
    /// Custom hostnames (lowercase) → their certificate (which names the app).
    hostnames: Arc<HashMap<Box<str>, Arc<CertificateRow>>>,
    /// Flycast addresses → their app.
    flycast: Arc<HashMap<IpAddr, CompactString>>,
    /// Machine counts by state over every app and region.
    states: [u64; STATES],
    /// Machines kept in detail.
    machines: usize,
}

impl FibSnapshot {
    fn empty(seq: u64, apps: usize) -> Self {
        Self {
            seq,
            apps: AppTable::with_capacity(apps),
            hostnames: Arc::default(),
            flycast: Arc::default(),
            states: [0; STATES],
            machines: 0,
        }
    }

    /// The routes of one app.
    pub fn app(&self, name: &str) -> Option<&Arc<AppRoutes>> {
        self.apps.get(name)
    }

    /// The certificate (and so the app) of a custom hostname, lowercase.
    pub fn hostname(&self, name: &str) -> Option<&Arc<CertificateRow>> {
        self.hostnames.get(name)
    }

    /// The app an address of its own (flycast or dedicated) belongs to.
    pub fn flycast(&self, ip: IpAddr) -> Option<&Arc<AppRoutes>> {
        self.app(self.flycast.get(&ip)?)
    }

    /// Every app's own address (flycast or dedicated) and its app.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, &str)> {
        self.flycast.iter().map(|(ip, app)| (*ip, app.as_str()))
    }

    /// Every app, in no particular order.
    pub fn apps(&self) -> impl Iterator<Item = &Arc<AppRoutes>> {
        self.apps.iter()
    }

    /// Every custom hostname and its certificate, in no particular order.
    pub fn hostnames(&self) -> impl Iterator<Item = (&str, &Arc<CertificateRow>)> {
        self.hostnames.iter().map(|(h, c)| (&**h, c))
    }

    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    /// Machines kept in detail (all of them in global mode).
    pub fn machine_count(&self) -> usize {
        self.machines
    }

    /// Machine counts by state over every app and region.
    pub fn machine_counts(&self) -> impl Iterator<Item = (MachineState, u64)> + '_ {
        MachineState::ALL.into_iter().zip(self.states)
    }

    /// Puts `app` in place of the app of the same name, keeping the indexes
    /// and counts in step.
    fn put(&mut self, app: Arc<AppRoutes>) {
        let old = self.apps.get(&app.name).cloned();
        self.reindex(old.as_deref(), Some(&app));
        self.apps.insert(app);
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = self.apps.remove(name) {
            self.reindex(Some(&old), None);
        }
    }

    fn reindex(&mut self, old: Option<&AppRoutes>, new: Option<&AppRoutes>) {
        for (i, total) in self.states.iter_mut().enumerate() {
            *total -= old.map_or(0, |a| u64::from(a.states[i]));
            *total += new.map_or(0, |a| u64::from(a.states[i]));
        }
        self.machines -= old.map_or(0, |a| a.machines.len());
        self.machines += new.map_or(0, |a| a.machines.len());
        let unchanged = |f: fn(&AppRoutes) -> *const ()| match (old, new) {
            (Some(o), Some(n)) => f(o) == f(n),
            (None, None) => true,
            _ => false,
        };
        if !unchanged(|a| Arc::as_ptr(&a.certificates).cast()) {
            let hostnames = Arc::make_mut(&mut self.hostnames);
            // Only entries still pointing at this app: in one batch a
            // hostname can move from one app to another in either order.
            for cert in old.iter().flat_map(|a| a.certificates.iter()) {
                if hostnames
                    .get(cert.hostname.as_str())
                    .is_some_and(|c| c.app == cert.app)
                {
                    hostnames.remove(cert.hostname.as_str());
                }
            }
            for cert in new.iter().flat_map(|a| a.certificates.iter()) {
                hostnames.insert(cert.hostname.as_str().into(), cert.clone());
            }
        }
        if !unchanged(|a| Arc::as_ptr(&a.flycast).cast()) {
            let flycast = Arc::make_mut(&mut self.flycast);
            for (ip, app) in old
                .iter()
                .flat_map(|a| a.flycast.iter().map(move |ip| (ip, &a.name)))
            {
                if flycast.get(ip) == Some(app) {
                    flycast.remove(ip);
                }
            }
            for (ip, app) in new
                .iter()
                .flat_map(|a| a.flycast.iter().map(move |ip| (ip, &a.name)))
            {
                flycast.insert(*ip, app.clone());
            }
        }
    }
}

/// How a [`Fib`] is built.
#[derive(Debug, Clone)]
pub struct FibOptions {
    pub mode: Mode,
    /// How long a writer waits for the writer lock before giving up.
    pub lock_wait: Duration,
}

impl Default for FibOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Global,
            lock_wait: Duration::from_secs(1),
        }
    }
}

/// The FIB: see the module docs.
pub struct Fib {
    mode: Mode,
    snapshot: ArcSwap<FibSnapshot>,
    /// The sequence of the snapshot in place, sent at every swap: what
    /// [`Fib::changed`] waits on.
    swapped: tokio::sync::watch::Sender<u64>,
    /// Taken by whoever applies changes; holds the string and services
    /// interner that batches share.
    writer: Guarded<Interner>,
    born: Instant,
    applied: AtomicU64,
    batches: AtomicU64,
    reloads: AtomicU64,
    last_batch_us: AtomicU64,
    max_batch_us: AtomicU64,
    /// Time spent applying batches, summed.
    busy_us: AtomicU64,
    /// The newest sequence number a commit hook reported.
    noticed: AtomicU64,
    /// When the follower last answered the watchdog, ms after `born`.
    answered_ms: AtomicU64,
    /// Tests make the writer block here, inside the writer lock.
    #[cfg(test)]
    stall: parking_lot::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

/// A subscription to a FIB's changes (see [`Fib::changed`]).
pub struct Changed(tokio::sync::watch::Receiver<u64>);

impl Changed {
    /// Returns once a snapshot newer than the last one this subscription
    /// saw (or than the one in place when it was made) is in place.
    pub async fn next(&mut self) {
        if self.0.changed().await.is_err() {
            // The FIB is gone: nothing will change again.
            std::future::pending::<()>().await;
        }
    }
}

/// How many feed entries one batch applies at most.
const FEED_BATCH: usize = 4096;

impl Fib {
    /// Loads a global FIB from the RIB.
    pub fn load(rib: &Rib) -> Result<Arc<Self>, RibError> {
        Self::load_with(rib, FibOptions::default())
    }

    /// Loads the whole table from the RIB.
    pub fn load_with(rib: &Rib, options: FibOptions) -> Result<Arc<Self>, RibError> {
        let mut interner = Interner::default();
        let snapshot = rib.follow_read("fib.load", |rib| {
            full(&mut interner, rib, &options.mode, None)
        })?;
        Ok(Arc::new(Self {
            noticed: AtomicU64::new(snapshot.seq),
            mode: options.mode,
            swapped: tokio::sync::watch::Sender::new(snapshot.seq),
            snapshot: ArcSwap::from_pointee(snapshot),
            writer: Guarded::new("fib.writer", options.lock_wait, interner),
            born: Instant::now(),
            applied: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            last_batch_us: AtomicU64::new(0),
            max_batch_us: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            answered_ms: AtomicU64::new(0),
            #[cfg(test)]
            stall: parking_lot::Mutex::new(None),
        }))
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Puts `next` in place and tells those waiting on [`Fib::changed`].
    fn swap(&self, next: FibSnapshot) {
        let seq = next.seq;
        self.snapshot.store(Arc::new(next));
        self.swapped.send_replace(seq);
    }

    /// A subscription to the FIB's changes, for those who wait for one (a
    /// machine to become routable, or to stop being routed to) instead of
    /// polling: check the snapshot after subscribing, then wait.
    pub fn changed(&self) -> Changed {
        Changed(self.swapped.subscribe())
    }

    /// The current snapshot. Cheap; hold it for the duration of one request.
    pub fn snapshot(&self) -> Arc<FibSnapshot> {
        self.snapshot.load_full()
    }

    /// The feed position of the current snapshot.
    pub fn seq(&self) -> u64 {
        self.snapshot.load().seq
    }

    /// The routes of one app, if it exists.
    pub fn lookup(&self, app: &str) -> Option<Arc<AppRoutes>> {
        self.snapshot.load().app(app).cloned()
    }

    /// How many full reloads happened since load.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// How many feed changes have been applied since load.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Applies every change after the snapshot's sequence number. Returns how
    /// many changes were applied.
    pub fn catch_up(&self, rib: &Rib) -> Result<usize, RibError> {
        self.catch_up_as("catch_up", rib)
    }

    /// [`Fib::catch_up`] with the writer lock labelled `label`.
    fn catch_up_as(&self, label: &'static str, rib: &Rib) -> Result<usize, RibError> {
        self.writer.with(label, |interner| {
            #[cfg(test)]
            if let Some(release) = self.stall.lock().take() {
                let _ = release.recv();
            }
            rib.follow_read(label, |rib| self.catch_up_in(interner, rib))
        })?
    }

    /// The catch-up loop, inside the writer lock and one read transaction.
    fn catch_up_in(&self, interner: &mut Interner, rib: &RibView<'_>) -> Result<usize, RibError> {
        let mut total = 0;
        loop {
            let started = Instant::now();
            let current = self.snapshot.load_full();
            if current.seq < rib.compacted_through()? {
                // The changes it needs are gone: start over from the RIB.
                tracing::info!(
                    seq = current.seq,
                    "fib: behind the compacted feed; reloading"
                );
                let fresh = full(interner, rib, &self.mode, Some(&current))?;
                self.swap(fresh);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let changes = rib.changes_since(current.seq, FEED_BATCH)?;
            if changes.is_empty() {
                return Ok(total);
            }
            let next = apply(interner, rib, &self.mode, &current, &changes)?;
            // Single writer (this lock), so a plain store loses nothing.
            self.swap(next);
            total += changes.len();
            self.applied
                .fetch_add(changes.len() as u64, Ordering::Relaxed);
            self.batches.fetch_add(1, Ordering::Relaxed);
            let took = started.elapsed().as_micros() as u64;
            self.last_batch_us.store(took, Ordering::Relaxed);
            self.max_batch_us.fetch_max(took, Ordering::Relaxed);
            self.busy_us.fetch_add(took, Ordering::Relaxed);
        }
    }

    /// The FIB's telemetry, for `/debug/catalog`.
    pub fn stats(&self) -> FibStats {
        let snap = self.snapshot.load();
        let seq = snap.seq;
        let noticed = self.noticed.load(Ordering::Relaxed).max(seq);
        FibStats {
            mode: match self.mode {
                Mode::Global => "global",
                Mode::Regional(_) => "regional",
            },
            region: self.mode.region().map(str::to_string),
            seq,
            noticed_seq: noticed,
            lag_changes: noticed - seq,
            apps: snap.app_count(),
            machines_in_detail: snap.machine_count(),
            machines: snap.states.iter().sum(),
            hostnames: snap.hostnames.len(),
            flycast_addresses: snap.flycast.len(),
            table_bytes: snap.apps.table_bytes(),
            applied: self.applied(),
            batches: self.batches.load(Ordering::Relaxed),
            reloads: self.reloads(),
            last_batch_us: self.last_batch_us.load(Ordering::Relaxed),
            max_batch_us: self.max_batch_us.load(Ordering::Relaxed),
            busy_us: self.busy_us.load(Ordering::Relaxed),
            watchdog_answered_ms_ago: (self.born.elapsed().as_millis() as u64)
                .saturating_sub(self.answered_ms.load(Ordering::Relaxed)),
            writer: self.writer.stats(),
        }
    }
}

/// What `/debug/catalog` shows of the FIB.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FibStats {
    pub mode: &'static str,
    pub region: Option<String>,
    /// The feed position the current snapshot reflects.
    pub seq: u64,
    /// The newest feed position this process has committed.
    pub noticed_seq: u64,
    pub lag_changes: u64,
    pub apps: usize,
    pub machines_in_detail: usize,
    pub machines: u64,
    pub hostnames: usize,
    pub flycast_addresses: usize,
    /// Memory of the app table's shards (not of the apps themselves).
    pub table_bytes: usize,
    pub applied: u64,
    pub batches: u64,
    pub reloads: u64,
    pub last_batch_us: u64,
    pub max_batch_us: u64,
    /// Time spent applying batches since load.
    pub busy_us: u64,
    pub watchdog_answered_ms_ago: u64,
    pub writer: LockStats,
}

/// The whole table from the RIB, keeping the in-flight counters of
/// `previous` for machines it already had.
fn full(
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
fn flycast_of(
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
fn apply(
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
fn read_app(
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
fn patchable(old: &AppRoutes, ids: &[(&str, Option<&str>)]) -> bool {
    ids.iter().all(|(_, image)| image.is_some())
        || ids.len() * 2 <= old.machines.len() + old.remote.len()
}

/// `old` with the machines of `ids` replaced by their new images (or their
/// rows, read again, for a change without one): every other machine
/// (detailed or remote) is kept as it was; counts and summaries are
/// recounted.
fn patch_app(
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rib::{AppRow, MachineRow};

    pub fn app_row(name: &str) -> AppRow {
        AppRow {
            name: name.into(),
            id: format!("id-{name}"),
            org_slug: "personal".into(),
            network: "default".into(),
            created_at: 0,
        }
    }

    pub fn row(id: &str, region: &str, version: u64, state: MachineState) -> MachineRow {
        MachineRow {
            id: id.into(),
            app: "hello".into(),
            region: region.into(),
            host: format!("host-{region}"),
            state,
            private_ip: "127.10.0.2".into(),
            instance_id: "v1".into(),
            cordoned: false,
            services: vec![],
            row_version: version,
            healthy: true,
            primary_region: None,
            updated_at: 0,
        }
    }

    pub fn rib() -> (tempfile::TempDir, Arc<Rib>) {
        let dir = tempfile::tempdir().unwrap();
        let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
        rib.ensure_org("personal", "Personal").unwrap();
        (dir, rib)
    }

    #[tokio::test]
    async fn changed_wakes_its_waiter_at_a_new_snapshot_only() {
        let (_dir, rib) = rib();
        let fib = Fib::load(&rib).unwrap();
        let mut changed = fib.changed();
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(20), changed.next());
        assert!(quiet.await.is_err(), "nothing changed yet");
        rib.create_app(&app_row("hello")).unwrap();
        fib.catch_up(&rib).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), changed.next())
            .await
            .expect("woken by the new snapshot");
        assert!(fib.lookup("hello").is_some());
    }

    #[test]
    fn follows_machine_and_app_changes_keeping_inflight_counters() {
        let (_dir, rib) = rib();
        let fib = Fib::load(&rib).unwrap();
        assert!(fib.lookup("hello").is_none());

        rib.create_app(&app_row("hello")).unwrap();
        rib.upsert_machine(&row("m1", "dev", 1, MachineState::Started))
            .unwrap();
        fib.catch_up(&rib).unwrap();
        let app = fib.lookup("hello").unwrap();
        assert_eq!(app.machines.len(), 1);
        assert!(app.machines[0].routable());
        (0..3).for_each(|_| app.machines[0].load.take());

        rib.upsert_machine(&row("m1", "dev", 2, MachineState::Stopped))
            .unwrap();
        fib.catch_up(&rib).unwrap();
        let m = fib.lookup("hello").unwrap().machines[0].clone();
        assert!(!m.routable());
        // The owner is known however the app was read: followed or loaded.
        assert_eq!(fib.lookup("hello").unwrap().org, "personal");
        assert_eq!(
            Fib::load(&rib).unwrap().lookup("hello").unwrap().org,
            "personal"
        );
        assert_eq!(m.load.get(), 3, "counter survives a rebuild");

        rib.upsert_machine(&row("m1", "dev", 3, MachineState::Destroyed))
            .unwrap();
        fib.catch_up(&rib).unwrap();
        assert!(fib.lookup("hello").unwrap().machines.is_empty());

        let cert = CertificateRow {
            hostname: "www.example.com".into(),
            app: "hello".into(),
            fullchain: "PEM".into(),
            sealed_key: vec![1, 2],
            created_at: 0,
        };
        rib.put_certificate(&cert).unwrap();
        fib.catch_up(&rib).unwrap();
        assert_eq!(
            fib.snapshot().hostname("www.example.com").unwrap().app,
            "hello"
        );
        let taken = CertificateRow {
            app: "other".into(),
            ..cert.clone()
        };
        assert!(matches!(
            rib.put_certificate(&taken),
            Err(RibError::Conflict { .. })
        ));

        rib.delete_app("hello").unwrap();
        rib.forget_app_data("hello").unwrap();
        fib.catch_up(&rib).unwrap();
        assert!(fib.lookup("hello").is_none());
        assert!(fib.snapshot().hostname("www.example.com").is_none());
        assert_eq!(fib.snapshot().seq, rib.last_seq().unwrap());
    }

    #[test]
    fn a_regional_fib_keeps_detail_for_its_region_and_summaries_for_all() {
        let (_dir, rib) = rib();
        rib.create_app(&app_row("hello")).unwrap();
        let regional = Fib::load_with(
            &rib,
            FibOptions {
                mode: Mode::Regional("ams".into()),
                ..FibOptions::default()
            },
        )
        .unwrap();
        let global = Fib::load(&rib).unwrap();
        rib.upsert_machines(&[
            row("a1", "ams", 1, MachineState::Started),
            row("a2", "ams", 1, MachineState::Stopped),
            row("o1", "ord", 1, MachineState::Started),
            row("o2", "ord", 1, MachineState::Suspended),
            MachineRow {
                cordoned: true,
                ..row("o3", "ord", 1, MachineState::Started)
            },
        ])
        .unwrap();
        regional.catch_up(&rib).unwrap();
        global.catch_up(&rib).unwrap();

        let app = regional.lookup("hello").unwrap();
        let ids: Vec<_> = app.machines.iter().map(|m| &*m.id).collect();
        assert_eq!(ids, ["a1", "a2"]);
        let ord = app.region("ord").unwrap();
        assert_eq!((ord.started, ord.suspended, ord.routable), (2, 1, 1));
        assert_eq!(ord.capacity, u64::from(build::DEFAULT_SOFT_LIMIT));
        assert_eq!(app.count(MachineState::Started), 3);
        let elsewhere: Vec<_> = app
            .regions_elsewhere("ams")
            .iter()
            .map(|r| &*r.region)
            .collect();
        assert_eq!(elsewhere, ["ord"]);
        assert_eq!(global.lookup("hello").unwrap().machines.len(), 5);
        assert_eq!(app.regions, global.lookup("hello").unwrap().regions);
        assert_eq!(regional.snapshot().machine_count(), 2);
        assert_eq!(regional.stats().machines, 5);
    }
}

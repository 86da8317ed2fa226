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

mod apply;
mod build;
mod follower;
mod routes;
mod table;

pub use follower::{Follower, FollowerOptions, Stall};
pub use routes::{AppRoutes, Load, RegionSummary, RemoteMachine, RouteMachine};

use crate::lock::{Guarded, LockStats};
use crate::rib::{CertificateRow, Rib, RibError, RibView};
use arc_swap::ArcSwap;
use build::Interner;
use compact_str::CompactString;
use hangar_api::machine::MachineState;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Tests make the next writer block here, inside the writer lock: it
    /// says so on the first channel, then waits on the second.
    #[cfg(test)]
    stall: parking_lot::Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
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

    /// Returns once `done()` holds, asking again at each new snapshot; or
    /// once `deadline` has passed, with what `done()` says then.
    pub async fn until(
        &mut self,
        deadline: tokio::time::Instant,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        while !done() {
            if tokio::time::timeout_at(deadline, self.next())
                .await
                .is_err()
            {
                return done();
            }
        }
        true
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
            apply::full(&mut interner, rib, &options.mode, None)
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
            if let Some((stalled, release)) = self.stall.lock().take() {
                let _ = stalled.send(());
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
                let fresh = apply::full(interner, rib, &self.mode, Some(&current))?;
                self.swap(fresh);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let changes = rib.changes_since(current.seq, FEED_BATCH)?;
            if changes.is_empty() {
                return Ok(total);
            }
            let next = apply::apply(interner, rib, &self.mode, &current, &changes)?;
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

    #[tokio::test]
    async fn until_waits_for_the_snapshot_that_makes_it_true_or_the_deadline() {
        use tokio::time::{Duration, Instant};
        let (_dir, rib) = rib();
        let fib = Fib::load(&rib).unwrap();
        let mut changed = fib.changed();
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(!changed.until(soon, || fib.lookup("hello").is_some()).await);
        // The waiter looks first, finds nothing, and waits; then the
        // writer makes two snapshots, the second with the app.
        let later = Instant::now() + Duration::from_secs(5);
        let (found, ()) = tokio::join!(
            changed.until(later, || fib.lookup("hello").is_some()),
            async {
                tokio::task::yield_now().await;
                for app in ["other", "hello"] {
                    rib.create_app(&app_row(app)).unwrap();
                    fib.catch_up(&rib).unwrap();
                }
            }
        );
        assert!(found, "true at the snapshot with the app");
        assert!(Instant::now() < later);
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

//! The FIB (the Catalog): the proxy's in-memory routing table.
//!
//! The table is an immutable [`FibSnapshot`] behind an `ArcSwap`: a lookup
//! is one atomic load, never a lock a writer could hold. The follower
//! ([`Fib::follow`]) is the only writer: it reads the RIB's change feed,
//! rebuilds just the apps a change touches, and swaps in a new snapshot.
//! Per-machine in-flight counters are atomics shared between snapshots, so a
//! rebuild never resets the load the proxy is balancing on.

use crate::rib::{CertificateRow, Change, MachineRow, Rib, RibError};
use arc_swap::ArcSwap;
use hangar_api::machine::{MachineService, MachineState};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// A machine as the proxy routes to it.
#[derive(Debug)]
pub struct RouteMachine {
    pub id: String,
    pub region: String,
    pub host: String,
    pub state: MachineState,
    pub private_ip: IpAddr,
    pub cordoned: bool,
    /// Whether its service checks pass (true when it has none).
    pub healthy: bool,
    pub services: Vec<MachineService>,
    /// Requests the proxy has in flight to this machine. Shared by every
    /// snapshot that contains the machine.
    pub inflight: Arc<AtomicUsize>,
}

impl RouteMachine {
    /// Whether the proxy may send new requests to this machine: started,
    /// not cordoned, and passing its service checks.
    pub fn routable(&self) -> bool {
        self.state == MachineState::Started && !self.cordoned && self.healthy
    }
}

/// An app's routes: its machines (destroyed ones are left out) and its
/// custom certificates.
#[derive(Debug, Default)]
pub struct AppRoutes {
    pub name: String,
    pub machines: Vec<Arc<RouteMachine>>,
    pub certificates: Vec<Arc<CertificateRow>>,
}

/// One immutable version of the whole table.
#[derive(Debug, Default)]
pub struct FibSnapshot {
    /// The RIB change sequence number this snapshot reflects.
    pub seq: u64,
    pub apps: HashMap<String, Arc<AppRoutes>>,
    /// Custom hostnames (lowercase) → their app and certificate.
    pub hostnames: HashMap<String, Arc<CertificateRow>>,
}

/// The hostname index of a set of apps.
fn hostnames(apps: &HashMap<String, Arc<AppRoutes>>) -> HashMap<String, Arc<CertificateRow>> {
    apps.values()
        .flat_map(|a| a.certificates.iter())
        .map(|c| (c.hostname.clone(), c.clone()))
        .collect()
}

impl FibSnapshot {
    /// The app and certificate of a custom hostname.
    pub fn hostname(&self, name: &str) -> Option<&Arc<CertificateRow>> {
        self.hostnames.get(name)
    }

    /// Machine counts by state across every app.
    pub fn machine_counts(&self) -> HashMap<MachineState, u64> {
        let mut counts = HashMap::new();
        for app in self.apps.values() {
            for m in &app.machines {
                *counts.entry(m.state).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// The FIB: see the module docs.
pub struct Fib {
    snapshot: ArcSwap<FibSnapshot>,
    /// Changes applied since start, for telemetry.
    applied: AtomicU64,
    /// Full reloads since start (after falling behind a compaction).
    reloads: AtomicU64,
}

/// How many feed entries the follower reads per round.
const FEED_BATCH: usize = 1024;

impl Fib {
    /// Loads the whole table from the RIB.
    pub fn load(rib: &Rib) -> Result<Arc<Self>, RibError> {
        Ok(Arc::new(Self {
            snapshot: ArcSwap::from_pointee(full_snapshot(rib, None)?),
            applied: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
        }))
    }

    /// The current snapshot. Cheap; hold it for the duration of one request.
    pub fn snapshot(&self) -> Arc<FibSnapshot> {
        self.snapshot.load_full()
    }

    /// The routes of one app, if it exists.
    pub fn lookup(&self, app: &str) -> Option<Arc<AppRoutes>> {
        self.snapshot.load().apps.get(app).cloned()
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
        let mut total = 0;
        loop {
            let current = self.snapshot.load_full();
            if current.seq < rib.compacted_through()? {
                // The changes it needs are gone: start over from the RIB.
                tracing::info!(
                    seq = current.seq,
                    "fib: behind the compacted feed; reloading"
                );
                self.snapshot
                    .store(Arc::new(full_snapshot(rib, Some(&current))?));
                self.reloads.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let changes = rib.changes_since(current.seq, FEED_BATCH)?;
            let Some(last) = changes.last().map(|c| c.seq) else {
                return Ok(total);
            };
            let mut apps = current.apps.clone();
            for name in touched_apps(&changes) {
                if rib.app(&name)?.is_some() {
                    let previous = current.apps.get(&name).map(|a| a.as_ref());
                    apps.insert(name.clone(), Arc::new(load_app(rib, &name, previous)?));
                } else {
                    apps.remove(&name);
                }
            }
            let hostnames = hostnames(&apps);
            // Single writer (the follower), so a plain store cannot lose an update.
            self.snapshot.store(Arc::new(FibSnapshot {
                seq: last,
                apps,
                hostnames,
            }));
            total += changes.len();
            self.applied
                .fetch_add(changes.len() as u64, Ordering::Relaxed);
        }
    }

    /// Follows the RIB until `stop` resolves: woken by in-process commits, and
    /// polling every `poll` for commits made by other processes.
    pub async fn follow(
        self: Arc<Self>,
        rib: Arc<Rib>,
        poll: Duration,
        stop: impl Future<Output = ()>,
    ) {
        let mut feed = rib.subscribe();
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.catch_up(&rib) {
                tracing::warn!(error = %e, "fib: catching up with the rib failed; retrying");
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = feed.changed() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}

/// The whole table from the RIB, keeping the in-flight counters of
/// `previous` for machines it already had.
fn full_snapshot(rib: &Rib, previous: Option<&FibSnapshot>) -> Result<FibSnapshot, RibError> {
    // Read the feed position first: anything committed after it is
    // replayed by the follower, and replaying is idempotent.
    let seq = rib.last_seq()?;
    let mut apps = HashMap::new();
    for app in rib.apps(None)? {
        let old = previous
            .and_then(|p| p.apps.get(&app.name))
            .map(|a| a.as_ref());
        let routes = load_app(rib, &app.name, old)?;
        apps.insert(app.name, Arc::new(routes));
    }
    let hostnames = hostnames(&apps);
    Ok(FibSnapshot {
        seq,
        apps,
        hostnames,
    })
}

fn touched_apps(changes: &[Change]) -> HashSet<String> {
    changes.iter().filter_map(|c| c.app.clone()).collect()
}

fn load_app(rib: &Rib, name: &str, previous: Option<&AppRoutes>) -> Result<AppRoutes, RibError> {
    let mut routes = build_app(name, rib.machines_of_app(name)?, previous);
    routes.certificates = rib
        .certificates_of_app(name)?
        .into_iter()
        .map(Arc::new)
        .collect();
    Ok(routes)
}

fn build_app(name: &str, rows: Vec<MachineRow>, previous: Option<&AppRoutes>) -> AppRoutes {
    let machines = rows
        .into_iter()
        .filter(|m| m.state != MachineState::Destroyed)
        .filter_map(|m| {
            let Ok(private_ip) = m.private_ip.parse() else {
                tracing::warn!(machine = %m.id, ip = %m.private_ip, "fib: skipping machine with bad private ip");
                return None;
            };
            let inflight = previous
                .and_then(|p| p.machines.iter().find(|old| old.id == m.id))
                .map(|old| old.inflight.clone())
                .unwrap_or_default();
            Some(Arc::new(RouteMachine {
                id: m.id,
                region: m.region,
                host: m.host,
                state: m.state,
                private_ip,
                cordoned: m.cordoned,
                healthy: m.healthy,
                services: m.services,
                inflight,
            }))
        })
        .collect();
    AppRoutes {
        name: name.to_string(),
        machines,
        certificates: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rib::AppRow;

    fn row(id: &str, version: u64, state: MachineState) -> MachineRow {
        MachineRow {
            id: id.into(),
            app: "hello".into(),
            region: "dev".into(),
            host: "h1".into(),
            state,
            private_ip: "127.10.0.2".into(),
            instance_id: "v1".into(),
            cordoned: false,
            services: vec![],
            row_version: version,
            healthy: true,
            updated_at: 0,
        }
    }

    #[test]
    fn follows_machine_and_app_changes_keeping_inflight_counters() {
        let dir = tempfile::tempdir().unwrap();
        let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
        rib.ensure_org("personal", "Personal").unwrap();
        let fib = Fib::load(&rib).unwrap();
        assert!(fib.lookup("hello").is_none());

        rib.create_app(&AppRow {
            name: "hello".into(),
            id: "a1".into(),
            org_slug: "personal".into(),
            network: "default".into(),
            created_at: 0,
        })
        .unwrap();
        rib.upsert_machine(&row("m1", 1, MachineState::Started))
            .unwrap();
        fib.catch_up(&rib).unwrap();
        let app = fib.lookup("hello").unwrap();
        assert_eq!(app.machines.len(), 1);
        assert!(app.machines[0].routable());
        app.machines[0].inflight.fetch_add(3, Ordering::Relaxed);

        rib.upsert_machine(&row("m1", 2, MachineState::Stopped))
            .unwrap();
        fib.catch_up(&rib).unwrap();
        let m = fib.lookup("hello").unwrap().machines[0].clone();
        assert!(!m.routable());
        assert_eq!(
            m.inflight.load(Ordering::Relaxed),
            3,
            "counter survives a rebuild"
        );

        rib.upsert_machine(&row("m1", 3, MachineState::Destroyed))
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

    #[tokio::test]
    async fn follower_is_woken_by_commits() {
        let dir = tempfile::tempdir().unwrap();
        let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
        rib.ensure_org("personal", "Personal").unwrap();
        let fib = Fib::load(&rib).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // A long poll interval: only the in-process wake-up can be fast.
        let task = tokio::spawn(fib.clone().follow(
            rib.clone(),
            Duration::from_secs(3600),
            async {
                let _ = stop_rx.await;
            },
        ));
        rib.create_app(&AppRow {
            name: "hello".into(),
            id: "a1".into(),
            org_slug: "personal".into(),
            network: "default".into(),
            created_at: 0,
        })
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while fib.lookup("hello").is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("follower applied the change");
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }
}

//! Choosing the machine for one request.
//!
//! A machine is a candidate when it is routable (started, healthy, not
//! cordoned) and has a TCP service that handles HTTP for the listener the
//! request came in on. Each candidate's load is its in-flight count, held
//! by [`Lease`]s, against its service's `concurrency` limits
//! (`soft_limit`, default 20; `hard_limit`, default 25, as on Fly):
//!
//! 1. a machine at its hard limit is never chosen;
//! 2. machines under their soft limit come first, in this proxy's region
//!    before other regions, and other regions closest first ([`Near`]: the
//!    order of `proxy.peers`, unlisted regions last);
//! 3. then machines between soft and hard, again nearest first.
//!
//! Within the best class present, the proxy takes the less loaded of two
//! candidates picked at random ("power of two choices") on exact in-flight
//! counts: nearly as good as least-loaded, without every worker herding
//! onto the same idle machine.
//!
//! For HTTP services both concurrency types count the same thing: one
//! request in flight holds one upstream connection, so `requests` and
//! `connections` give the same load.
//!
//! The counts are atomics shared by every FIB snapshot. [`Lease::acquire`]
//! takes a unit only while the machine is under its hard limit, so two
//! requests racing for the last slot cannot both get it.

use crate::config::Listener;
use crate::config::Peer;
use hangar_api::machine::{MachinePort, MachineService, MachineState};
use hangar_catalog::{AppRoutes, Load, RouteMachine};
use rand::Rng;
use std::cell::Cell;
use std::sync::Arc;

/// `soft_limit` when a service sets none (Fly's default).
pub const DEFAULT_SOFT_LIMIT: u32 = 20;
/// `hard_limit` when a service sets none (Fly's default).
pub const DEFAULT_HARD_LIMIT: u32 = 25;

/// What a request or connection needs from a machine's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// HTTP on the proxy's shared listeners: the service whose public port
    /// `port` handles `http` (and `tls` when `tls`), else the first service
    /// that handles `http` on any port.
    Http {
        /// 80 or 443, whatever port the proxy really binds.
        port: u16,
        /// The request came over TLS.
        tls: bool,
    },
    /// The service that declares public port `port`, whatever its
    /// handlers: a connection to one of the app's own addresses.
    Port(u16),
    /// HTTP for public port `port` of the app's flycast address, asked of
    /// a shared listener (`<app>.flycast:port`): only a service whose
    /// `port` handles `http`, never a raw TCP one.
    HttpPort(u16),
}

impl Want {
    /// HTTP on one of the shared listeners.
    pub fn http(listener: Listener) -> Self {
        Self::Http {
            port: listener.public_port(),
            tls: listener == Listener::Https,
        }
    }

    fn matches(self, port: &MachinePort) -> bool {
        match self {
            Self::Http { port: p, tls } => {
                port.port == Some(p) && has(port, "http") && (!tls || has(port, "tls"))
            }
            Self::Port(p) => port.port == Some(p),
            Self::HttpPort(p) => port.port == Some(p) && has(port, "http"),
        }
    }
}

/// The machine chosen for a request and the service that takes it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The app's routes from the snapshot the request was routed on.
    app: Arc<AppRoutes>,
    index: usize,
    service: usize,
    want: Want,
    /// Every machine the request could go to was past its soft limit.
    past_soft: bool,
}

impl Target {
    /// The chosen machine.
    pub fn machine(&self) -> &RouteMachine {
        &self.app.machines()[self.index]
    }

    /// The app's routes the machine was chosen from.
    pub fn app(&self) -> &Arc<AppRoutes> {
        &self.app
    }

    /// What the request needed of the machine's services.
    pub fn want(&self) -> Want {
        self.want
    }

    /// The service that takes the request.
    pub fn service(&self) -> &MachineService {
        &self.machine().services[self.service]
    }

    /// The service's `internal_port` on the machine's private address.
    pub fn internal_port(&self) -> u16 {
        self.service().internal_port
    }

    /// The service's port the request came in on, where its handlers and
    /// HTTP options live; `None` when an HTTP request fell back to a
    /// service without a matching port.
    pub fn port(&self) -> Option<&MachinePort> {
        self.service().ports.iter().find(|p| self.want.matches(p))
    }

    /// Whether the best machine available was already past its soft limit
    /// (so the app could use another machine).
    pub fn past_soft(&self) -> bool {
        self.past_soft
    }

    /// The service's soft and hard limits.
    pub fn limits(&self) -> Limits {
        Limits::of(self.service())
    }
}

/// A service's concurrency limits, defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Preferred maximum load.
    pub soft: usize,
    /// Absolute maximum load; never below `soft`.
    pub hard: usize,
}

impl Limits {
    /// The limits `service` declares, with Fly's defaults for those unset.
    pub fn of(service: &MachineService) -> Self {
        let c = service.concurrency.as_ref();
        let soft = c
            .and_then(|c| c.soft_limit)
            .unwrap_or(DEFAULT_SOFT_LIMIT)
            .max(1) as usize;
        let hard = c
            .and_then(|c| c.hard_limit)
            .unwrap_or(DEFAULT_HARD_LIMIT)
            .max(1) as usize;
        Self {
            soft,
            hard: hard.max(soft),
        }
    }
}

/// Where "near" is for a request: its region (this proxy's, or the one the
/// client prefers) first, then the regions of `closer`, the other regions'
/// proxies closest first (`proxy.peers`); regions not listed come last.
#[derive(Debug, Clone, Copy)]
pub struct Near<'a> {
    /// The nearest region.
    pub region: &'a str,
    /// The other regions' proxies, closest first.
    pub closer: &'a [Peer],
}

impl<'a> Near<'a> {
    /// Only `region` is near; every other region is as far as the next.
    pub fn only(region: &'a str) -> Self {
        Self {
            region,
            closer: &[],
        }
    }

    /// A region's distance rank: 0 for the nearest, then by `closer`.
    pub fn rank(&self, region: &str) -> u8 {
        if region == self.region {
            return 0;
        }
        self.closer
            .iter()
            .position(|p| p.region == region)
            .map_or(u8::MAX, |i| u8::try_from(i + 1).unwrap_or(u8::MAX - 1))
    }
}

/// Why an app has no machine for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTarget {
    /// No machine is started.
    NoStartedMachine,
    /// Machines are started, but all are cordoned or failing their
    /// service checks.
    NoHealthyMachine,
    /// Started machines exist, but none has an HTTP service.
    NoHttpService,
    /// Every candidate is at its hard limit: the request may wait for a slot.
    AtCapacity,
}

/// Picks the machine for what `want` needs, nearest by `near`; see the
/// module docs. Machines for which `skip` is true (say ones that just
/// refused a connection) are left out.
pub fn choose(
    app: &Arc<AppRoutes>,
    want: Want,
    near: Near<'_>,
    skip: impl Fn(&RouteMachine) -> bool,
    rng: &mut impl Rng,
) -> Result<Target, NoTarget> {
    if app.candidates().is_empty() {
        let started = app
            .machines()
            .iter()
            .any(|m| m.state == MachineState::Started);
        return Err(if started {
            NoTarget::NoHealthyMachine
        } else {
            NoTarget::NoStartedMachine
        });
    }
    // Machines of one app mostly share one decoded services config (the
    // catalog interns them), so the service and limits are worked out once
    // per config rather than once per machine.
    let memo = Cell::new((std::ptr::null::<MachineService>(), None));
    let service_of = |services: &Arc<[MachineService]>| {
        let (seen, found) = memo.get();
        if seen == services.as_ptr() {
            return found;
        }
        let found = service_for(services, want).map(|i| (i, Limits::of(&services[i])));
        memo.set((services.as_ptr(), found));
        found
    };
    // Candidates are the first machines, so an index into them is also the
    // machine's. Each is (index, service, class, load); a lower class is
    // better (past the soft limit in the high byte, the region's rank in
    // the low one), and `None` means at the hard limit.
    let classify = |i: usize, m: &RouteMachine| {
        let (service, limits) = service_of(&m.services)?;
        let load = m.load.get();
        let class = if load >= limits.hard {
            None
        } else {
            Some(u16::from(load >= limits.soft) << 8 | u16::from(near.rank(&m.region)))
        };
        Some((i, service, class, load))
    };
    let all = || {
        app.candidates()
            .iter()
            .enumerate()
            .filter(|(_, m)| !skip(m))
            .filter_map(|(i, m)| classify(i, m))
    };
    // Two passes over a handful of machines, without allocating: the best
    // class present and how many share it, then the two random picks.
    let mut serving = false;
    let mut best: Option<(u16, usize)> = None;
    for (_, _, class, _) in all() {
        serving = true;
        let Some(class) = class else { continue };
        best = match best {
            Some((b, n)) if b == class => Some((b, n + 1)),
            Some((b, n)) if b < class => Some((b, n)),
            _ => Some((class, 1)),
        };
    }
    let Some((class, count)) = best else {
        return Err(if serving {
            NoTarget::AtCapacity
        } else {
            NoTarget::NoHttpService
        });
    };
    let (a, b) = two_distinct(count, rng);
    let mut picked = all()
        .filter(|c| c.2 == Some(class))
        .enumerate()
        .filter(|(k, _)| Some(*k) == a || Some(*k) == b);
    let one = picked.next().ok_or(NoTarget::AtCapacity)?;
    let (index, service, _, _) = match picked.next() {
        // The lighter wins; on a tie the one drawn first, so ties do not
        // always go to the machine listed first.
        Some(other) if other.1.3 < one.1.3 || (other.1.3 == one.1.3 && Some(other.0) == a) => {
            other.1
        }
        _ => one.1,
    };
    Ok(Target {
        app: app.clone(),
        index,
        service,
        want,
        // The high byte says past the soft limit (see `classify`).
        past_soft: class >= 1 << 8,
    })
}

/// The service (by index) that takes what `want` needs; see [`Want`].
pub fn service_for(services: &[MachineService], want: Want) -> Option<usize> {
    let tcp = || {
        services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.protocol == "tcp")
    };
    let exact = tcp().find(|(_, s)| s.ports.iter().any(|p| want.matches(p)));
    match want {
        Want::Http { .. } => {
            exact.or_else(|| tcp().find(|(_, s)| s.ports.iter().any(|p| has(p, "http"))))
        }
        Want::Port(_) | Want::HttpPort(_) => exact,
    }
    .map(|(i, _)| i)
}

fn has(port: &MachinePort, handler: &str) -> bool {
    port.handlers.iter().any(|h| h == handler)
}

/// Two distinct random positions below `n`; one when `n` is 1.
fn two_distinct(n: usize, rng: &mut impl Rng) -> (Option<usize>, Option<usize>) {
    match n {
        0 => (None, None),
        1 => (Some(0), None),
        _ => {
            let a = rng.random_range(0..n);
            // Draw from the n-1 others so the two picks always differ.
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            (Some(a), Some(b))
        }
    }
}

/// One request's share of a machine's in-flight count: taken by
/// [`Lease::acquire`], given back on drop, so every way a request ends
/// (response finished, client gone, error) releases it exactly once.
#[derive(Debug)]
pub struct Lease {
    load: Load,
    /// Told of the release, with the machine's app and index.
    hooks: Option<(Arc<dyn Released>, Arc<AppRoutes>, usize)>,
}

/// Who hears that a lease ended: the scaling room (the app's waiting
/// requests, the machine's idle clock), which routing does not know.
pub trait Released: Send + Sync + std::fmt::Debug {
    /// `machine` of `app` has one request fewer in flight.
    fn released(&self, app: &AppRoutes, machine: &RouteMachine);
}

impl Lease {
    /// Counts one more request in flight on the target's machine, unless it
    /// is already at its hard limit. `released` hears of the release.
    pub fn acquire(target: &Target, released: Option<&Arc<dyn Released>>) -> Option<Self> {
        let load = &target.machine().load;
        if !load.take_below(target.limits().hard) {
            return None;
        }
        Some(Self {
            load: load.clone(),
            hooks: released.map(|r| (r.clone(), target.app.clone(), target.index)),
        })
    }

    /// Counts one more request on `machine` whatever its load.
    #[cfg(test)]
    pub fn force(machine: &RouteMachine) -> Self {
        machine.load.take();
        Self {
            load: machine.load.clone(),
            hooks: None,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.load.give();
        if let Some((released, app, index)) = &self.hooks {
            released.released(app, &app.machines()[*index]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_api::machine::{Concurrency, MachineState};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::HashMap;

    fn service(internal_port: u16, ports: &[(u16, &[&str])]) -> MachineService {
        MachineService {
            protocol: "tcp".into(),
            internal_port,
            ports: ports
                .iter()
                .map(|(port, handlers)| MachinePort {
                    port: Some(*port),
                    handlers: handlers.iter().map(|h| h.to_string()).collect(),
                    ..MachinePort::default()
                })
                .collect(),
            ..MachineService::default()
        }
    }

    fn machine(id: &str, state: MachineState, services: Vec<MachineService>) -> RouteMachine {
        RouteMachine {
            id: id.into(),
            region: "dev".into(),
            host: "h1".into(),
            state,
            private_ip: "127.10.0.2".parse().unwrap(),
            cordoned: false,
            healthy: true,
            services: services.into(),
            primary_region: None,
            load: Load::default(),
        }
    }

    /// A started web machine in `region` with limits `soft`/`hard` and
    /// `load` requests in flight.
    fn loaded(id: &str, region: &str, soft: u32, hard: u32, load: usize) -> RouteMachine {
        let mut web = web();
        web[0].concurrency = Some(Concurrency {
            kind: Some("requests".into()),
            soft_limit: Some(soft),
            hard_limit: Some(hard),
        });
        let mut m = machine(id, MachineState::Started, web);
        m.region = region.into();
        (0..load).for_each(|_| m.load.take());
        m
    }

    fn app(machines: Vec<RouteMachine>) -> Arc<AppRoutes> {
        Arc::new(AppRoutes::with_machines("hello", machines))
    }

    fn web() -> Vec<MachineService> {
        vec![service(8080, &[(80, &["http"]), (443, &["tls", "http"])])]
    }

    fn pick(routes: &Arc<AppRoutes>, rng: &mut StdRng) -> Result<String, NoTarget> {
        choose(
            routes,
            Want::http(Listener::Http),
            Near::only("dev"),
            |_| false,
            rng,
        )
        .map(|t| t.machine().id.to_string())
    }

    /// How often each machine is chosen in `n` tries.
    fn spread(routes: &Arc<AppRoutes>, n: usize) -> HashMap<String, usize> {
        let mut rng = StdRng::seed_from_u64(9);
        let mut seen = HashMap::new();
        for _ in 0..n {
            *seen.entry(pick(routes, &mut rng).unwrap()).or_default() += 1;
        }
        seen
    }

    #[test]
    fn only_routable_machines_are_chosen() {
        let mut rng = StdRng::seed_from_u64(1);
        let stopped = machine("stopped", MachineState::Stopped, web());
        assert_eq!(
            pick(&app(vec![stopped.clone()]), &mut rng),
            Err(NoTarget::NoStartedMachine)
        );

        let mut cordoned = machine("cordoned", MachineState::Started, web());
        cordoned.cordoned = true;
        let mut failing = machine("failing", MachineState::Started, web());
        failing.healthy = false;
        assert_eq!(
            pick(&app(vec![cordoned.clone(), failing.clone()]), &mut rng),
            Err(NoTarget::NoHealthyMachine)
        );
        let started = machine("started", MachineState::Started, web());
        let routes = app(vec![stopped, cordoned, failing, started]);
        for _ in 0..50 {
            let target = choose(
                &routes,
                Want::http(Listener::Http),
                Near::only("dev"),
                |_| false,
                &mut rng,
            )
            .unwrap();
            assert_eq!(&*target.machine().id, "started");
            assert_eq!(target.internal_port(), 8080);
        }
    }

    #[test]
    fn started_machines_without_http_are_reported_as_such() {
        let mut rng = StdRng::seed_from_u64(1);
        let tcp_only = machine(
            "db",
            MachineState::Started,
            vec![service(5432, &[(5432, &[])])],
        );
        let no_services = machine("worker", MachineState::Started, vec![]);
        assert_eq!(
            choose(
                &app(vec![tcp_only, no_services]),
                Want::http(Listener::Https),
                Near::only("dev"),
                |_| false,
                &mut rng
            )
            .unwrap_err(),
            NoTarget::NoHttpService
        );
    }

    #[test]
    fn the_service_matching_the_listener_port_wins() {
        let services = vec![
            service(9000, &[(8080, &["http"])]),
            service(8443, &[(443, &["tls", "http"])]),
            service(8080, &[(80, &["http"])]),
        ];
        assert_eq!(service_for(&services, Want::http(Listener::Http)), Some(2));
        assert_eq!(service_for(&services, Want::http(Listener::Https)), Some(1));
        assert_eq!(service_for(&services, Want::Port(8080)), Some(0));
        assert_eq!(service_for(&services, Want::Port(5432)), None);
    }

    #[test]
    fn without_an_exact_match_the_first_http_service_serves() {
        // Port 443 without tls is not an exact https match.
        let services = vec![
            service(5432, &[(5432, &[])]),
            service(3000, &[(443, &["http"])]),
            service(8080, &[(80, &["http"])]),
        ];
        assert_eq!(service_for(&services, Want::http(Listener::Https)), Some(1));
        assert_eq!(service_for(&services, Want::http(Listener::Http)), Some(2));
        assert_eq!(service_for(&services, Want::Port(5432)), Some(0));
        // HTTP for a flycast port goes only to a port that handles it.
        assert_eq!(service_for(&services, Want::HttpPort(5432)), None);
        assert_eq!(service_for(&services, Want::HttpPort(443)), Some(1));

        let mut udp = service(53, &[(80, &["http"])]);
        udp.protocol = "udp".into();
        assert_eq!(service_for(&[udp], Want::http(Listener::Http)), None);
    }

    #[test]
    fn limits_default_to_flys_and_hard_is_never_below_soft() {
        let mut s = service(8080, &[(80, &["http"])]);
        assert_eq!(Limits::of(&s), Limits { soft: 20, hard: 25 });
        s.concurrency = Some(Concurrency {
            kind: None,
            soft_limit: Some(50),
            hard_limit: Some(10),
        });
        assert_eq!(Limits::of(&s), Limits { soft: 50, hard: 50 });
    }

    #[test]
    fn the_lighter_of_two_equals_wins() {
        // With two candidates both are always drawn, so the lighter wins.
        let routes = app(vec![
            loaded("busy", "dev", 20, 25, 5),
            loaded("idle", "dev", 20, 25, 0),
        ]);
        assert_eq!(spread(&routes, 100)["idle"], 100);
        // The heaviest of three never beats the other one it is drawn with.
        let routes = app(vec![
            loaded("a", "dev", 20, 25, 3),
            loaded("b", "dev", 20, 25, 9),
            loaded("c", "dev", 20, 25, 1),
        ]);
        assert!(!spread(&routes, 200).contains_key("b"));
    }

    #[test]
    fn ties_are_split_evenly() {
        let routes = app(vec![
            loaded("a", "dev", 20, 25, 2),
            loaded("b", "dev", 20, 25, 2),
        ]);
        let seen = spread(&routes, 1000);
        assert!(seen["a"] > 400 && seen["b"] > 400, "{seen:?}");
    }

    #[test]
    fn under_soft_beats_over_soft_and_hard_is_never_crossed() {
        // "over" is past its soft limit, "under" is not, "full" is at hard.
        let routes = app(vec![
            loaded("over", "dev", 2, 10, 5),
            loaded("under", "dev", 2, 10, 1),
            loaded("full", "dev", 2, 10, 10),
        ]);
        assert_eq!(spread(&routes, 100)["under"], 100);
        // Everyone over soft: the ones under hard share the load.
        let routes = app(vec![
            loaded("over", "dev", 2, 10, 5),
            loaded("full", "dev", 2, 10, 10),
        ]);
        assert_eq!(spread(&routes, 100)["over"], 100);
        let routes = app(vec![loaded("full", "dev", 2, 10, 10)]);
        assert_eq!(
            pick(&routes, &mut StdRng::seed_from_u64(1)),
            Err(NoTarget::AtCapacity)
        );
    }

    #[test]
    fn this_region_first_then_the_others() {
        let routes = app(vec![
            loaded("far", "ord", 20, 25, 0),
            loaded("near", "dev", 20, 25, 7),
        ]);
        assert_eq!(spread(&routes, 100)["near"], 100);
        // Past its soft limit, the near one loses to a far one under it.
        let routes = app(vec![
            loaded("far", "ord", 20, 25, 19),
            loaded("near", "dev", 20, 25, 20),
        ]);
        assert_eq!(spread(&routes, 100)["far"], 100);
    }

    #[test]
    fn other_regions_go_closest_first() {
        let routes = app(vec![
            loaded("syd", "syd", 20, 25, 0),
            loaded("ord", "ord", 20, 25, 0),
            loaded("ams", "ams", 20, 25, 5),
            loaded("home", "dev", 20, 25, 20),
        ]);
        let peer = |region: &str| Peer {
            region: region.parse().unwrap(),
            addr: ([127, 0, 0, 1], 1).into(),
        };
        let closer = [peer("ams"), peer("ord")];
        let near = Near {
            region: "dev",
            closer: &closer,
        };
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20 {
            let t = choose(
                &routes,
                Want::http(Listener::Http),
                near,
                |_| false,
                &mut rng,
            );
            assert_eq!(
                &*t.unwrap().machine().id,
                "ams",
                "the closest under its soft limit"
            );
        }
        assert_eq!(
            (near.rank("dev"), near.rank("ams"), near.rank("ord")),
            (0, 1, 2)
        );
        assert_eq!(near.rank("syd"), u8::MAX, "unlisted: last");
    }

    #[test]
    fn skipped_machines_are_left_out() {
        let routes = app(vec![
            loaded("a", "dev", 20, 25, 0),
            loaded("b", "dev", 20, 25, 9),
        ]);
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..20 {
            let t = choose(
                &routes,
                Want::http(Listener::Http),
                Near::only("dev"),
                |m| &*m.id == "a",
                &mut rng,
            );
            assert_eq!(&*t.unwrap().machine().id, "b");
        }
        let none = choose(
            &routes,
            Want::http(Listener::Http),
            Near::only("dev"),
            |_| true,
            &mut rng,
        );
        assert_eq!(none.unwrap_err(), NoTarget::NoHttpService);
    }

    #[test]
    fn leases_stop_at_the_hard_limit_and_release_on_drop() {
        let routes = app(vec![loaded("m", "dev", 1, 2, 0)]);
        let target = choose(
            &routes,
            Want::http(Listener::Http),
            Near::only("dev"),
            |_| false,
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        let first = Lease::acquire(&target, None).unwrap();
        let second = Lease::acquire(&target, None).unwrap();
        assert!(Lease::acquire(&target, None).is_none(), "at hard limit");
        assert_eq!(target.machine().load.get(), 2);
        drop((first, second));
        assert_eq!(target.machine().load.get(), 0);
        let forced = Lease::force(target.machine());
        assert_eq!(target.machine().load.get(), 1);
        drop(forced);
    }
}

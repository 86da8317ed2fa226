//! Choosing the machine for one request.
//!
//! A machine is a candidate when it is routable (started, not cordoned) and
//! has a TCP service that handles HTTP for the listener the request came in
//! on. Among candidates the proxy takes the less loaded of two picked at
//! random ("power of two choices"): nearly as good as least-loaded, without
//! every proxy worker herding onto the same idle machine.
//!
//! Load is the machine's in-flight request count, an atomic shared by every
//! FIB snapshot. A [`Lease`] holds one unit of it for as long as the request
//! (and its response body) is in flight.

use crate::Listener;
use hangar_api::machine::{MachinePort, MachineService, MachineState};
use hangar_catalog::{AppRoutes, RouteMachine};
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The machine chosen for a request and the port its service listens on.
#[derive(Debug, Clone)]
pub struct Target {
    /// The app's routes from the snapshot the request was routed on.
    app: Arc<AppRoutes>,
    index: usize,
    /// The service's `internal_port` on the machine's private address.
    pub internal_port: u16,
}

impl Target {
    /// The chosen machine.
    pub fn machine(&self) -> &RouteMachine {
        &self.app.machines[self.index]
    }

    /// The app's routes the machine was chosen from.
    pub fn app(&self) -> &AppRoutes {
        &self.app
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
}

/// Picks the machine for one request on `listener`; see the module docs.
pub fn choose(
    app: &Arc<AppRoutes>,
    listener: Listener,
    rng: &mut impl Rng,
) -> Result<Target, NoTarget> {
    if app.candidates().is_empty() {
        let started = app
            .machines
            .iter()
            .any(|m| m.state == MachineState::Started);
        return Err(if started {
            NoTarget::NoHealthyMachine
        } else {
            NoTarget::NoStartedMachine
        });
    }
    // (index, internal port) of each candidate; candidates are the first
    // machines, so the index is also the machine's.
    let candidates: Vec<(usize, u16)> = app
        .candidates()
        .iter()
        .enumerate()
        .filter_map(|(i, m)| http_port(&m.services, listener).map(|port| (i, port)))
        .collect();
    let load = |&(i, _): &(usize, u16)| app.machines[i].inflight.load(Ordering::Relaxed);
    let &(index, internal_port) =
        two_choices(&candidates, load, rng).ok_or(NoTarget::NoHttpService)?;
    Ok(Target {
        app: app.clone(),
        index,
        internal_port,
    })
}

/// The internal port of the service that serves HTTP on `listener`: the one
/// whose public port matches the listener (80 with `http`, or 443 with `tls`
/// and `http`), else the first service that handles `http` on any port.
pub fn http_port(services: &[MachineService], listener: Listener) -> Option<u16> {
    let tcp = || services.iter().filter(|s| s.protocol == "tcp");
    let exact = |p: &MachinePort| {
        p.port == Some(listener.public_port())
            && has(p, "http")
            && (listener == Listener::Http || has(p, "tls"))
    };
    tcp()
        .find(|s| s.ports.iter().any(exact))
        .or_else(|| tcp().find(|s| s.ports.iter().any(|p| has(p, "http"))))
        .map(|s| s.internal_port)
}

fn has(port: &MachinePort, handler: &str) -> bool {
    port.handlers.iter().any(|h| h == handler)
}

/// Power of two choices: two distinct random candidates, the one with the
/// lower `load` wins (the first on a tie). One candidate is simply chosen.
pub fn two_choices<'a, T>(
    candidates: &'a [T],
    load: impl Fn(&T) -> usize,
    rng: &mut impl Rng,
) -> Option<&'a T> {
    let n = candidates.len();
    if n < 2 {
        return candidates.first();
    }
    let a = rng.random_range(0..n);
    // Draw from the n-1 others so the two picks always differ.
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (candidates.get(a)?, candidates.get(b)?);
    Some(if load(b) < load(a) { b } else { a })
}

/// One request's share of a machine's in-flight count: added on creation,
/// removed on drop, so every way a request ends (response finished, client
/// gone, error) releases it exactly once.
#[derive(Debug)]
pub struct Lease(Arc<AtomicUsize>);

impl Lease {
    /// Counts one more request in flight on `machine`.
    pub fn new(machine: &RouteMachine) -> Self {
        machine.inflight.fetch_add(1, Ordering::Relaxed);
        Self(machine.inflight.clone())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_api::machine::MachineState;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

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
            inflight: Arc::default(),
        }
    }

    fn app(machines: Vec<RouteMachine>) -> Arc<AppRoutes> {
        Arc::new(AppRoutes::with_machines("hello", machines))
    }

    fn web() -> Vec<MachineService> {
        vec![service(8080, &[(80, &["http"]), (443, &["tls", "http"])])]
    }

    #[test]
    fn only_routable_machines_are_chosen() {
        let mut rng = StdRng::seed_from_u64(1);
        let stopped = machine("stopped", MachineState::Stopped, web());
        assert_eq!(
            choose(&app(vec![stopped.clone()]), Listener::Http, &mut rng).unwrap_err(),
            NoTarget::NoStartedMachine
        );

        let mut cordoned = machine("cordoned", MachineState::Started, web());
        cordoned.cordoned = true;
        let mut failing = machine("failing", MachineState::Started, web());
        failing.healthy = false;
        assert_eq!(
            choose(
                &app(vec![cordoned.clone(), failing.clone()]),
                Listener::Http,
                &mut rng
            )
            .unwrap_err(),
            NoTarget::NoHealthyMachine
        );
        let started = machine("started", MachineState::Started, web());
        let routes = app(vec![stopped, cordoned, failing, started]);
        for _ in 0..50 {
            let target = choose(&routes, Listener::Http, &mut rng).unwrap();
            assert_eq!(&*target.machine().id, "started");
            assert_eq!(target.internal_port, 8080);
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
            choose(&app(vec![tcp_only, no_services]), Listener::Https, &mut rng).unwrap_err(),
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
        assert_eq!(http_port(&services, Listener::Http), Some(8080));
        assert_eq!(http_port(&services, Listener::Https), Some(8443));
    }

    #[test]
    fn without_an_exact_match_the_first_http_service_serves() {
        // Port 443 without tls is not an exact https match.
        let services = vec![
            service(5432, &[(5432, &[])]),
            service(3000, &[(443, &["http"])]),
            service(8080, &[(80, &["http"])]),
        ];
        assert_eq!(http_port(&services, Listener::Https), Some(3000));
        assert_eq!(http_port(&services, Listener::Http), Some(8080));

        let mut udp = service(53, &[(80, &["http"])]);
        udp.protocol = "udp".into();
        assert_eq!(http_port(&[udp], Listener::Http), None);
    }

    #[test]
    fn two_choices_picks_the_lighter_candidate() {
        let mut rng = StdRng::seed_from_u64(7);
        // With two candidates both are always drawn, so the lighter always wins.
        let loads = [5usize, 0];
        for _ in 0..100 {
            assert_eq!(two_choices(&loads, |l| *l, &mut rng), Some(&0));
        }
        // The heaviest of three can never beat the other one it is drawn with.
        let loads = [3usize, 9, 1];
        for _ in 0..100 {
            assert_ne!(two_choices(&loads, |l| *l, &mut rng), Some(&9));
        }
        assert_eq!(two_choices(&[4usize], |l| *l, &mut rng), Some(&4));
        assert_eq!(two_choices(&[] as &[usize], |l| *l, &mut rng), None);
    }

    #[test]
    fn choose_balances_on_inflight() {
        let mut rng = StdRng::seed_from_u64(3);
        let busy = machine("busy", MachineState::Started, web());
        let idle = machine("idle", MachineState::Started, web());
        let _held: Vec<Lease> = (0..4).map(|_| Lease::new(&busy)).collect();
        let routes = app(vec![busy, idle]);
        for _ in 0..20 {
            assert_eq!(
                &*choose(&routes, Listener::Http, &mut rng)
                    .unwrap()
                    .machine()
                    .id,
                "idle"
            );
        }
    }

    #[test]
    fn a_lease_counts_while_held() {
        let m = machine("m", MachineState::Started, web());
        let lease = Lease::new(&m);
        let second = Lease::new(&m);
        assert_eq!(m.inflight.load(Ordering::Relaxed), 2);
        drop(lease);
        drop(second);
        assert_eq!(m.inflight.load(Ordering::Relaxed), 0);
    }
}

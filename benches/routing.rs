//! The proxy's routing decision: choosing a machine for a request among an
//! app's candidates (limits, region preference, power of two choices on
//! exact in-flight counts) and taking its lease, for apps of 1 to 100
//! machines, with every machine under its soft limit and with most of
//! them past it.
//!
//! Run: `cargo bench --bench routing`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use hangar_api::machine::{Concurrency, MachinePort, MachineService, MachineState};
use hangar_catalog::{AppRoutes, RouteMachine};
use hangar_proxy::Listener;
use hangar_proxy::config::Peer;
use hangar_proxy::routing::balance::{Lease, Near, Want, choose};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::hint::black_box;
use std::sync::Arc;

fn web() -> Arc<[MachineService]> {
    let port = |port, handlers: &[&str]| MachinePort {
        port: Some(port),
        handlers: handlers.iter().map(|h| h.to_string()).collect(),
        ..MachinePort::default()
    };
    Arc::new([MachineService {
        protocol: "tcp".into(),
        internal_port: 8080,
        ports: vec![port(80, &["http"]), port(443, &["tls", "http"])],
        concurrency: Some(Concurrency {
            kind: Some("requests".into()),
            soft_limit: Some(20),
            hard_limit: Some(25),
        }),
        ..MachineService::default()
    }])
}

/// An app of `n` started machines over three regions; `busy` of them are
/// past their soft limit.
fn app(n: usize, busy: usize) -> Arc<AppRoutes> {
    let services = web();
    let regions: [Arc<str>; 3] = ["dev".into(), "ams".into(), "ord".into()];
    let machines = (0..n)
        .map(|i| {
            let m = RouteMachine {
                id: format!("m{i:04}").into(),
                region: regions[i % 3].clone(),
                host: "h1".into(),
                state: MachineState::Started,
                private_ip: "127.10.0.2".parse().unwrap(),
                cordoned: false,
                healthy: true,
                services: services.clone(),
                primary_region: None,
                load: Default::default(),
            };
            (0..if i < busy { 21 } else { i % 5 }).for_each(|_| m.load.take());
            m
        })
        .collect();
    Arc::new(AppRoutes::with_machines("bench", machines))
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("routing/choose+lease");
    let mut rng = StdRng::seed_from_u64(7);
    let want = Want::http(Listener::Http);
    // This proxy is in dev; ams is closer than ord.
    let peer = |region: &str| Peer {
        region: region.parse().unwrap(),
        addr: ([127, 0, 0, 1], 1).into(),
    };
    let closer = [peer("ams"), peer("ord")];
    let near = Near {
        region: "dev",
        closer: &closer,
    };
    for n in [1usize, 10, 100] {
        for (label, busy) in [("under_soft", 0), ("most_past_soft", n.saturating_sub(1))] {
            let routes = app(n, busy);
            group.bench_with_input(BenchmarkId::new(label, n), &routes, |b, routes| {
                b.iter(|| {
                    let target = choose(routes, want, near, |_| false, &mut rng).unwrap();
                    black_box(Lease::acquire(&target, None))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);

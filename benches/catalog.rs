//! Catalog micro-benchmarks: a request-path lookup in the FIB (one hot app,
//! and apps taken in a scattered order, so caches do not hide the table),
//! and the follower applying one machine change from the RIB (write, feed
//! read, app rebuild, snapshot swap). `hangar bench catalog` measures the
//! same paths at a million machines.
//!
//! Run: `cargo bench --bench catalog`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hangar_api::machine::MachineState;
use hangar_catalog::{AppRow, Fib, MachineRow, Rib};
use std::hint::black_box;

fn machine(id: usize, app: usize, version: u64, state: MachineState) -> MachineRow {
    MachineRow {
        id: format!("m{id:012}"),
        app: format!("app{app}"),
        region: "dev".into(),
        host: "h1".into(),
        state,
        private_ip: format!("127.10.{}.{}", (id / 250) % 250, id % 250 + 1),
        instance_id: "v1".into(),
        cordoned: false,
        services: vec![],
        row_version: version,
        healthy: true,
        primary_region: None,
        updated_at: 0,
    }
}

/// A RIB of `apps` apps with `per_app` started machines each.
fn rib(dir: &std::path::Path, apps: usize, per_app: usize) -> std::sync::Arc<Rib> {
    let rib = Rib::open(&dir.join("rib.sqlite")).unwrap();
    rib.ensure_org("personal", "Personal").unwrap();
    let rows: Vec<AppRow> = (0..apps)
        .map(|a| AppRow {
            name: format!("app{a}"),
            id: format!("id{a}"),
            org_slug: "personal".into(),
            network: "default".into(),
            created_at: 0,
        })
        .collect();
    rib.create_apps(&rows).unwrap();
    let machines: Vec<MachineRow> = (0..apps * per_app)
        .map(|m| machine(m, m / per_app, 1, MachineState::Started))
        .collect();
    rib.upsert_machines(&machines).unwrap();
    rib
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("fib_lookup");
    group.throughput(Throughput::Elements(1));
    for apps in [10usize, 1000, 100_000] {
        let dir = tempfile::tempdir().unwrap();
        let rib = rib(dir.path(), apps, 3);
        let fib = Fib::load(&rib).unwrap();
        let name = format!("app{}", apps / 2);
        group.bench_with_input(BenchmarkId::new("hot", apps), &name, |b, name| {
            b.iter(|| black_box(fib.lookup(black_box(name)).unwrap().candidates().len()))
        });
        // A stride coprime with the count visits every app in a scattered order.
        let names: Vec<String> = (0..apps)
            .map(|a| format!("app{}", (a * 7919) % apps))
            .collect();
        let mut next = 0;
        group.bench_function(BenchmarkId::new("scattered", apps), |b| {
            b.iter(|| {
                next = (next + 1) % names.len();
                black_box(fib.lookup(&names[next]).unwrap().candidates().len())
            })
        });
    }
    group.finish();
}

fn follow(c: &mut Criterion) {
    let mut group = c.benchmark_group("fib_apply_machine_change");
    group.throughput(Throughput::Elements(1));
    for apps in [10usize, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let rib = rib(dir.path(), apps, 3);
        let fib = Fib::load(&rib).unwrap();
        let mut version = 1;
        group.bench_function(BenchmarkId::from_parameter(apps), |b| {
            b.iter(|| {
                version += 1;
                let state = if version % 2 == 0 {
                    MachineState::Stopped
                } else {
                    MachineState::Started
                };
                rib.upsert_machine(&machine(0, 0, version, state)).unwrap();
                black_box(fib.catch_up(&rib).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookup, follow);
criterion_main!(benches);

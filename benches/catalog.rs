//! Catalog micro-benchmarks: a request-path lookup in the FIB, and the
//! follower applying one machine change from the RIB (write, feed read,
//! app rebuild, snapshot swap).
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
        updated_at: 0,
    }
}

/// A RIB of `apps` apps with `per_app` started machines each.
fn rib(dir: &std::path::Path, apps: usize, per_app: usize) -> std::sync::Arc<Rib> {
    let rib = Rib::open(&dir.join("rib.sqlite")).unwrap();
    rib.ensure_org("personal", "Personal").unwrap();
    for a in 0..apps {
        rib.create_app(&AppRow {
            name: format!("app{a}"),
            id: format!("id{a}"),
            org_slug: "personal".into(),
            network: "default".into(),
            created_at: 0,
        })
        .unwrap();
        for m in 0..per_app {
            rib.upsert_machine(&machine(a * per_app + m, a, 1, MachineState::Started))
                .unwrap();
        }
    }
    rib
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("fib_lookup");
    group.throughput(Throughput::Elements(1));
    for apps in [10usize, 1000] {
        let dir = tempfile::tempdir().unwrap();
        let rib = rib(dir.path(), apps, 3);
        let fib = Fib::load(&rib).unwrap();
        let name = format!("app{}", apps / 2);
        group.bench_with_input(BenchmarkId::from_parameter(apps), &name, |b, name| {
            b.iter(|| {
                let app = fib.lookup(black_box(name)).unwrap();
                black_box(app.machines.iter().filter(|m| m.routable()).count())
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

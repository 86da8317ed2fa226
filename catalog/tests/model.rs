//! Model-based test of the RIB and the FIBs that follow it: random
//! sequences of writes (machine rows in three regions with out-of-order
//! versions, app creates and deletes, certificates, flycast addresses), feed
//! compactions, follower catch-ups and follower restarts. After every
//! catch-up, a global FIB and a regional one must each equal a model rebuilt
//! from the RIB with plain queries (machines, the summaries view,
//! certificates, addresses), and the RIB must hold, for every machine, the
//! newest version ever written (a `BTreeMap` model).

use hangar_api::machine::MachineState;
use hangar_catalog::{AppRow, CertificateRow, Fib, FibOptions, IpRow, MachineRow, Mode, Rib};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
enum Op {
    CreateApp(u8),
    DeleteApp(u8),
    Upsert {
        app: u8,
        machine: u8,
        region: u8,
        version: u8,
        state: u8,
        cordoned: bool,
        healthy: bool,
    },
    AddIp {
        app: u8,
        ip: u8,
    },
    ReleaseIp {
        app: u8,
        ip: u8,
    },
    PutCert {
        app: u8,
        host: u8,
    },
    DeleteCert {
        app: u8,
        host: u8,
    },
    CatchUp,
    Compact(u8),
    RestartFollower,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3).prop_map(Op::CreateApp),
        (0u8..3).prop_map(Op::DeleteApp),
        (
            (0u8..3, 0u8..4, 0u8..3),
            (1u8..8, 0u8..4, any::<bool>(), any::<bool>())
        )
            .prop_map(
                |((app, machine, region), (version, state, cordoned, healthy))| Op::Upsert {
                    app,
                    machine,
                    region,
                    version,
                    state,
                    cordoned,
                    healthy,
                }
            ),
        (0u8..3, 0u8..3).prop_map(|(app, ip)| Op::AddIp { app, ip }),
        (0u8..3, 0u8..3).prop_map(|(app, ip)| Op::ReleaseIp { app, ip }),
        (0u8..3, 0u8..3).prop_map(|(app, host)| Op::PutCert { app, host }),
        (0u8..3, 0u8..3).prop_map(|(app, host)| Op::DeleteCert { app, host }),
        Just(Op::CatchUp),
        (0u8..5).prop_map(Op::Compact),
        Just(Op::RestartFollower),
    ]
}

const STATES: [MachineState; 4] = [
    MachineState::Started,
    MachineState::Stopped,
    MachineState::Suspended,
    MachineState::Destroyed,
];

const REGIONS: [&str; 3] = ["ams", "ord", "syd"];

/// One machine as the FIB keeps it: id, region, state, cordoned, healthy.
type MachineView = (String, String, MachineState, bool, bool);
/// One region summary: region, started, stopped, suspended, routable.
type SummaryView = (String, u64, u64, u64, u64);

/// An app: its machines, region summaries and non-zero counts by state.
type AppView = (Vec<MachineView>, Vec<SummaryView>, Vec<(MachineState, u32)>);

/// What a FIB says, in a comparable form.
#[derive(Debug, PartialEq)]
struct View {
    apps: BTreeMap<String, AppView>,
    hostnames: BTreeMap<String, String>,
    flycast: BTreeMap<String, String>,
}

fn view(fib: &Fib) -> View {
    let snap = fib.snapshot();
    let apps = snap
        .apps()
        .map(|app| {
            // The routable ones come first, and are exactly the candidates.
            assert!(app.candidates().iter().all(|m| m.routable()));
            assert!(
                !app.machines()[app.candidates().len()..]
                    .iter()
                    .any(|m| m.routable())
            );
            let mut machines: Vec<MachineView> = app
                .machines()
                .iter()
                .map(|m| {
                    (
                        m.id.to_string(),
                        m.region.to_string(),
                        m.state,
                        m.cordoned,
                        m.healthy,
                    )
                })
                .collect();
            machines.sort_by(|a, b| a.0.cmp(&b.0));
            let summaries = app
                .regions
                .iter()
                .map(|r| {
                    let n = u64::from;
                    (
                        r.region.to_string(),
                        n(r.started),
                        n(r.stopped),
                        n(r.suspended),
                        n(r.routable),
                    )
                })
                .collect();
            let states = MachineState::ALL
                .into_iter()
                .map(|s| (s, app.count(s)))
                .filter(|(_, n)| *n > 0)
                .collect();
            (app.name.to_string(), (machines, summaries, states))
        })
        .collect();
    let hostnames = snap
        .hostnames()
        .map(|(h, c)| (h.to_string(), c.app.clone()))
        .collect();
    let flycast = snap
        .apps()
        .flat_map(|app| {
            app.flycast
                .iter()
                .map(|ip| (ip.to_string(), app.name.to_string()))
        })
        .collect();
    View {
        apps,
        hostnames,
        flycast,
    }
}

/// The model: what a FIB in `mode` should say, from plain RIB queries.
fn model(rib: &Rib, mode: &Mode) -> View {
    let apps: BTreeMap<String, _> = rib
        .apps(None)
        .unwrap()
        .into_iter()
        .map(|app| {
            let rows: Vec<MachineRow> = rib
                .machines_of_app(&app.name)
                .unwrap()
                .into_iter()
                .filter(|m| m.state != MachineState::Destroyed)
                .collect();
            let machines = rows
                .iter()
                .filter(|m| mode.region().is_none_or(|own| own == m.region))
                .map(|m| {
                    (
                        m.id.clone(),
                        m.region.clone(),
                        m.state,
                        m.cordoned,
                        m.healthy,
                    )
                })
                .collect();
            let summaries = rib
                .region_summaries(&app.name)
                .unwrap()
                .into_iter()
                .map(|r| (r.region, r.started, r.stopped, r.suspended, r.routable))
                .collect();
            let mut states: BTreeMap<usize, (MachineState, u32)> = BTreeMap::new();
            for m in &rows {
                let i = MachineState::ALL
                    .iter()
                    .position(|s| *s == m.state)
                    .unwrap();
                states.entry(i).or_insert((m.state, 0)).1 += 1;
            }
            (
                app.name,
                (machines, summaries, states.into_values().collect()),
            )
        })
        .collect();
    let hostnames = rib
        .certificates(None)
        .unwrap()
        .into_iter()
        .map(|c| (c.hostname, c.app))
        // Rows of an app being deleted are not routed.
        .filter(|(_, app)| apps.contains_key(app))
        .collect();
    let flycast = rib
        .ips(None)
        .unwrap()
        .into_iter()
        .map(|ip| (ip.ip, ip.app))
        .filter(|(_, app)| apps.contains_key(app))
        .collect();
    View {
        apps,
        hostnames,
        flycast,
    }
}

fn regional() -> FibOptions {
    FibOptions {
        mode: Mode::Regional("ams".into()),
        ..FibOptions::default()
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
    rib.ensure_org("personal", "Personal").unwrap();
    let load = |rib: &Rib| {
        (
            Fib::load(rib).unwrap(),
            Fib::load_with(rib, regional()).unwrap(),
        )
    };
    let (mut global, mut regional) = load(&rib);
    // The model of machine rows: id → (version, state), newest version wins.
    let mut rows: BTreeMap<String, (u64, MachineState)> = BTreeMap::new();
    let mut apps: BTreeSet<String> = BTreeSet::new();

    for op in ops {
        match op {
            Op::CreateApp(a) => {
                let name = format!("app{a}");
                let created = rib
                    .create_app(&AppRow {
                        name: name.clone(),
                        id: format!("id-{a}-{}", apps.len()),
                        org_slug: "personal".into(),
                        network: "default".into(),
                        created_at: 0,
                    })
                    .is_ok();
                prop_assert_eq!(created, !apps.contains(&name));
                apps.insert(name);
            }
            Op::DeleteApp(a) => {
                let name = format!("app{a}");
                prop_assert_eq!(rib.delete_app(&name).unwrap(), apps.remove(&name));
                rib.forget_app_data(&name).unwrap();
            }
            Op::Upsert {
                app,
                machine,
                region,
                version,
                state,
                cordoned,
                healthy,
            } => {
                let id = format!("m{app}-{machine}");
                let row = MachineRow {
                    id: id.clone(),
                    app: format!("app{app}"),
                    region: REGIONS[region as usize].into(),
                    host: format!("h{region}"),
                    state: STATES[state as usize],
                    private_ip: "127.10.0.2".into(),
                    instance_id: "v".into(),
                    cordoned,
                    services: vec![],
                    healthy,
                    primary_region: None,
                    row_version: version as u64,
                    updated_at: 0,
                };
                let applied = rib.upsert_machine(&row).unwrap();
                let newer = rows.get(&id).is_none_or(|(v, _)| (version as u64) > *v);
                prop_assert_eq!(applied, newer, "upsert of {} v{}", id, version);
                if newer {
                    rows.insert(id, (version as u64, row.state));
                }
            }
            Op::PutCert { app, host } => {
                let _ = rib.put_certificate(&CertificateRow {
                    hostname: format!("h{host}.example.com"),
                    app: format!("app{app}"),
                    fullchain: "PEM".into(),
                    sealed_key: vec![0],
                    created_at: 0,
                });
            }
            Op::DeleteCert { app, host } => {
                rib.delete_certificate(&format!("app{app}"), &format!("h{host}.example.com"))
                    .unwrap();
            }
            Op::AddIp { app, ip } => {
                let _ = rib.add_ip(&IpRow {
                    ip: format!("fdaa::{}", ip + 1),
                    app: format!("app{app}"),
                    kind: "private_v6".into(),
                    network: "default".into(),
                    region: "global".into(),
                    service_name: String::new(),
                    created_at: 0,
                });
            }
            Op::ReleaseIp { app, ip } => {
                rib.release_ip(&format!("app{app}"), &format!("fdaa::{}", ip + 1))
                    .unwrap();
            }
            Op::CatchUp => {
                global.catch_up(&rib).unwrap();
                regional.catch_up(&rib).unwrap();
                prop_assert_eq!(view(&global), model(&rib, global.mode()));
                prop_assert_eq!(view(&regional), model(&rib, regional.mode()));
            }
            Op::Compact(keep) => {
                rib.compact_feed(keep as u64).unwrap();
            }
            Op::RestartFollower => {
                (global, regional) = load(&rib);
            }
        }
    }
    for fib in [&global, &regional] {
        fib.catch_up(&rib).unwrap();
        prop_assert_eq!(view(fib), model(&rib, fib.mode()));
    }
    for (id, (version, state)) in &rows {
        let row = rib.machine(id).unwrap().unwrap();
        prop_assert_eq!((row.row_version, row.state), (*version, *state), "{}", id);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_fib_follows_the_rib_through_anything(ops in prop::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}

/// A follower that falls behind a compaction reloads instead of missing
/// the changes that were deleted.
#[test]
fn a_follower_behind_a_compaction_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
    rib.ensure_org("personal", "Personal").unwrap();
    let fib = Fib::load(&rib).unwrap();
    for a in 0..5 {
        rib.create_app(&AppRow {
            name: format!("app{a}"),
            id: format!("id{a}"),
            org_slug: "personal".into(),
            network: "default".into(),
            created_at: 0,
        })
        .unwrap();
    }
    assert_eq!(rib.compact_feed(1).unwrap(), 4);
    assert_eq!(rib.compact_feed(1).unwrap(), 0, "nothing more to compact");
    fib.catch_up(&rib).unwrap();
    assert_eq!(fib.reloads(), 1);
    assert_eq!(fib.snapshot().app_count(), 5);
    assert_eq!(fib.snapshot().seq, rib.last_seq().unwrap());

    // Regression: compacting every change left an empty feed whose "last
    // sequence" read 0, below the compaction point, and followers reloaded
    // forever. The compaction point now counts as the last sequence.
    rib.compact_feed(0).unwrap();
    let behind = Fib::load(&rib).unwrap();
    assert_eq!(rib.last_seq().unwrap(), rib.compacted_through().unwrap());
    behind.catch_up(&rib).unwrap();
    assert_eq!(behind.reloads(), 0);
    rib.delete_app("app0").unwrap();
    behind.catch_up(&rib).unwrap();
    assert_eq!(
        behind.snapshot().app_count(),
        4,
        "the next change is followed"
    );
}

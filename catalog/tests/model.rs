//! Model-based test of the RIB and the FIB that follows it: random
//! sequences of writes (machine rows with out-of-order versions, app
//! creates and deletes, certificates), feed compactions, follower catch-ups
//! and follower restarts. After every catch-up the FIB must equal a FIB
//! freshly loaded from the RIB, and the RIB must hold, for every machine,
//! the newest version ever written (a `BTreeMap` model).

use hangar_api::machine::MachineState;
use hangar_catalog::{AppRow, CertificateRow, Fib, MachineRow, Rib};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
enum Op {
    CreateApp(u8),
    DeleteApp(u8),
    Upsert {
        app: u8,
        machine: u8,
        version: u8,
        state: u8,
        cordoned: bool,
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
        (0u8..3, 0u8..4, 1u8..8, 0u8..4, any::<bool>()).prop_map(
            |(app, machine, version, state, cordoned)| Op::Upsert {
                app,
                machine,
                version,
                state,
                cordoned
            }
        ),
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

/// What a FIB says, in a comparable form.
type View = (
    BTreeMap<String, Vec<(String, String, bool)>>,
    BTreeMap<String, String>,
);

fn view(fib: &Fib) -> View {
    let snap = fib.snapshot();
    let apps = snap
        .apps
        .iter()
        .map(|(name, routes)| {
            let mut machines: Vec<_> = routes
                .machines
                .iter()
                .map(|m| (m.id.clone(), m.state.to_string(), m.cordoned))
                .collect();
            machines.sort();
            (name.clone(), machines)
        })
        .collect();
    let hosts = snap
        .hostnames
        .iter()
        .map(|(h, c)| (h.clone(), c.app.clone()))
        .collect();
    (apps, hosts)
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
    rib.ensure_org("personal", "Personal").unwrap();
    let mut fib = Fib::load(&rib).unwrap();
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
                version,
                state,
                cordoned,
            } => {
                let id = format!("m{app}-{machine}");
                let row = MachineRow {
                    id: id.clone(),
                    app: format!("app{app}"),
                    region: "dev".into(),
                    host: "h1".into(),
                    state: STATES[state as usize],
                    private_ip: "127.10.0.2".into(),
                    instance_id: "v".into(),
                    cordoned,
                    services: vec![],
                    healthy: true,
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
            Op::CatchUp => {
                fib.catch_up(&rib).unwrap();
                let fresh = Fib::load(&rib).unwrap();
                prop_assert_eq!(view(&fib), view(&fresh));
            }
            Op::Compact(keep) => {
                rib.compact_feed(keep as u64).unwrap();
            }
            Op::RestartFollower => {
                fib = Fib::load(&rib).unwrap();
            }
        }
    }
    fib.catch_up(&rib).unwrap();
    prop_assert_eq!(view(&fib), view(&Fib::load(&rib).unwrap()));
    for (id, (version, state)) in &rows {
        let row = rib.machine(id).unwrap().unwrap();
        prop_assert_eq!((row.row_version, row.state), (*version, *state), "{}", id);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

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
    assert_eq!(fib.snapshot().apps.len(), 5);
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
        behind.snapshot().apps.len(),
        4,
        "the next change is followed"
    );
}

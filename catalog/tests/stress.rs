//! Concurrency stress tests (many threads, bounded in time) for the two
//! pieces every catalog reader and writer goes through: the [`Guarded`]
//! lock wrapper and the FIB's snapshot swap.

use hangar_api::machine::MachineState;
use hangar_catalog::lock::Guarded;
use hangar_catalog::{AppRow, Fib, MachineRow, Rib};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Mutual exclusion and bookkeeping under contention: a non-atomic
/// read-modify-write inside the lock never loses an update, the recorded
/// holder is always the caller itself, waits that time out are counted and
/// never run their closure, and the telemetry adds up.
#[test]
fn guarded_excludes_and_accounts_under_contention() {
    const THREADS: usize = 8;
    const ROUNDS: u64 = 5_000;
    const LABELS: [&str; THREADS] = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
    let lock = Arc::new(Guarded::new(
        "stress",
        Duration::from_millis(2),
        (0u64, 0u64),
    ));
    let timeouts = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (lock, timeouts) = (lock.clone(), timeouts.clone());
            std::thread::spawn(move || {
                let label = LABELS[t];
                let mut done = 0;
                while done < ROUNDS {
                    let ran = lock.with(label, |(counter, checksum)| {
                        assert_eq!(lock.holder().map(|(l, _)| l), Some(label));
                        // Deliberately not atomic: a second holder would
                        // interleave and lose increments.
                        let seen = *counter;
                        std::hint::spin_loop();
                        *counter = seen + 1;
                        *checksum += t as u64;
                        // Now and then hold long enough for others to time out.
                        if seen % 997 == 0 {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    });
                    match ran {
                        Ok(()) => done += 1,
                        Err(e) => {
                            assert_ne!(e.holder, label, "a thread cannot wait on itself");
                            timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no thread panicked");
    }
    let (counter, checksum) = lock.with("check", |v| *v).unwrap();
    assert_eq!(counter, THREADS as u64 * ROUNDS);
    assert_eq!(checksum, ROUNDS * (0..THREADS as u64).sum::<u64>());
    let stats = lock.stats();
    assert_eq!(stats.holder, None);
    assert_eq!(stats.last_holder, Some("check"));
    let recorded: u64 = stats.waits.values().map(|w| w.timeouts).sum();
    assert_eq!(recorded, timeouts.load(Ordering::Relaxed));
    assert_eq!(lock.timeouts(), recorded);
    for label in LABELS {
        assert_eq!(stats.waits[label].calls, ROUNDS);
    }
}

/// Readers hammering the FIB while a writer commits and the FIB catches up
/// (and sometimes reloads after a compaction): every snapshot a reader sees
/// is internally consistent and never older than one it saw before.
#[test]
fn readers_only_see_whole_snapshots_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
    rib.ensure_org("personal", "Personal").unwrap();
    rib.create_app(&AppRow {
        name: "hot".into(),
        id: "hot".into(),
        org_slug: "personal".into(),
        network: "default".into(),
        created_at: 0,
    })
    .unwrap();
    let fib = Fib::load(&rib).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (fib, stop) = (fib.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut last_seq, mut reads) = (0, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let snap = fib.snapshot();
                    assert!(snap.seq >= last_seq, "snapshots go forward");
                    last_seq = snap.seq;
                    let app = snap.app("hot").expect("the app is always there");
                    // The writer always writes all machines of a generation
                    // in one commit: a snapshot has one generation only.
                    let generations: std::collections::BTreeSet<_> =
                        app.machines().iter().map(|m| m.host.clone()).collect();
                    assert!(generations.len() <= 1, "torn snapshot: {generations:?}");
                    assert!(app.candidates().iter().all(|m| m.routable()));
                    let started = app.machines().iter().filter(|m| m.routable()).count();
                    assert_eq!(started, app.candidates().len());
                    reads += 1;
                }
                reads
            })
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(3);
    let mut generation = 0u64;
    while Instant::now() < deadline && generation < 400 {
        generation += 1;
        let rows: Vec<MachineRow> = (0..8)
            .map(|i| MachineRow {
                id: format!("m{i}"),
                app: "hot".into(),
                region: "dev".into(),
                host: format!("gen{generation}"),
                state: if (i + generation) % 3 == 0 {
                    MachineState::Stopped
                } else {
                    MachineState::Started
                },
                private_ip: "127.10.0.2".into(),
                instance_id: "v".into(),
                cordoned: false,
                services: vec![],
                healthy: true,
                primary_region: None,
                row_version: generation,
                updated_at: 0,
            })
            .collect();
        rib.upsert_machines(&rows).unwrap();
        if generation % 50 == 0 {
            // Leave the FIB behind the compacted feed: it must reload.
            rib.compact_feed(0).unwrap();
        }
        fib.catch_up(&rib).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 0);
    assert!(fib.reloads() > 0, "compaction forced reloads");
    assert_eq!(fib.seq(), rib.last_seq().unwrap());
}

//! `hangar bench catalog`: builds a RIB of the asked size on disk, loads it
//! through the real FIB and follower, and measures what the proxy depends on:
//!
//! - load time and FIB memory (jemalloc's allocated bytes before and after);
//! - lookup latency (Host → app → candidate machines, each with its load
//!   counter) with 1 and 2 threads, and with the balancer's two-choice pick
//!   (which reads two counters), timed over batches of [`BATCH`] lookups
//!   because one lookup is shorter than a clock read;
//! - lookup throughput while a writer commits `--writes-per-sec` machine
//!   updates, as a ratio to the same reader with no writer (interleaved
//!   rounds, so drift on a shared machine hits both);
//! - commit → visible latency, in-process (woken by the commit hook) and from
//!   another connection (noticed by the write-ahead log's watch).

use super::percentile;
use compact_str::CompactString;
use hangar_api::machine::{Concurrency, MachinePort, MachineService, MachineState};
use hangar_catalog::{
    AppRow, CommitHook, Fib, FibOptions, Follower, FollowerOptions, MachineRow, Mode, Rib,
    RouteMachine,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Flags of `hangar bench catalog`.
#[derive(clap::Args)]
pub struct CatalogArgs {
    #[arg(long, default_value_t = 1_000_000)]
    machines: usize,
    #[arg(long, default_value_t = 100_000)]
    apps: usize,
    #[arg(long, default_value_t = 30)]
    regions: usize,
    /// Keep detail for this region only (the regional mode); global if unset.
    #[arg(long)]
    region: Option<String>,
    /// Machine updates per second in the throughput-under-writes rounds.
    #[arg(long, default_value_t = 10_000)]
    writes_per_sec: u64,
    /// Seconds of each throughput round (two rounds with and two without).
    #[arg(long, default_value_t = 2.0)]
    round_secs: f64,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// Lookups per latency sample.
const BATCH: usize = 16;
/// Latency samples per thread.
const SAMPLES: usize = 50_000;
const REGIONS: [&str; 30] = [
    "ams", "arn", "atl", "bog", "bom", "bos", "cdg", "den", "dfw", "ewr", "eze", "fra", "gdl",
    "gig", "gru", "hkg", "iad", "jnb", "lax", "lhr", "mad", "mia", "nrt", "ord", "otp", "phx",
    "qro", "scl", "sea", "sin",
];

fn region(i: usize) -> String {
    REGIONS
        .get(i)
        .map_or_else(|| format!("r{i}"), |r| r.to_string())
}

fn app_name(i: usize) -> String {
    format!("app-{i:06}")
}

/// Machine `i`: spread over apps round-robin and over regions by turn, 70%
/// started, 20% stopped, 10% suspended, all with the same web service.
fn machine(args: &CatalogArgs, i: usize, version: u64, state: MachineState) -> MachineRow {
    let region = region((i / args.apps) % args.regions);
    MachineRow {
        id: format!("m{i:08x}"),
        app: app_name(i % args.apps),
        host: format!("{region}-host-{}", i % 4),
        region,
        state,
        private_ip: format!("127.10.{}.{}", (i >> 8) & 0xff, i & 0xff),
        instance_id: format!("v{version}"),
        cordoned: false,
        services: vec![MachineService {
            protocol: "tcp".into(),
            internal_port: 8080,
            ports: [
                (80, vec!["http".into()]),
                (443, vec!["tls".into(), "http".into()]),
            ]
            .into_iter()
            .map(|(port, handlers)| MachinePort {
                port: Some(port),
                handlers,
                ..MachinePort::default()
            })
            .collect(),
            concurrency: Some(Concurrency {
                kind: Some("requests".into()),
                soft_limit: Some(20),
                hard_limit: Some(25),
            }),
            ..MachineService::default()
        }],
        healthy: true,
        primary_region: None,
        row_version: version,
        updated_at: 0,
    }
}

fn initial_state(i: usize) -> MachineState {
    match i % 10 {
        0..=6 => MachineState::Started,
        7 | 8 => MachineState::Stopped,
        _ => MachineState::Suspended,
    }
}

fn build_rib(args: &CatalogArgs, rib: &Rib) -> anyhow::Result<()> {
    rib.ensure_org("bench", "Bench")?;
    const CHUNK: usize = 20_000;
    for start in (0..args.apps).step_by(CHUNK) {
        let apps: Vec<AppRow> = (start..(start + CHUNK).min(args.apps))
            .map(|i| AppRow {
                name: app_name(i),
                id: format!("id{i}"),
                org_slug: "bench".into(),
                network: "default".into(),
                created_at: 0,
            })
            .collect();
        rib.create_apps(&apps)?;
    }
    for start in (0..args.machines).step_by(CHUNK) {
        let rows: Vec<MachineRow> = (start..(start + CHUNK).min(args.machines))
            .map(|i| machine(args, i, 1, initial_state(i)))
            .collect();
        rib.upsert_machines(&rows)?;
    }
    Ok(())
}

fn allocated() -> anyhow::Result<u64> {
    tikv_jemalloc_ctl::epoch::advance().map_err(|e| anyhow::anyhow!("jemalloc epoch: {e}"))?;
    let bytes = tikv_jemalloc_ctl::stats::allocated::read()
        .map_err(|e| anyhow::anyhow!("jemalloc stats: {e}"))?;
    Ok(bytes as u64)
}

/// A small, fast generator for the readers (xorshift64*), so the bench
/// measures lookups rather than a cryptographic RNG.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

/// One lookup as the request path does it: the app by name (Host, SNI) and
/// its candidate machines, each with its in-flight counter. Returns
/// something derived from the answer so the work cannot be optimized away.
fn lookup(fib: &Fib, name: &str, _: &mut Rng) -> usize {
    fib.lookup(name).map_or(0, |app| app.candidates().len())
}

/// A lookup plus the balancer's choice: the lighter of two random
/// candidates by in-flight count (two more memory reads).
fn route(fib: &Fib, name: &str, rng: &mut Rng) -> usize {
    let Some(app) = fib.lookup(name) else {
        return 0;
    };
    let candidates = app.candidates();
    if candidates.is_empty() {
        return app.regions.len();
    }
    let load = |m: &RouteMachine| m.load.get();
    let (a, b) = (
        &candidates[rng.below(candidates.len())],
        &candidates[rng.below(candidates.len())],
    );
    load(if load(b) < load(a) { b } else { a })
}

type Probe = fn(&Fib, &str, &mut Rng) -> usize;

/// Per-lookup latency samples (ns) of `threads` threads at once.
fn latency(fib: &Arc<Fib>, names: &Arc<Vec<String>>, threads: usize, probe: Probe) -> Vec<f64> {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (fib, names) = (fib.clone(), names.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                let mut sink = 0usize;
                let mut samples = Vec::with_capacity(SAMPLES);
                for _ in 0..SAMPLES {
                    // The names are copied out first: a request's Host is
                    // in a buffer the proxy just read, so it is in cache.
                    let picks: [CompactString; BATCH] =
                        std::array::from_fn(|_| names[rng.below(names.len())].as_str().into());
                    let started = Instant::now();
                    for name in &picks {
                        sink = sink.wrapping_add(probe(&fib, name, &mut rng));
                    }
                    samples.push(started.elapsed().as_nanos() as f64 / BATCH as f64);
                }
                std::hint::black_box(sink);
                samples
            })
        })
        .collect();
    let mut all: Vec<f64> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("latency thread"))
        .collect();
    all.sort_by(f64::total_cmp);
    all
}

/// The reference for lookup latency: one dependent random read from a
/// buffer of `bytes`, as a pointer chase through cache lines in random order
/// (ns per read). A lookup is two or three such reads at least (the table's
/// control bytes, the app), so this is its floor on this machine.
fn memory_read_ns(bytes: usize) -> f64 {
    const LINE: usize = 64 / size_of::<usize>();
    let lines = (bytes / 64).max(2);
    let mut order: Vec<usize> = (0..lines).collect();
    let mut rng = Rng(0x5eed_5eed_5eed_5eed);
    for i in (1..lines).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut next = vec![0usize; lines * LINE];
    for w in 0..lines {
        next[order[w] * LINE] = order[(w + 1) % lines] * LINE;
    }
    let hops = 2_000_000;
    let mut at = 0;
    let started = Instant::now();
    for _ in 0..hops {
        at = next[at];
    }
    std::hint::black_box(at);
    started.elapsed().as_nanos() as f64 / hops as f64
}

/// Lookups per second of one reader during `secs`.
fn throughput(fib: &Fib, names: &[String], secs: f64) -> f64 {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut sink = 0usize;
    let mut done = 0u64;
    let started = Instant::now();
    let until = Duration::from_secs_f64(secs);
    while started.elapsed() < until {
        for _ in 0..1024 {
            let i = rng.below(names.len());
            sink = sink.wrapping_add(lookup(fib, &names[i], &mut rng));
        }
        done += 1024;
    }
    std::hint::black_box(sink);
    done as f64 / started.elapsed().as_secs_f64()
}

/// Commits `per_sec` machine updates per second (in 10 ms batches) until
/// `stop`; returns updates committed. Each flips a random machine between
/// started and stopped with its next version.
fn write_load(
    args: &CatalogArgs,
    rib: &Rib,
    versions: &mut [u64],
    per_sec: u64,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let tick = Duration::from_millis(10);
    let per_tick = (per_sec / 100).max(1) as usize;
    let mut next = Instant::now();
    let mut written = 0;
    while !stop.load(Ordering::Relaxed) {
        let rows: Vec<MachineRow> = (0..per_tick)
            .map(|_| {
                let i = rng.below(versions.len());
                versions[i] += 1;
                let state = if versions[i] % 2 == 0 {
                    MachineState::Stopped
                } else {
                    MachineState::Started
                };
                machine(args, i, versions[i], state)
            })
            .collect();
        written += rib.upsert_machines(&rows)? as u64;
        next += tick;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(written)
}

/// Commit → visible latencies (µs) of `count` single-row commits through
/// `writer`, spaced a millisecond apart.
fn propagation(
    args: &CatalogArgs,
    fib: &Fib,
    writer: &Rib,
    newest: &AtomicU64,
    versions: &mut [u64],
    count: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let i = rng.below(versions.len());
        versions[i] += 1;
        let row = machine(args, i, versions[i], initial_state(i));
        let started = Instant::now();
        writer.upsert_machine(&row)?;
        let seq = newest.load(Ordering::Acquire);
        let deadline = started + Duration::from_secs(5);
        while fib.seq() < seq {
            anyhow::ensure!(
                Instant::now() < deadline,
                "change {seq} not visible after 5 s"
            );
            std::hint::spin_loop();
        }
        samples.push(started.elapsed().as_nanos() as f64 / 1000.0);
        std::thread::sleep(Duration::from_millis(1));
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

pub fn catalog(args: CatalogArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.apps > 0 && args.machines > 0 && args.regions > 0,
        "sizes must be positive"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("rib.sqlite");
    let rib = Rib::open(&path)?;
    eprintln!(
        "building a RIB of {} machines in {} apps over {} regions...",
        args.machines, args.apps, args.regions
    );
    let started = Instant::now();
    build_rib(&args, &rib)?;
    let build_s = started.elapsed().as_secs_f64();

    let mode = match &args.region {
        Some(r) => Mode::Regional(r.as_str().into()),
        None => Mode::Global,
    };
    eprintln!("loading the FIB...");
    let before = allocated()?;
    let started = Instant::now();
    let fib = Fib::load_with(
        &rib,
        FibOptions {
            mode,
            ..FibOptions::default()
        },
    )?;
    let load_s = started.elapsed().as_secs_f64();
    let fib_bytes = allocated()?.saturating_sub(before);
    let in_detail = fib.snapshot().machine_count();

    let follower = Follower::spawn(fib.clone(), rib.clone(), FollowerOptions::default())?;
    let names: Arc<Vec<String>> = Arc::new((0..args.apps).map(app_name).collect());

    eprintln!("measuring lookup latency...");
    let memory_read = memory_read_ns(fib_bytes as usize);
    let one = latency(&fib, &names, 1, lookup);
    let two = latency(&fib, &names, 2, lookup);
    let routed = latency(&fib, &names, 1, route);

    eprintln!("measuring lookup throughput with and without writes...");
    let mut versions = vec![1u64; args.machines];
    let (mut idle, mut busy, mut written, mut writing_s) = (0.0, 0.0, 0, 0.0);
    let (applied_before, busy_before) = {
        let stats = fib.stats();
        (stats.applied, stats.busy_us)
    };
    for _ in 0..2 {
        idle += throughput(&fib, &names, args.round_secs);
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let (rate, n) = std::thread::scope(|s| {
            let writer =
                s.spawn(|| write_load(&args, &rib, &mut versions, args.writes_per_sec, &stop));
            let rate = throughput(&fib, &names, args.round_secs);
            stop.store(true, Ordering::Relaxed);
            (rate, writer.join().expect("writer thread"))
        });
        writing_s += started.elapsed().as_secs_f64();
        written += n?;
        busy += rate;
    }
    let (idle, busy) = (idle / 2.0, busy / 2.0);
    // What applying the writes cost the follower: its share of one core
    // while writing, and per change.
    let (apply_us_per_change, follower_core_share) = {
        let stats = fib.stats();
        let busy_us = (stats.busy_us - busy_before) as f64;
        let applied = (stats.applied - applied_before).max(1) as f64;
        (busy_us / applied, busy_us / 1e6 / writing_s)
    };

    eprintln!("measuring commit -> visible...");
    let newest = Arc::new(AtomicU64::new(0));
    let hook = |newest: &Arc<AtomicU64>| {
        let newest = newest.clone();
        let hook: CommitHook = Arc::new(move |seq: u64| {
            newest.fetch_max(seq, Ordering::AcqRel);
        });
        hook
    };
    rib.on_commit(hook(&newest));
    let local = propagation(&args, &fib, &rib, &newest, &mut versions, 1000)?;
    // Another connection, as another process: only the log's watch
    // notices it.
    let other = Rib::open(&path)?;
    other.on_commit(hook(&newest));
    let remote = propagation(&args, &fib, &other, &newest, &mut versions, 1000)?;
    let stats = fib.stats();
    drop(follower);

    let out = json!({
        "bench": "catalog",
        "machines": args.machines,
        "apps": args.apps,
        "regions": args.regions,
        "mode": stats.mode,
        "machines_in_detail": in_detail,
        "rib_build_s": build_s,
        "load_s": load_s,
        "fib_bytes": fib_bytes,
        "fib_bytes_per_machine": fib_bytes as f64 / args.machines as f64,
        "lookup_ns_1_thread": { "p50": percentile(&one, 0.5), "p99": percentile(&one, 0.99) },
        "lookup_ns_2_threads": { "p50": percentile(&two, 0.5), "p99": percentile(&two, 0.99) },
        "memory_read_ns": memory_read,
        "lookup_and_choice_ns": { "p50": percentile(&routed, 0.5), "p99": percentile(&routed, 0.99) },
        "lookups_per_sec_idle": idle,
        "lookups_per_sec_writing": busy,
        "throughput_under_writes": busy / idle,
        "writes_per_sec": written as f64 / writing_s,
        "apply_us_per_change": apply_us_per_change,
        "follower_core_share": follower_core_share,
        "propagation_us": { "p50": percentile(&local, 0.5), "p99": percentile(&local, 0.99) },
        "propagation_other_connection_us": { "p50": percentile(&remote, 0.5), "p99": percentile(&remote, 0.99) },
        "fib_batches": stats.batches,
        "fib_max_batch_us": stats.max_batch_us,
    });
    println!(
        "catalog: {} machines in {} apps over {} regions ({} mode, {} in detail)",
        args.machines, args.apps, args.regions, stats.mode, in_detail
    );
    println!("{:<40} {:>14} {:>14}", "measure", "result", "target");
    let rows = [
        ("RIB build (s)", format!("{build_s:.2}"), ""),
        ("FIB load (s)", format!("{load_s:.2}"), "<= 5"),
        (
            "FIB bytes per machine",
            format!("{:.0}", fib_bytes as f64 / args.machines as f64),
            "<= 400",
        ),
        (
            "lookup p50 / p99, 1 thread (ns)",
            format!(
                "{:.0} / {:.0}",
                percentile(&one, 0.5),
                percentile(&one, 0.99)
            ),
            "p50 <= 150",
        ),
        (
            "lookup p50 / p99, 2 threads (ns)",
            format!(
                "{:.0} / {:.0}",
                percentile(&two, 0.5),
                percentile(&two, 0.99)
            ),
            "p50 <= 150",
        ),
        (
            "  reference: one random memory read (ns)",
            format!("{memory_read:.0}"),
            "",
        ),
        (
            "  + two-choice pick, 1 thread (ns)",
            format!(
                "{:.0} / {:.0}",
                percentile(&routed, 0.5),
                percentile(&routed, 0.99)
            ),
            "",
        ),
        ("lookups/s idle (1 thread)", format!("{idle:.0}"), ""),
        ("lookups/s under writes", format!("{busy:.0}"), ""),
        ("  ratio", format!("{:.3}", busy / idle), ">= 0.9"),
        (
            "  writes/s achieved",
            format!("{:.0}", written as f64 / writing_s),
            "",
        ),
        (
            "  follower: us per change / core share",
            format!("{apply_us_per_change:.1} / {follower_core_share:.2}"),
            "",
        ),
        (
            "commit -> visible p50 / p99 (us)",
            format!(
                "{:.0} / {:.0}",
                percentile(&local, 0.5),
                percentile(&local, 0.99)
            ),
            "p99 <= 10000",
        ),
        (
            "  from another connection (us)",
            format!(
                "{:.0} / {:.0}",
                percentile(&remote, 0.5),
                percentile(&remote, 0.99)
            ),
            "",
        ),
    ];
    for (name, value, target) in rows {
        println!("{name:<40} {value:>14} {target:>14}");
    }
    if args.json {
        println!("{out}");
    }
    Ok(())
}

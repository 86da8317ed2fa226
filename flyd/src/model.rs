//! The engine's model test: flyd over a fake runtime and a store that
//! crashes on cue, in process (the real-binary crash tests in
//! `tests/crash.rs` kill a real flyd at named steps; these go through every
//! store write of every operation, and fail every runtime call once).
//!
//! After each crash a new flyd opens what the store had made durable, with
//! the same runtime (workloads outlive flyd, as pilots do), and recovers.
//! Then the model must hold: no run is left unfinished; the machine is in
//! the state the operation leads to when its run was recorded, else in the
//! state it had; the runtime agrees with the record (a started machine runs,
//! a suspended one is frozen, a stopped one runs nothing, a destroyed one
//! left nothing); and a started machine is watched (its exit is recorded).

use crate::config::FlydConfig;
use crate::flyd::{Flyd, FlydError};
use crate::fsm::FsmRun;
use crate::pilot::{ExecCall, ExitInfo};
use crate::record::MachineRecord;
use crate::runtime::{Launch, RunFuture, Runtime, RuntimeError};
use crate::store::{FsmStore, StoreError};
use hangar_api::host::HostCreateRequest;
use hangar_api::machine::{
    CreateMachineRequest, ExecResponse, MachineConfig, MachineRestart, MachineState, ProcessStat,
    StopRequest, UpdateMachineRequest,
};
use hangar_catalog::{Rib, SecretBox};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// How long the model waits for flyd to settle after a recovery.
const SETTLE: Duration = Duration::from_secs(10);

// ---- the fake runtime ----

/// One machine's workload as the fake runtime keeps it.
#[derive(Debug, Clone, Copy)]
struct Workload {
    running: bool,
    frozen: bool,
    exit: Option<ExitInfo>,
}

/// Workloads that run instantly and die on any signal but SIGSTOP and
/// SIGCONT; a call named by [`Fake::fail_next`] fails once.
#[derive(Default)]
struct Fake {
    workloads: Mutex<HashMap<String, Workload>>,
    runs: AtomicU32,
    fail: Mutex<Option<&'static str>>,
    /// Bumped at every change, for `wait_exit`.
    changed: watch::Sender<u64>,
}

impl Fake {
    fn fail_next(&self, call: &'static str) {
        *self.fail.lock() = Some(call);
    }

    fn check(&self, call: &'static str) -> Result<(), RuntimeError> {
        let mut fail = self.fail.lock();
        if *fail == Some(call) {
            *fail = None;
            return Err(RuntimeError::Failed(format!("fake: {call} failed on cue")));
        }
        Ok(())
    }

    fn workload(&self, id: &str) -> Option<Workload> {
        self.workloads.lock().get(id).copied()
    }

    fn change(&self, id: &str, f: impl FnOnce(&mut Workload)) -> bool {
        let done = self.workloads.lock().get_mut(id).map(f).is_some();
        self.changed.send_modify(|n| *n += 1);
        done
    }

    /// The workload ends on its own with `code`.
    fn exit(&self, id: &str, code: i32) {
        self.change(id, |w| {
            w.running = false;
            w.frozen = false;
            w.exit = Some(ExitInfo {
                exit_code: Some(code),
                signal: None,
            });
        });
    }
}

impl Runtime for Fake {
    fn spawn<'a>(
        &'a self,
        id: &'a str,
        _launch: &'a Launch,
    ) -> RunFuture<'a, Result<u32, RuntimeError>> {
        Box::pin(async move {
            self.check("spawn")?;
            let run = self.runs.fetch_add(1, Ordering::Relaxed) + 1;
            let workload = Workload {
                running: true,
                frozen: false,
                exit: None,
            };
            self.workloads.lock().insert(id.to_string(), workload);
            self.changed.send_modify(|n| *n += 1);
            Ok(run)
        })
    }

    fn alive<'a>(&'a self, id: &'a str) -> RunFuture<'a, bool> {
        Box::pin(async move { self.workload(id).is_some_and(|w| w.running) })
    }

    fn signal<'a>(&'a self, id: &'a str, signal: i32) -> RunFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.check("signal")?;
            if !self.workload(id).is_some_and(|w| w.running) {
                return Err(RuntimeError::Failed(format!("{id}: not running")));
            }
            self.change(id, |w| match signal {
                18 => w.frozen = false,
                19 => w.frozen = true,
                _ => {
                    w.running = false;
                    w.frozen = false;
                    w.exit = Some(ExitInfo {
                        exit_code: None,
                        signal: Some(signal),
                    });
                }
            });
            Ok(())
        })
    }

    fn freeze<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.check("freeze")?;
            self.signal(id, 19).await
        })
    }

    fn thaw<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        self.signal(id, 18)
    }

    fn exited<'a>(&'a self, id: &'a str) -> RunFuture<'a, Option<ExitInfo>> {
        Box::pin(async move { self.workload(id).filter(|w| !w.running)?.exit })
    }

    fn wait_exit<'a>(&'a self, id: &'a str) -> RunFuture<'a, ExitInfo> {
        Box::pin(async move {
            let mut changed = self.changed.subscribe();
            loop {
                match self.workload(id) {
                    Some(w) if w.running => {}
                    w => {
                        return w.and_then(|w| w.exit).unwrap_or(ExitInfo {
                            exit_code: None,
                            signal: None,
                        });
                    }
                }
                if changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
    }

    fn accepts<'a>(&'a self, id: &'a str, _addr: SocketAddr) -> RunFuture<'a, bool> {
        Box::pin(async move { self.workload(id).is_some_and(|w| w.running && !w.frozen) })
    }

    fn remove<'a>(&'a self, id: &'a str) -> RunFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.check("remove")?;
            if self.workload(id).is_some_and(|w| w.running) {
                return Err(RuntimeError::Failed(format!("{id}: still running")));
            }
            self.workloads.lock().remove(id);
            Ok(())
        })
    }

    fn exec<'a>(
        &'a self,
        _id: &'a str,
        _call: &'a ExecCall,
    ) -> RunFuture<'a, Result<ExecResponse, RuntimeError>> {
        Box::pin(async { Err(RuntimeError::Failed("fake: no exec".into())) })
    }

    fn ps<'a>(&'a self, _id: &'a str) -> RunFuture<'a, Result<Vec<ProcessStat>, RuntimeError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn machines(&self) -> Vec<String> {
        self.workloads.lock().keys().cloned().collect()
    }
}

// ---- the store that crashes ----

#[derive(Default)]
struct Tables {
    machines: BTreeMap<String, MachineRecord>,
    runs: BTreeMap<String, FsmRun>,
}

/// A store in memory whose handle "crashes" at a chosen write: that write
/// and every call after it fail, and what the writes before it made stays
/// for the next handle ([`Mem::reopen`]).
#[derive(Default)]
struct Mem {
    tables: Arc<Mutex<Tables>>,
    /// Writes left before the crash; `None`: no crash coming.
    left: Mutex<Option<usize>>,
    crashed: AtomicBool,
}

impl Mem {
    fn crash_after(&self, writes: usize) {
        *self.left.lock() = Some(writes);
    }

    fn crashed(&self) -> bool {
        self.crashed.load(Ordering::Relaxed)
    }

    /// A new handle on what is durable; this one stays crashed.
    fn reopen(&self) -> Mem {
        self.crashed.store(true, Ordering::Relaxed);
        Mem {
            tables: self.tables.clone(),
            ..Mem::default()
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Tables) -> T) -> Result<T, StoreError> {
        if self.crashed() {
            return Err(StoreError::Unavailable("crashed".into()));
        }
        Ok(f(&self.tables.lock()))
    }

    fn write(&self, f: impl FnOnce(&mut Tables)) -> Result<(), StoreError> {
        let mut left = self.left.lock();
        if self.crashed() || *left == Some(0) {
            self.crashed.store(true, Ordering::Relaxed);
            return Err(StoreError::Unavailable("crashed".into()));
        }
        if let Some(n) = left.as_mut() {
            *n -= 1;
        }
        f(&mut self.tables.lock());
        Ok(())
    }
}

impl FsmStore for Mem {
    fn put_machine(&self, m: &MachineRecord) -> Result<(), StoreError> {
        self.write(|t| {
            t.machines.insert(m.id.clone(), m.clone());
        })
    }

    fn machine(&self, id: &str) -> Result<Option<MachineRecord>, StoreError> {
        self.read(|t| t.machines.get(id).cloned())
    }

    fn machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.read(|t| t.machines.values().cloned().collect())
    }

    fn delete_machines(&self, ids: &[String]) -> Result<(), StoreError> {
        self.write(|t| ids.iter().for_each(|id| drop(t.machines.remove(id))))
    }

    fn put_run(&self, run: &FsmRun) -> Result<(), StoreError> {
        self.write(|t| {
            t.runs.insert(run.id.clone(), run.clone());
        })
    }

    fn runs(&self) -> Result<Vec<FsmRun>, StoreError> {
        self.read(|t| t.runs.values().cloned().collect())
    }

    fn delete_runs(&self, ids: &[String]) -> Result<(), StoreError> {
        self.write(|t| ids.iter().for_each(|id| drop(t.runs.remove(id))))
    }
}

// ---- the model ----

/// One host: a flyd over the store and the fake runtime, with the RIB and
/// secrets key of a temp dir.
struct Host {
    dir: tempfile::TempDir,
    fake: Arc<Fake>,
    store: Arc<Mem>,
    flyd: Arc<Flyd>,
}

fn config() -> FlydConfig {
    FlydConfig {
        // Stops that time out do so quickly (the fake dies on its signal
        // unless that signal failed on cue).
        stop_timeout_ms: 50,
        ..FlydConfig::default()
    }
}

/// One image store for every host of the model: images are not what it
/// tests, and assembling `hangar/echo` for each of its hundreds of hosts
/// would be most of its time.
fn images() -> Arc<crate::images::Images> {
    static IMAGES: std::sync::OnceLock<(tempfile::TempDir, Arc<crate::images::Images>)> =
        std::sync::OnceLock::new();
    let (_, images) = IMAGES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let images = crate::images::Images::open(dir.path(), &config().images).unwrap();
        (dir, Arc::new(images))
    });
    images.clone()
}

async fn open(dir: &std::path::Path, fake: Arc<Fake>, store: Arc<Mem>) -> Arc<Flyd> {
    let rib = Rib::open(&dir.join("rib.sqlite")).unwrap();
    let secrets = Arc::new(SecretBox::load_or_create(&dir.join("secrets.key")).unwrap());
    Flyd::open_with(config(), (store, fake, images()), rib, secrets)
        .await
        .unwrap()
}

impl Host {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (fake, store) = (Arc::new(Fake::default()), Arc::new(Mem::default()));
        let flyd = open(dir.path(), fake.clone(), store.clone()).await;
        Self {
            dir,
            fake,
            store,
            flyd,
        }
    }

    /// A flyd killed where its store crashed, and a new one over what
    /// it had made durable.
    async fn restart(&mut self) {
        self.store = Arc::new(self.store.reopen());
        self.flyd = open(self.dir.path(), self.fake.clone(), self.store.clone()).await;
    }

    async fn create(&self) -> Result<String, FlydError> {
        let config = MachineConfig {
            image: hangar_api::machine::ECHO_IMAGE.into(),
            // Exits are recorded, not restarted, so the model can see them.
            restart: Some(MachineRestart {
                policy: Some("no".into()),
                max_retries: None,
            }),
            ..MachineConfig::default()
        };
        let req = HostCreateRequest {
            app: "model".into(),
            machine: CreateMachineRequest {
                config,
                ..CreateMachineRequest::default()
            },
        };
        Ok(self.flyd.create(req).await?.id)
    }

    fn state(&self, id: &str) -> Option<MachineState> {
        self.store.machine(id).unwrap().map(|m| m.state)
    }

    /// Waits until no run is unfinished and the runtime agrees with the
    /// record; panics with what differs past [`SETTLE`].
    async fn settled(&self, id: &str, case: &str) {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let problem = self.problem(id);
            let Some(problem) = problem else { return };
            if tokio::time::Instant::now() >= deadline {
                panic!("{case}: {problem}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// What breaks the model, if anything.
    fn problem(&self, id: &str) -> Option<String> {
        let unfinished = self.store.unfinished_runs().unwrap();
        if !unfinished.is_empty() {
            return Some(format!("runs left unfinished: {unfinished:?}"));
        }
        let workload = self.fake.workload(id);
        let (running, frozen) = workload.map_or((false, false), |w| (w.running, w.frozen));
        let agrees = match self.state(id) {
            Some(MachineState::Started) => running && !frozen,
            Some(MachineState::Suspended) => running && frozen,
            Some(MachineState::Stopped | MachineState::Created) => !running,
            None | Some(MachineState::Destroyed) => workload.is_none(),
            Some(_) => false,
        };
        (!agrees).then(|| {
            format!(
                "machine is {:?} but its workload is {workload:?}",
                self.state(id)
            )
        })
    }

    /// A started machine is watched: its workload's own exit is recorded.
    async fn watched(&self, id: &str, case: &str) {
        if self.state(id) != Some(MachineState::Started) {
            return;
        }
        self.fake.exit(id, 0);
        let deadline = tokio::time::Instant::now() + SETTLE;
        while self.state(id) != Some(MachineState::Stopped) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{case}: the workload's exit was not recorded"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// The operations the model runs: the state each starts from and the one
/// it leads to.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    Start,
    Resume,
    Stop,
    Suspend,
    Restart,
    Update,
    Destroy,
    Cordon,
}

impl Op {
    const ALL: [Op; 9] = [
        Op::Create,
        Op::Start,
        Op::Resume,
        Op::Stop,
        Op::Suspend,
        Op::Restart,
        Op::Update,
        Op::Destroy,
        Op::Cordon,
    ];

    fn leads_to(self) -> MachineState {
        match self {
            Op::Stop => MachineState::Stopped,
            Op::Suspend => MachineState::Suspended,
            Op::Destroy => MachineState::Destroyed,
            _ => MachineState::Started,
        }
    }

    /// Brings a new machine of `host` to where the operation starts.
    async fn prepare(self, host: &Host) -> Option<String> {
        if let Op::Create = self {
            return None;
        }
        let id = host.create().await.unwrap();
        let flyd = &host.flyd;
        match self {
            Op::Start | Op::Destroy => flyd.stop(&id, StopRequest::default(), None).await.unwrap(),
            Op::Resume => flyd.suspend(&id, None).await.unwrap(),
            _ => {}
        }
        Some(id)
    }

    /// Runs the operation on `id` (a new machine for create).
    async fn run(self, host: &Host, id: Option<&str>) -> Result<String, FlydError> {
        let flyd = &host.flyd;
        let Some(id) = id else {
            return host.create().await;
        };
        match self {
            Op::Create => unreachable!("create has no machine yet"),
            Op::Start | Op::Resume => flyd.start(id, None).await.map(drop),
            Op::Stop => flyd.stop(id, StopRequest::default(), None).await,
            Op::Suspend => flyd.suspend(id, None).await,
            Op::Restart => flyd.restart(id, StopRequest::default(), None).await,
            Op::Update => {
                let req = UpdateMachineRequest {
                    config: flyd.get(id)?.config,
                    ..UpdateMachineRequest::default()
                };
                flyd.update(id, req, None).await.map(drop)
            }
            Op::Destroy => flyd.destroy(id, false, None).await,
            Op::Cordon => flyd.cordon(id, true, None).await,
        }
        .map(|()| id.to_string())
    }
}

/// The machine ids in the store, for a create that crashed before it could
/// answer with one.
fn only_machine(host: &Host) -> Option<String> {
    let ids: Vec<String> = host
        .store
        .machines()
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert!(ids.len() <= 1, "one create made {ids:?}");
    ids.into_iter().next()
}

/// A crash at every store write of every operation, then a recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_survives_a_crash_at_every_write() {
    for op in Op::ALL {
        for writes in 0.. {
            let case = format!("{op:?}, crash at write {writes}");
            let mut host = Host::new().await;
            let id = op.prepare(&host).await;
            let before = id.as_deref().and_then(|id| host.state(id));
            let runs_before = host.store.runs().unwrap().len();
            host.store.crash_after(writes);
            let result = op.run(&host, id.as_deref()).await;
            if !host.store.crashed() {
                // The operation needs fewer writes: every point was tried.
                result.unwrap_or_else(|e| panic!("{case}: {e}"));
                assert!(writes > 0, "{op:?} wrote nothing");
                break;
            }
            host.restart().await;
            // Its run reached the store: the recovery finishes it.
            let recorded = host.store.runs().unwrap();
            let ran = recorded.len() > runs_before;
            let Some(id) = id.or_else(|| only_machine(&host)) else {
                assert!(!ran, "{case}: a create run without its machine");
                assert!(host.fake.machines().is_empty(), "{case}: a workload leaked");
                continue;
            };
            host.settled(&id, &case).await;
            let want = if ran { Some(op.leads_to()) } else { before };
            assert_eq!(host.state(&id), want, "{case}");
            host.watched(&id, &case).await;
        }
    }
}

/// Every runtime call an operation makes fails once: the operation fails,
/// and leaves the machine consistent and usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_runtime_leaves_every_machine_consistent_and_usable() {
    for op in Op::ALL {
        for call in ["spawn", "signal", "freeze", "remove"] {
            let case = format!("{op:?} with {call} failing");
            let host = Host::new().await;
            let id = op.prepare(&host).await;
            host.fake.fail_next(call);
            let result = op.run(&host, id.as_deref()).await;
            let failed_on_cue = host.fake.fail.lock().is_none();
            let Some(id) = id.or_else(|| only_machine(&host)) else {
                panic!("{case}: no machine");
            };
            host.settled(&id, &case).await;
            if failed_on_cue && result.is_ok() {
                // Only a stop signal may fail unheard: the stop kills.
                assert_eq!(call, "signal", "{case}: the failure was lost");
            }
            // Still usable: it can be started (unless destroyed) and
            // destroyed.
            *host.fake.fail.lock() = None;
            match host.state(&id) {
                Some(MachineState::Destroyed) => continue,
                Some(MachineState::Stopped | MachineState::Created) => {
                    host.flyd
                        .start(&id, None)
                        .await
                        .unwrap_or_else(|e| panic!("{case}: start after: {e}"));
                }
                _ => {}
            }
            host.settled(&id, &case).await;
            host.flyd
                .destroy(&id, true, None)
                .await
                .unwrap_or_else(|e| panic!("{case}: destroy after: {e}"));
            host.settled(&id, &case).await;
        }
    }
}

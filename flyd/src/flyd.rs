//! The orchestrator: operations on machines, each run as a durable FSM.
//!
//! Every public operation checks its preconditions under the machine's
//! operation lock (one operation per machine at a time, later ones queue for
//! at most `op_wait_ms`), then runs its FSM ([`crate::fsm`]) step by step,
//! recording the run in redb before and after each step. State changes are
//! saved to redb first (flyd is the source of truth) and then published to
//! the RIB with an increasing row version.

use crate::capacity::{Capacity, Guest};
use crate::cgroup::Cgroups;
use crate::config::FlydConfig;
use crate::fsm::{FsmRun, RunStatus, Step};
use crate::images::{ImageError, Images};
use crate::record::MachineRecord;
use crate::runtime::sandbox::Sandboxes;
use crate::runtime::{self, NoSandboxes, Runtime, RuntimeError, process::Processes};
use crate::steps::stop_input;
use crate::store::{FsmStore, Store, StoreError};
use hangar_api::AddrBlock;
use hangar_api::machine::{HOST_IMAGE, MachineConfig, MachineState, StopRequest};
use hangar_api::time::now_ms;
use hangar_catalog::lock::Guarded;
use hangar_catalog::{HostRow, Rib, RibError, SecretBox};
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{OwnedMutexGuard, watch};

/// Why an operation failed. Each maps to the status Fly answers with.
#[derive(Debug, thiserror::Error)]
pub enum FlydError {
    #[error("machine {0} not found")]
    NotFound(String),
    /// Something other than the machine is missing (a lease, a key).
    #[error("{0}")]
    NoSuch(String),
    #[error("{0}")]
    BadRequest(String),
    /// The machine is not in a state the operation accepts (412).
    #[error("{0}")]
    Precondition(String),
    /// Another operation on the machine did not finish in time (409).
    #[error("machine {0} is busy with another operation; try again")]
    Busy(String),
    /// A lease held by someone else, or a stale `current_version` (409).
    #[error("{0}")]
    Conflict(String),
    /// An exec that ran out of time (408).
    #[error("{0}")]
    Timeout(String),
    /// The machine does not fit on this host (503 `insufficient_capacity`).
    #[error("insufficient capacity: {0}")]
    Capacity(String),
    /// `wait` did not see the state in time (408).
    #[error("machine {id} did not reach {states} within {timeout:?} (it is {state})")]
    WaitTimeout {
        id: String,
        states: String,
        timeout: Duration,
        state: MachineState,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Rib(#[from] RibError),
    #[error("machine {id}: {reason}")]
    Runtime { id: String, reason: String },
    #[error("{0}")]
    Image(#[from] ImageError),
}

impl FlydError {
    /// A runtime failure, as an operation's error on machine `id`.
    pub(crate) fn runtime(id: &str, e: RuntimeError) -> Self {
        match e {
            RuntimeError::Timeout(reason) => Self::Timeout(reason),
            RuntimeError::Failed(reason) => Self::Runtime {
                id: id.to_string(),
                reason,
            },
        }
    }

    /// The HTTP status Fly's API uses for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) | Self::NoSuch(_) => 404,
            Self::BadRequest(_) => 400,
            Self::Precondition(_) => 412,
            Self::Busy(_) | Self::Conflict(_) => 409,
            Self::WaitTimeout { .. } | Self::Timeout(_) => 408,
            Self::Capacity(_) => 503,
            Self::Store(_) | Self::Rib(_) | Self::Runtime { .. } => 500,
            Self::Image(e) => e.status(),
        }
    }

    /// Fly's machine-readable code for this error, where it has one.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::Capacity(_) => Some("insufficient_capacity"),
            _ => None,
        }
    }
}

/// Stop parameters, resolved from the request, the machine's `stop_config`
/// and flyd's defaults; kept in the stop run's input so a resumed run uses
/// the same ones.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct StopInput {
    pub signal: i32,
    pub timeout_ms: u64,
}

/// Per-machine operation locks kept before idle ones are pruned.
const OP_LOCKS_KEPT: usize = 1024;

/// Finished FSM runs kept in the store (older ones are pruned at start).
const RUNS_KEPT: usize = 10_000;

/// One flyd host.
pub struct Flyd {
    pub(crate) cfg: FlydConfig,
    /// Machine records and FSM runs, durably.
    pub(crate) store: Arc<dyn FsmStore>,
    /// How the machines' workloads run.
    pub(crate) runtime: Arc<dyn Runtime>,
    /// The images machines run.
    pub(crate) images: Arc<Images>,
    rib: Arc<Rib>,
    /// Per-machine operation locks. The map's own lock is held only to
    /// fetch or insert an entry, never across an await.
    op_locks: Guarded<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped after every saved state change; `wait` watches it.
    pub(crate) changed: watch::Sender<u64>,
    /// What this host can schedule and what its machines reserve.
    pub(crate) capacity: Capacity,
    /// Opens app secrets for machines' environments.
    secrets: Arc<SecretBox>,
    /// The RPC address (`ip:port` or `unix:<path>`), once
    /// [`Flyd::register`] knows it.
    rpc_addr: OnceLock<String>,
    /// Woken when a RIB write failed after the store changed: the
    /// republisher then writes every machine's row again until one pass
    /// succeeds, so the RIB cannot stay behind (and route to a machine
    /// that is stopped or gone).
    rib_behind: Arc<tokio::sync::Notify>,
}

impl Flyd {
    /// Opens flyd's store under `data_dir` (redb) with machines as host
    /// processes under their pilots, and resumes what a previous run left
    /// (see [`Flyd::open_with`]). Call [`Flyd::register`] once the RPC address
    /// is known.
    pub async fn open(
        cfg: FlydConfig,
        data_dir: &Path,
        rib: Arc<Rib>,
        secrets: Arc<SecretBox>,
    ) -> Result<Arc<Self>, anyhow::Error> {
        use anyhow::Context;
        // Before anything is created on disk or in the cgroup tree.
        cfg.validate().map_err(|p| anyhow::anyhow!(p.join("; ")))?;
        let machines_dir = runtime::process::machines_dir(data_dir);
        std::fs::create_dir_all(&machines_dir)
            .with_context(|| format!("creating {}", machines_dir.display()))?;
        let store = Store::open(&data_dir.join("flyd.redb"))?;
        let cgroups = match Cgroups::setup(&cfg.cgroup_root, &cfg.host_id) {
            Ok(cg) => Some(cg),
            Err(why) => {
                tracing::info!("{why}: machine memory is reserved for placement but not limited");
                None
            }
        };
        let exe = executable(&cfg)?;
        let logs = (cfg.log_max_bytes, cfg.log_files);
        let images = Images::open(
            &data_dir.join("images"),
            &crate::images::ImagesConfig {
                crash_at: cfg.crash_at.clone(),
                ..cfg.images.clone()
            },
        )?;
        let sandboxes = Sandboxes::setup(
            &cfg.sandbox,
            &cfg.network,
            data_dir,
            &exe,
            &cfg.host_id,
            images.ids(),
        );
        let sandboxes = match sandboxes {
            Ok(sandboxes) => {
                tracing::info!("machines that run images run in sandboxes under runc");
                Ok(sandboxes)
            }
            Err(NoSandboxes::Unable(why)) => {
                tracing::warn!(
                    "no sandboxes on this host ({why}): only hangar/echo can run, as a host process"
                );
                Err(why)
            }
            Err(NoSandboxes::Misconfigured(why)) => anyhow::bail!(why),
        };
        let processes = Processes::new(exe, machines_dir, cgroups, sandboxes, logs);
        let seams = (
            Arc::new(store) as Arc<dyn FsmStore>,
            Arc::new(processes) as Arc<dyn Runtime>,
            Arc::new(images),
        );
        Self::open_with(cfg, seams, rib, secrets).await
    }

    /// flyd over `store`, `runtime` and `images`: resumes what a previous run left
    /// (unfinished FSM runs continue at their step, running machines are
    /// watched again, workloads of machines it does not know are removed).
    pub async fn open_with(
        cfg: FlydConfig,
        (store, runtime, images): (Arc<dyn FsmStore>, Arc<dyn Runtime>, Arc<Images>),
        rib: Arc<Rib>,
        secrets: Arc<SecretBox>,
    ) -> Result<Arc<Self>, anyhow::Error> {
        cfg.validate().map_err(|p| anyhow::anyhow!(p.join("; ")))?;
        let pruned = store.prune_runs(RUNS_KEPT)?;
        if pruned > 0 {
            tracing::info!(pruned, "deleted old finished fsm runs");
        }
        let capacity = Capacity::new(&cfg, reserved_by(&*store)?);
        let flyd = Arc::new(Self {
            cfg,
            store,
            runtime,
            images,
            rib,
            op_locks: Guarded::new("flyd.op_locks", Duration::from_secs(1), HashMap::new()),
            changed: watch::channel(0).0,
            capacity,
            secrets,
            rpc_addr: OnceLock::new(),
            rib_behind: Arc::new(tokio::sync::Notify::new()),
        });
        flyd.recover().await?;
        tokio::spawn(republisher(Arc::downgrade(&flyd), flyd.rib_behind.clone()));
        if flyd.cfg.images.collect_unused_after_s > 0 {
            let after = Duration::from_secs(flyd.cfg.images.collect_unused_after_s);
            tokio::spawn(image_collector(Arc::downgrade(&flyd), after));
        }
        Ok(flyd)
    }

    /// Publishes this host to the RIB with its RPC address and capacity,
    /// and every machine's row again: a previous run may have stopped
    /// between a change to its store and the RIB write that followed.
    pub fn register(&self, rpc_addr: String) -> Result<(), FlydError> {
        let _ = self.rpc_addr.set(rpc_addr);
        self.publish_host()?;
        self.republish()?;
        Ok(())
    }

    /// Writes every machine's row to the RIB at its current version (rows
    /// the RIB already has are left alone). Returns how many were behind.
    pub(crate) fn republish(&self) -> Result<usize, FlydError> {
        let rows: Vec<_> = self
            .store
            .machines()?
            .iter()
            .map(MachineRecord::rib_row)
            .collect();
        Ok(self.rib.upsert_machines(&rows)?)
    }

    /// Writes the host row (once registered): address and capacity.
    pub(crate) fn publish_host(&self) -> Result<(), FlydError> {
        let Some(addr) = self.rpc_addr.get() else {
            return Ok(());
        };
        self.rib.upsert_host(&HostRow {
            id: self.cfg.host_id.clone(),
            region: self.cfg.region.to_string(),
            address: addr.clone(),
            updated_at: now_ms(),
            capacity: self.capacity.snapshot(),
        })?;
        Ok(())
    }

    /// The app's secrets, opened, for a machine's environment at start.
    pub(crate) fn app_secrets(&self, app: &str) -> Result<Vec<(String, String)>, FlydError> {
        self.rib
            .secrets(app)?
            .into_iter()
            .map(|row| {
                let plain = self
                    .secrets
                    .open(app, &row.name, &row.sealed)
                    .map_err(|e| FlydError::Runtime {
                        id: String::new(),
                        reason: e.to_string(),
                    })?;
                Ok((row.name, String::from_utf8_lossy(&plain).into_owned()))
            })
            .collect()
    }

    /// Reserves `guest` on this host (503 when it does not fit).
    pub(crate) fn reserve(&self, guest: Guest) -> Result<(), FlydError> {
        self.capacity.reserve(guest).map_err(FlydError::Capacity)?;
        self.publish_host()
    }

    /// Returns a reservation.
    pub(crate) fn release(&self, guest: Guest) {
        self.capacity.release(guest);
        if let Err(e) = self.publish_host() {
            tracing::warn!(error = %e, "publishing host capacity");
        }
    }

    pub(crate) fn record(&self, id: &str) -> Result<MachineRecord, FlydError> {
        self.store
            .machine(id)?
            .ok_or_else(|| FlydError::NotFound(id.to_string()))
    }

    /// Saves a record to redb, publishes its row to the RIB, and wakes
    /// waiters. The store is the truth: once it has the change, a failed RIB
    /// write does not fail the operation but is made good by the
    /// republisher.
    pub(crate) fn save(&self, rec: &mut MachineRecord) -> Result<(), FlydError> {
        let row = rec.next_rib_row();
        self.store.put_machine(rec)?;
        if let Err(e) = self.rib.upsert_machine(&row) {
            tracing::warn!(machine = %rec.id, error = %e, "the RIB missed a machine's change; republishing");
            self.rib_behind.notify_one();
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    pub(crate) async fn lock_machine(&self, id: &str) -> Result<OwnedMutexGuard<()>, FlydError> {
        let lock = self
            .op_locks
            .with("lock_machine", |m| {
                if m.len() >= OP_LOCKS_KEPT {
                    // Locks nobody holds or waits for (only the map has
                    // them: clones are made under this lock) go, so the map
                    // does not grow with every machine that ever was.
                    m.retain(|_, lock| Arc::strong_count(lock) > 1);
                }
                m.entry(id.to_string()).or_default().clone()
            })
            .map_err(|e| FlydError::Runtime {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        let wait = Duration::from_millis(self.cfg.op_wait_ms);
        tokio::time::timeout(wait, lock.lock_owned())
            .await
            .map_err(|_| FlydError::Busy(id.to_string()))
    }

    // ---- operations ----

    /// Stops every running machine (flyd is shutting down), within
    /// `shutdown_timeout_ms` in all. Machines are recorded as stopped, so a
    /// later start begins from a clean state; any still running at the
    /// deadline are left to their pilots, and found again at the next start.
    pub async fn shutdown(self: &Arc<Self>) {
        let deadline = Duration::from_millis(self.cfg.shutdown_timeout_ms);
        if tokio::time::timeout(deadline, self.stop_all())
            .await
            .is_err()
        {
            tracing::warn!(
                ?deadline,
                "shutdown: machines still stopping at the deadline are left running"
            );
        }
        self.runtime.shutdown();
    }

    async fn stop_all(self: &Arc<Self>) {
        // Shutdown is the operator's: it acts with each machine's lease.
        let running: Vec<(String, Option<String>)> = match self.store.machines() {
            Ok(all) => all
                .into_iter()
                .filter(|m| m.has_process())
                .map(|m| (m.id.clone(), m.active_lease().map(|l| l.nonce.clone())))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "flyd: cannot list machines to stop them");
                return;
            }
        };
        let stops = running.into_iter().map(|(id, nonce)| {
            let flyd = self.clone();
            async move {
                match flyd
                    .stop(&id, StopRequest::default(), nonce.as_deref())
                    .await
                {
                    Ok(()) => tracing::info!(machine = %id, "stopped for shutdown"),
                    Err(e) => tracing::warn!(machine = %id, error = %e, "stop at shutdown failed"),
                }
            }
        });
        futures_join_all(stops).await;
    }

    // ---- the FSM engine ----

    /// Runs `run` from its current step to the end, recording it before and
    /// after each step. The caller holds the machine's operation lock.
    pub(crate) async fn run(self: &Arc<Self>, mut run: FsmRun) -> Result<(), FlydError> {
        let skip_launch = run.skip_launch();
        while let Some(step) = run.current() {
            if skip_launch && !matches!(step, Step::Record | Step::Reconfigure) {
                break;
            }
            run.updated_at = now_ms();
            self.store.put_run(&run)?;
            tracing::debug!(run = %run.id, machine = %run.machine_id, kind = ?run.kind, ?step, "fsm step");
            self.failpoint(&run, step, "before");
            let result = self.step(&run, step).await;
            if result.is_ok() {
                self.failpoint(&run, step, "after");
            }
            if let Err(e) = result {
                run.status = RunStatus::Failed;
                run.error = Some(e.to_string());
                run.updated_at = now_ms();
                self.store.put_run(&run)?;
                tracing::warn!(run = %run.id, machine = %run.machine_id, ?step, error = %e, "fsm step failed");
                self.after_failure(&run).await;
                return Err(e);
            }
            run.step += 1;
        }
        run.status = RunStatus::Done;
        run.updated_at = now_ms();
        if let Some(rec) = self.store.machine(&run.machine_id)? {
            run.output = serde_json::json!({ "state": rec.state, "version": rec.version });
        }
        self.store.put_run(&run)?;
        Ok(())
    }

    /// Kills this process at the configured `crash_at` point (tests only):
    /// SIGKILL, like an operator's `kill -9`, so nothing is flushed or
    /// cleaned up on the way out.
    fn failpoint(&self, run: &FsmRun, step: Step, when: &str) {
        let Some(point) = &self.cfg.crash_at else {
            return;
        };
        if *point == format!("{}/{}/{when}", run.kind.as_str(), step.as_str()) {
            tracing::error!(failpoint = %point, machine = %run.machine_id, "crash_at reached: killing this process");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    async fn step(self: &Arc<Self>, run: &FsmRun, step: Step) -> Result<(), FlydError> {
        let id = run.machine_id.as_str();
        match step {
            Step::Record => self.step_record(run),
            Step::Spawn => self.step_spawn(id).await,
            Step::Ready => self.step_ready(id).await,
            Step::Started => self.step_started(id),
            Step::Signal => self.step_signal(id, stop_input(run)?).await,
            Step::Exited => self.step_exited(id, stop_input(run)?).await,
            Step::Teardown => self.step_teardown(id).await,
            Step::Freeze => self.step_freeze(id).await,
            Step::Reconfigure => self.step_reconfigure(run),
            Step::Cordon => self.step_cordon(run),
            Step::Destroyed => {
                let mut rec = self.record(id)?;
                if rec.state == MachineState::Destroyed {
                    return Ok(()); // done before a crash
                }
                rec.pilot_pid = None;
                rec.transition(MachineState::Destroyed, "destroy", "user", None);
                self.save(&mut rec)?;
                self.release(Guest::of(&rec.config));
                Ok(())
            }
        }
    }

    /// A start that failed leaves the machine stopped (its workload
    /// killed), so it can be started again or destroyed.
    async fn after_failure(self: &Arc<Self>, run: &FsmRun) {
        // Only a failure while launching leaves a half-started workload.
        if !matches!(
            run.current(),
            Some(Step::Spawn | Step::Ready | Step::Started)
        ) {
            return;
        }
        let id = run.machine_id.as_str();
        if let Ok(Some(mut rec)) = self.store.machine(id) {
            if self.runtime.alive(id).await {
                if let Err(e) = runtime::kill(&*self.runtime, id).await {
                    tracing::error!(machine = %id, error = %e, "killing a workload that failed to start");
                }
            }
            rec.pilot_pid = None;
            let exit = self.runtime.exited(id).await;
            let reason = serde_json::json!({ "error": run.error, "exit": exit });
            rec.transition(MachineState::Stopped, "exit", "flyd", Some(reason));
            if let Err(e) = self.save(&mut rec) {
                tracing::error!(machine = %rec.id, error = %e, "recording a failed start");
            }
        }
    }

    /// The block a machine that runs `config` takes its address from: the
    /// sandboxes' network, or the host's loopback for a host command (and
    /// wherever this host has no sandboxes).
    pub(crate) fn address_block(&self, config: &MachineConfig) -> AddrBlock {
        match self.runtime.image_network() {
            Some(block) if config.image != HOST_IMAGE => block,
            _ => self.cfg.private_range,
        }
    }

    /// Picks a free address of `block` at random, so two hosts (or two dev
    /// instances) sharing a range rarely collide. The block's first usable
    /// address is never given: it is the machines' gateway.
    pub(crate) fn allocate_ip(&self, block: AddrBlock) -> Result<Ipv4Addr, FlydError> {
        let used: HashSet<String> = self
            .store
            .machines()?
            .into_iter()
            .filter(|m| m.state != MachineState::Destroyed)
            .map(|m| m.private_ip)
            .collect();
        let hosts = block.hosts().start() + 1..=*block.hosts().end();
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let ip = Ipv4Addr::from(rng.random_range(hosts.clone()));
            // Skip .0 and .255 in any octet position that would look like a
            // network or broadcast address to tools.
            if matches!(ip.octets()[3], 0 | 255) || used.contains(&ip.to_string()) {
                continue;
            }
            return Ok(ip);
        }
        Err(FlydError::Runtime {
            id: String::new(),
            reason: format!("no free private address in {block}"),
        })
    }

    /// Resumes what a previous flyd left: unfinished runs continue (each in
    /// its own task, its machine locked before any request can arrive);
    /// machines that should be running are watched again, or recorded as
    /// stopped when their workload exited while flyd was down; and pilots of
    /// machines this host does not know are killed.
    async fn recover(self: &Arc<Self>) -> Result<(), FlydError> {
        let unfinished = self.store.unfinished_runs()?;
        let resumed: HashSet<String> = unfinished.iter().map(|r| r.machine_id.clone()).collect();
        for mut run in unfinished {
            tracing::info!(run = %run.id, machine = %run.machine_id, kind = ?run.kind, step = ?run.current(), "resuming fsm run");
            let guard = self.lock_machine(&run.machine_id).await?;
            if run.current() == Some(Step::Record) {
                // Record now, so the machine is listed as soon as flyd
                // serves; the launch goes on in the background.
                self.step_record(&run)?;
                run.step += 1;
                self.store.put_run(&run)?;
            }
            let flyd = self.clone();
            tokio::spawn(async move {
                let _guard = guard;
                let (id, watches) = (
                    run.machine_id.clone(),
                    run.kind.steps().contains(&Step::Started),
                );
                if let Err(e) = flyd.run(run).await {
                    tracing::warn!(error = %e, "resumed run failed");
                }
                // A run that does not start the machine (cordon, suspend)
                // leaves it running unwatched: no one else re-attaches to
                // a machine whose run was resumed.
                if !watches {
                    flyd.reattach(&id).await;
                }
            });
        }
        for mut rec in self.store.machines()? {
            if resumed.contains(&rec.id) || !rec.has_process() {
                continue;
            }
            let alive = self.runtime.alive(&rec.id).await;
            if alive && matches!(rec.state, MachineState::Started | MachineState::Suspended) {
                tracing::info!(machine = %rec.id, "re-attached to running machine");
                self.watch_exit(rec.id.clone(), rec.pilot_pid);
                self.watch_checks(&rec.id, rec.pilot_pid)?;
                continue;
            }
            // Half-way through a start or stop with no run to finish it:
            // settle on stopped, killing what still runs.
            if alive {
                self.kill(&rec.id).await?;
            }
            let exit = self.runtime.exited(&rec.id).await;
            rec.pilot_pid = None;
            rec.transition(
                MachineState::Stopped,
                "exit",
                "flyd",
                Some(serde_json::json!({ "exit_event": exit })),
            );
            self.save(&mut rec)?;
        }
        self.kill_unknown_pilots().await
    }

    /// Watches a running machine's workload again (its exit, its checks).
    async fn reattach(self: &Arc<Self>, id: &str) {
        let Ok(rec) = self.record(id) else { return };
        let running = matches!(rec.state, MachineState::Started | MachineState::Suspended);
        if running && self.runtime.alive(id).await {
            self.watch_exit(rec.id.clone(), rec.pilot_pid);
            if let Err(e) = self.watch_checks(id, rec.pilot_pid) {
                tracing::warn!(machine = %id, error = %e, "watching a machine's checks again");
            }
        }
    }

    /// Kills the workloads of machines with no live record (a destroyed
    /// machine, or one from a store that was reset) and removes what they
    /// left.
    async fn kill_unknown_pilots(&self) -> Result<(), FlydError> {
        for id in self.runtime.machines() {
            let known = self
                .store
                .machine(&id)?
                .is_some_and(|m| m.state != MachineState::Destroyed);
            if known {
                continue;
            }
            if self.runtime.alive(&id).await {
                tracing::warn!(machine = %id, "killing the workload of a machine this host does not know");
                self.kill(&id).await?;
            }
            if let Err(e) = self.runtime.remove(&id).await {
                tracing::warn!(machine = %id, error = %e, "removing an unknown machine's files");
            }
        }
        Ok(())
    }

    /// SIGKILLs the workload of `id` and waits for its exit.
    pub(crate) async fn kill(&self, id: &str) -> Result<crate::pilot::ExitInfo, FlydError> {
        runtime::kill(&*self.runtime, id)
            .await
            .map_err(|e| FlydError::runtime(id, e))
    }
}

/// Republishes every machine's row each time a RIB write failed, until a
/// pass succeeds (retrying after 100 ms, doubling up to 5 s); ends with
/// flyd.
async fn republisher(flyd: std::sync::Weak<Flyd>, behind: Arc<tokio::sync::Notify>) {
    const FIRST: Duration = Duration::from_millis(100);
    const MOST: Duration = Duration::from_secs(5);
    loop {
        behind.notified().await;
        let mut pause = FIRST;
        loop {
            let Some(flyd) = flyd.upgrade() else {
                return;
            };
            // Blocking (redb, SQLite), like every other write of flyd's.
            match flyd.republish() {
                Ok(n) => {
                    tracing::info!(behind = n, "republished every machine's row to the RIB");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?pause, "republishing to the RIB"),
            }
            drop(flyd);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MOST);
        }
    }
}

/// Removes the images no machine has used for `after`, as kubelet's image
/// collector does. An image's idle time is counted from when this flyd
/// first saw it unused (a restart counts again: late, never early); one
/// that a machine uses meanwhile starts over, and one a pull or create
/// holds pinned is left.
async fn image_collector(flyd: std::sync::Weak<Flyd>, after: Duration) {
    let every = (after / 10).clamp(Duration::from_millis(100), Duration::from_secs(600));
    let mut unused_since: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        let Some(flyd) = flyd.upgrade() else {
            return;
        };
        let in_use = match flyd.images_in_use() {
            Ok(in_use) => in_use,
            Err(e) => {
                tracing::warn!(error = %e, "collecting images: listing machines");
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        let unused: HashSet<String> = flyd
            .images
            .list()
            .into_iter()
            .map(|image| image.digest)
            .filter(|digest| !in_use.contains_key(digest))
            .collect();
        unused_since.retain(|digest, _| unused.contains(digest));
        for digest in unused {
            unused_since.entry(digest).or_insert(now);
        }
        let due = |image: &crate::images::ImageRecord| {
            unused_since
                .get(&image.digest)
                .is_some_and(|since| now.duration_since(*since) >= after)
        };
        match flyd.images.prune(&in_use, due).await {
            Ok(removed) => {
                for image in removed {
                    tracing::info!(digest = %image.digest, names = ?image.names, unused_for = ?after, "collected an unused image");
                    unused_since.remove(&image.digest);
                }
            }
            Err(e) => tracing::warn!(error = %e, "collecting images"),
        }
    }
}

/// Runs futures concurrently and waits for all of them.
async fn futures_join_all<F: Future<Output = ()> + Send + 'static>(futs: impl Iterator<Item = F>) {
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

/// The `hangar` executable: the configured one, else this one.
fn executable(cfg: &FlydConfig) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    match &cfg.exe {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe().context("locating the hangar executable"),
    }
}

/// What the machines in `store` reserve: every live machine, and the
/// machine of any create that had not recorded it yet (it will resume).
fn reserved_by(store: &dyn FsmStore) -> Result<Guest, StoreError> {
    let mut total = Guest::default();
    let mut add = |g: Guest| {
        total.cpus += g.cpus;
        total.memory_mb += g.memory_mb;
    };
    for m in store.machines()? {
        if m.state != MachineState::Destroyed {
            add(Guest::of(&m.config));
        }
    }
    for run in store.unfinished_runs()? {
        if run.kind == crate::fsm::FsmKind::Create && store.machine(&run.machine_id)?.is_none() {
            if let Ok(rec) = serde_json::from_value::<MachineRecord>(run.input.clone()) {
                add(Guest::of(&rec.config));
            }
        }
    }
    Ok(total)
}

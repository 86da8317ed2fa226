//! The orchestrator: operations on machines, each run as a durable FSM.
//!
//! Every public operation checks its preconditions under the machine's
//! operation lock (one operation per machine at a time, later ones queue for
//! at most `op_wait_ms`), then runs its FSM ([`crate::fsm`]) step by step,
//! recording the run in redb before and after each step. State changes are
//! saved to redb first (flyd is the source of truth) and then published to
//! the RIB with an increasing row version.

use crate::config::{FlydConfig, PrivateRange};
use crate::fsm::{FsmKind, FsmRun, RunStatus, Step};
use crate::pilot::{self, ExitInfo, PilotSpec};
use crate::record::{MachineRecord, now_ms, now_rfc3339};
use crate::store::{Store, StoreError};
use hangar_api::host::HostCreateRequest;
use hangar_api::machine::{
    ECHO_IMAGE, Machine, MachineState, StartResponse, StopRequest, WaitResponse,
};
use hangar_catalog::lock::Guarded;
use hangar_catalog::{HostRow, Rib, RibError};
use rand::Rng;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedMutexGuard, watch};

/// Why an operation failed. Each maps to the status Fly answers with.
#[derive(Debug, thiserror::Error)]
pub enum FlydError {
    #[error("machine {0} not found")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The machine is not in a state the operation accepts (412).
    #[error("{0}")]
    Precondition(String),
    /// Another operation on the machine did not finish in time (409).
    #[error("machine {0} is busy with another operation; try again")]
    Busy(String),
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
}

impl FlydError {
    /// The HTTP status Fly's API uses for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::BadRequest(_) => 400,
            Self::Precondition(_) => 412,
            Self::Busy(_) => 409,
            Self::WaitTimeout { .. } => 408,
            Self::Store(_) | Self::Rib(_) | Self::Runtime { .. } => 500,
        }
    }
}

/// Stop parameters, resolved from the request, the machine's `stop_config`
/// and flyd's defaults; kept in the stop run's input so a resumed run uses
/// the same ones.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct StopInput {
    signal: i32,
    timeout_ms: u64,
}

/// How long to wait for a workload to die after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often the ready step probes a service port.
const READY_POLL: Duration = Duration::from_millis(5);

/// One flyd host.
pub struct Flyd {
    cfg: FlydConfig,
    range: PrivateRange,
    store: Store,
    rib: Arc<Rib>,
    /// `<data dir>/machines`: one directory per machine (spec, socket, logs).
    machines_dir: PathBuf,
    /// The `hangar` executable that runs pilot and the built-in images.
    exe: PathBuf,
    /// Per-machine operation locks. The map's own lock is held only to
    /// fetch or insert an entry, never across an await.
    op_locks: Guarded<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped after every saved state change; `wait` watches it.
    changed: watch::Sender<u64>,
}

/// Parses a signal name (`SIGINT`, `INT`) or number.
fn parse_signal(text: &str) -> Result<i32, FlydError> {
    let name = text.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let n = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        other => other
            .parse::<i32>()
            .ok()
            .filter(|n| (1..=31).contains(n))
            .ok_or_else(|| FlydError::BadRequest(format!("signal: unknown signal {text:?}")))?,
    };
    Ok(n)
}

fn random_machine_id() -> String {
    let n: u64 = rand::rng().random();
    format!("{:014x}", n & 0x00ff_ffff_ffff_ffff)
}

impl Flyd {
    /// Opens flyd's store under `data_dir`, and resumes what a previous run
    /// left: unfinished FSM runs continue at their step, and running machines
    /// are watched again. Call [`Flyd::register`] once the RPC address is known.
    pub async fn open(
        cfg: FlydConfig,
        data_dir: &Path,
        rib: Arc<Rib>,
    ) -> Result<Arc<Self>, anyhow::Error> {
        use anyhow::Context;
        cfg.validate().map_err(|p| anyhow::anyhow!(p.join("; ")))?;
        let range = cfg.private_range().map_err(anyhow::Error::msg)?;
        let machines_dir = data_dir.join("machines");
        std::fs::create_dir_all(&machines_dir)
            .with_context(|| format!("creating {}", machines_dir.display()))?;
        let store = Store::open(&data_dir.join("flyd.redb"))?;
        let exe = match &cfg.exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("locating the hangar executable")?,
        };
        let flyd = Arc::new(Self {
            cfg,
            range,
            store,
            rib,
            machines_dir,
            exe,
            op_locks: Guarded::new("flyd.op_locks", Duration::from_secs(1), HashMap::new()),
            changed: watch::channel(0).0,
        });
        flyd.recover().await?;
        Ok(flyd)
    }

    /// Publishes this host to the RIB with its RPC address.
    pub fn register(&self, rpc_addr: SocketAddr) -> Result<(), FlydError> {
        self.rib.upsert_host(&HostRow {
            id: self.cfg.host_id.clone(),
            region: self.cfg.region.clone(),
            address: rpc_addr.to_string(),
            updated_at: now_ms(),
        })?;
        Ok(())
    }

    fn machine_dir(&self, id: &str) -> PathBuf {
        self.machines_dir.join(id)
    }

    fn record(&self, id: &str) -> Result<MachineRecord, FlydError> {
        self.store
            .machine(id)?
            .ok_or_else(|| FlydError::NotFound(id.to_string()))
    }

    /// Saves a record to redb, publishes its row to the RIB, and wakes waiters.
    fn save(&self, rec: &mut MachineRecord) -> Result<(), FlydError> {
        let row = rec.next_rib_row();
        self.store.put_machine(rec)?;
        self.rib.upsert_machine(&row)?;
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn lock_machine(&self, id: &str) -> Result<OwnedMutexGuard<()>, FlydError> {
        let lock = self
            .op_locks
            .with("lock_machine", |m| {
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

    /// Creates a machine and, unless `skip_launch`, starts it.
    pub async fn create(self: &Arc<Self>, req: HostCreateRequest) -> Result<Machine, FlydError> {
        req.config.validate().map_err(FlydError::BadRequest)?;
        workload_argv(&self.exe, &req.config)?;
        let id = random_machine_id();
        let now = now_rfc3339();
        let rec = MachineRecord {
            name: req
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("{}-{id}", req.app)),
            id: id.clone(),
            app: req.app,
            region: self.cfg.region.clone(),
            host: self.cfg.host_id.clone(),
            state: MachineState::Created,
            private_ip: self.allocate_ip()?.to_string(),
            config: req.config,
            version: ulid::Ulid::new().to_string(),
            created_at: now.clone(),
            updated_at: now,
            cordoned: false,
            events: Vec::new(),
            rib_version: 0,
            pilot_pid: None,
        };
        let _guard = self.lock_machine(&id).await?;
        let mut run = FsmRun::new(
            FsmKind::Create,
            &id,
            serde_json::to_value(&rec).expect("records serialize"),
        );
        if req.skip_launch {
            // Only the record step: the machine stays `created`.
            run.input["skip_launch"] = true.into();
        }
        self.run(run).await?;
        Ok(self.record(&id)?.to_api())
    }

    /// One machine.
    pub fn get(&self, id: &str) -> Result<Machine, FlydError> {
        Ok(self.record(id)?.to_api())
    }

    /// The machines of `app` on this host, destroyed ones left out unless asked.
    pub fn list(&self, app: &str, include_destroyed: bool) -> Result<Vec<Machine>, FlydError> {
        Ok(self
            .store
            .machines()?
            .into_iter()
            .filter(|m| m.app == app && (include_destroyed || m.state != MachineState::Destroyed))
            .map(|m| m.to_api())
            .collect())
    }

    /// Starts a stopped or created machine.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<StartResponse, FlydError> {
        let _guard = self.lock_machine(id).await?;
        let rec = self.record(id)?;
        if !matches!(
            rec.state,
            MachineState::Created | MachineState::Stopped | MachineState::Failed
        ) {
            return Err(FlydError::Precondition(format!(
                "unable to start machine {id} from state '{}'",
                rec.state
            )));
        }
        self.run(FsmRun::new(FsmKind::Start, id, serde_json::Value::Null))
            .await?;
        Ok(StartResponse {
            previous_state: rec.state,
            migrated: false,
            new_host: String::new(),
        })
    }

    /// Stops a started machine: the signal, then SIGKILL after the timeout.
    pub async fn stop(self: &Arc<Self>, id: &str, req: StopRequest) -> Result<(), FlydError> {
        let _guard = self.lock_machine(id).await?;
        let rec = self.record(id)?;
        if !matches!(
            rec.state,
            MachineState::Started | MachineState::Starting | MachineState::Stopping
        ) {
            return Err(FlydError::Precondition(format!(
                "unable to stop machine {id} from state '{}'",
                rec.state
            )));
        }
        let input = self.stop_input(&rec, &req)?;
        self.run(FsmRun::new(
            FsmKind::Stop,
            id,
            serde_json::to_value(input).expect("serializes"),
        ))
        .await
    }

    fn stop_input(&self, rec: &MachineRecord, req: &StopRequest) -> Result<StopInput, FlydError> {
        let stop_config = rec.config.stop_config.as_ref();
        let signal = req
            .signal
            .as_deref()
            .or_else(|| stop_config.and_then(|s| s.signal.as_deref()))
            .map(parse_signal)
            .transpose()?
            .unwrap_or(2); // SIGINT, Fly's default
        let timeout = req
            .timeout
            .or_else(|| stop_config.and_then(|s| s.timeout))
            .map(|d| d.0)
            .unwrap_or(Duration::from_millis(self.cfg.stop_timeout_ms));
        Ok(StopInput {
            signal,
            timeout_ms: timeout.as_millis() as u64,
        })
    }

    /// Destroys a machine; a running one only with `force` (it is killed).
    pub async fn destroy(self: &Arc<Self>, id: &str, force: bool) -> Result<(), FlydError> {
        let _guard = self.lock_machine(id).await?;
        let rec = self.record(id)?;
        match rec.state {
            MachineState::Destroyed => {
                return Err(FlydError::Precondition(format!(
                    "machine {id} is already destroyed"
                )));
            }
            MachineState::Created
            | MachineState::Stopped
            | MachineState::Failed
            | MachineState::Suspended => {}
            _ if force => {}
            state => {
                return Err(FlydError::Precondition(format!(
                    "unable to destroy machine {id} in state '{state}': stop it first or pass force=true"
                )));
            }
        }
        self.run(FsmRun::new(
            FsmKind::Destroy,
            id,
            serde_json::json!({ "force": force }),
        ))
        .await
    }

    /// Waits until the machine is in one of `states`, or `timeout` passes.
    pub async fn wait(
        &self,
        id: &str,
        states: &[MachineState],
        timeout: Duration,
    ) -> Result<WaitResponse, FlydError> {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Mark seen before reading, so a change between the read and the
            // await still wakes us.
            changed.borrow_and_update();
            let rec = self.record(id)?;
            if states.contains(&rec.state) {
                return Ok(WaitResponse {
                    ok: true,
                    state: rec.state,
                    event_id: rec.events.first().map(|e| e.id.clone()),
                    version: Some(rec.version),
                });
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(FlydError::WaitTimeout {
                    id: id.to_string(),
                    states: states
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join("|"),
                    timeout,
                    state: rec.state,
                });
            }
        }
    }

    /// Stops every running machine (flyd is shutting down). Machines are
    /// recorded as stopped, so a later start begins from a clean state.
    pub async fn shutdown(self: &Arc<Self>) {
        let running: Vec<String> = match self.store.machines() {
            Ok(all) => all
                .into_iter()
                .filter(|m| matches!(m.state, MachineState::Started | MachineState::Starting))
                .map(|m| m.id)
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "flyd: cannot list machines to stop them");
                return;
            }
        };
        let stops = running.into_iter().map(|id| {
            let flyd = self.clone();
            async move {
                match flyd.stop(&id, StopRequest::default()).await {
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
    async fn run(self: &Arc<Self>, mut run: FsmRun) -> Result<(), FlydError> {
        let skip_launch = run.input.get("skip_launch").and_then(|v| v.as_bool()) == Some(true);
        while let Some(step) = run.current() {
            if skip_launch && step != Step::Record {
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
                self.after_failure(&run);
                return Err(e);
            }
            run.step += 1;
        }
        run.status = RunStatus::Done;
        run.updated_at = now_ms();
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
            Step::Destroyed => {
                let mut rec = self.record(id)?;
                rec.pilot_pid = None;
                rec.transition(MachineState::Destroyed, "destroy", "user", None);
                self.save(&mut rec)
            }
        }
    }

    /// A start that failed leaves the machine stopped (its pilot killed), so
    /// it can be started again or destroyed.
    fn after_failure(self: &Arc<Self>, run: &FsmRun) {
        if !matches!(run.kind, FsmKind::Create | FsmKind::Start)
            || run.current() == Some(Step::Record)
        {
            return;
        }
        let dir = self.machine_dir(&run.machine_id);
        if let Ok(Some(mut rec)) = self.store.machine(&run.machine_id) {
            if let Some(pid) = rec.pilot_pid.take() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let reason =
                serde_json::json!({ "error": run.error, "exit": pilot::recorded_exit(&dir) });
            rec.transition(MachineState::Stopped, "exit", "flyd", Some(reason));
            if let Err(e) = self.save(&mut rec) {
                tracing::error!(machine = %rec.id, error = %e, "recording a failed start");
            }
        }
    }

    fn step_record(&self, run: &FsmRun) -> Result<(), FlydError> {
        if self.store.machine(&run.machine_id)?.is_some() {
            return Ok(()); // recorded before a crash
        }
        let mut rec: MachineRecord =
            serde_json::from_value(run.input.clone()).map_err(|e| FlydError::Runtime {
                id: run.machine_id.clone(),
                reason: format!("create input does not decode: {e}"),
            })?;
        rec.transition(MachineState::Created, "launch", "user", None);
        self.save(&mut rec)
    }

    async fn step_spawn(&self, id: &str) -> Result<(), FlydError> {
        let dir = self.machine_dir(id);
        let mut rec = self.record(id)?;
        if let Some(status) = pilot::status(&dir).await {
            if status.exit.is_none() {
                return Ok(()); // launched before a crash and still running
            }
        }
        let runtime = |reason: String| FlydError::Runtime {
            id: id.to_string(),
            reason,
        };
        let spec = PilotSpec {
            machine_id: id.to_string(),
            argv: workload_argv(&self.exe, &rec.config)?,
            env: workload_env(&rec),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| runtime(format!("creating {}: {e}", dir.display())))?;
        std::fs::write(
            pilot::spec_path(&dir),
            serde_json::to_vec_pretty(&spec).expect("serializes"),
        )
        .map_err(|e| runtime(format!("writing spec.json: {e}")))?;
        rec.state = MachineState::Starting;
        rec.updated_at = now_rfc3339();
        self.save(&mut rec)?;
        let pid = pilot::launch(&self.exe, &dir, Duration::from_secs(10))
            .await
            .map_err(|e| runtime(e.to_string()))?;
        rec.pilot_pid = Some(pid);
        self.store.put_machine(&rec)?;
        Ok(())
    }

    /// Waits until every service port accepts a connection. A workload that
    /// exits meanwhile fails the start; one that is merely slow is reported
    /// started after `ready_timeout_ms`, as Fly reports a machine started
    /// once its process runs.
    async fn step_ready(&self, id: &str) -> Result<(), FlydError> {
        let rec = self.record(id)?;
        let dir = self.machine_dir(id);
        let ports: Vec<u16> = rec
            .config
            .services
            .iter()
            .map(|s| s.internal_port)
            .collect();
        let ip: Ipv4Addr = rec.private_ip.parse().map_err(|_| FlydError::Runtime {
            id: id.to_string(),
            reason: format!("bad private ip {:?}", rec.private_ip),
        })?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.cfg.ready_timeout_ms);
        let mut pending: Vec<u16> = ports;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for port in pending {
                if tokio::net::TcpStream::connect((ip, port)).await.is_err() {
                    still.push(port);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if let Some(exit) = pilot::status(&dir)
                .await
                .and_then(|s| s.exit)
                .or_else(|| pilot::recorded_exit(&dir))
            {
                return Err(FlydError::Runtime {
                    id: id.to_string(),
                    reason: format!("workload exited while starting ({})", describe_exit(exit)),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    machine = id,
                    ?pending,
                    "ports not accepting connections yet; reporting started anyway"
                );
                break;
            }
            tokio::time::sleep(READY_POLL).await;
        }
        Ok(())
    }

    fn step_started(self: &Arc<Self>, id: &str) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        if rec.state != MachineState::Started {
            rec.transition(MachineState::Started, "start", "user", None);
            self.save(&mut rec)?;
        }
        self.watch_exit(id.to_string(), rec.pilot_pid);
        Ok(())
    }

    async fn step_signal(&self, id: &str, input: StopInput) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        if !matches!(
            rec.state,
            MachineState::Started | MachineState::Starting | MachineState::Stopping
        ) {
            return Ok(());
        }
        if rec.state != MachineState::Stopping {
            rec.state = MachineState::Stopping;
            rec.updated_at = now_rfc3339();
            self.save(&mut rec)?;
        }
        // A pilot that is gone has nothing left to signal; the next step
        // reads the exit it recorded.
        if let Err(e) = pilot::signal(&self.machine_dir(id), input.signal).await {
            tracing::debug!(machine = id, error = %e, "stop signal not delivered");
        }
        Ok(())
    }

    async fn step_exited(&self, id: &str, input: StopInput) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        if rec.state != MachineState::Stopping {
            return Ok(());
        }
        let dir = self.machine_dir(id);
        let grace = Duration::from_millis(input.timeout_ms);
        let exit = match tokio::time::timeout(grace, pilot::wait_exit(&dir)).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::info!(machine = id, ?grace, "stop timeout passed; sending SIGKILL");
                kill_workload(id, &dir).await?
            }
        };
        rec.pilot_pid = None;
        let request = serde_json::json!({ "exit_event": exit, "signal": input.signal });
        rec.transition(MachineState::Stopped, "stop", "user", Some(request));
        self.save(&mut rec)
    }

    async fn step_teardown(&self, id: &str) -> Result<(), FlydError> {
        let dir = self.machine_dir(id);
        if pilot::status(&dir).await.is_some_and(|s| s.exit.is_none()) {
            kill_workload(id, &dir).await?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FlydError::Runtime {
                id: id.to_string(),
                reason: format!("removing {}: {e}", dir.display()),
            }),
        }
    }

    /// Watches the workload of the run whose pilot is `pilot_pid`; when it
    /// exits on its own, records the machine as stopped with the exit status.
    fn watch_exit(self: &Arc<Self>, id: String, pilot_pid: Option<u32>) {
        let flyd = self.clone();
        tokio::spawn(async move {
            let exit = pilot::wait_exit(&flyd.machine_dir(&id)).await;
            // Queue behind any operation: a stop in progress records the exit itself.
            let Ok(_guard) = flyd.lock_machine(&id).await else {
                tracing::warn!(machine = %id, "exit not recorded: machine stayed busy");
                return;
            };
            let Ok(mut rec) = flyd.record(&id) else {
                return;
            };
            if rec.state != MachineState::Started || rec.pilot_pid != pilot_pid {
                return;
            }
            tracing::info!(machine = %id, exit = %describe_exit(exit), "workload exited");
            rec.pilot_pid = None;
            rec.transition(
                MachineState::Stopped,
                "exit",
                "flyd",
                Some(serde_json::json!({ "exit_event": exit })),
            );
            if let Err(e) = flyd.save(&mut rec) {
                tracing::error!(machine = %id, error = %e, "recording an exit");
            }
        });
    }

    /// Picks a free private address at random, so two hosts (or two dev
    /// instances) sharing a range rarely collide.
    fn allocate_ip(&self) -> Result<Ipv4Addr, FlydError> {
        let used: HashSet<String> = self
            .store
            .machines()?
            .into_iter()
            .filter(|m| m.state != MachineState::Destroyed)
            .map(|m| m.private_ip)
            .collect();
        let hosts = self.range.hosts();
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
            reason: format!("no free private address in {}", self.cfg.private_range),
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
        for run in unfinished {
            tracing::info!(run = %run.id, machine = %run.machine_id, kind = ?run.kind, step = ?run.current(), "resuming fsm run");
            let guard = self.lock_machine(&run.machine_id).await?;
            let flyd = self.clone();
            tokio::spawn(async move {
                let _guard = guard;
                if let Err(e) = flyd.run(run).await {
                    tracing::warn!(error = %e, "resumed run failed");
                }
            });
        }
        for mut rec in self.store.machines()? {
            let running = matches!(
                rec.state,
                MachineState::Started | MachineState::Starting | MachineState::Stopping
            );
            if resumed.contains(&rec.id) || !running {
                continue;
            }
            let dir = self.machine_dir(&rec.id);
            let alive = pilot::status(&dir).await.is_some_and(|s| s.exit.is_none());
            if alive && rec.state == MachineState::Started {
                tracing::info!(machine = %rec.id, "re-attached to running machine");
                self.watch_exit(rec.id.clone(), rec.pilot_pid);
                continue;
            }
            // Half-way through a start or stop with no run to finish it:
            // settle on stopped, killing what still runs.
            if alive {
                kill_workload(&rec.id, &dir).await?;
            }
            let exit = pilot::recorded_exit(&dir);
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

    /// Kills the workloads of machine directories with no live record (a
    /// destroyed machine, or one from a store that was reset) and removes
    /// the directories.
    async fn kill_unknown_pilots(&self) -> Result<(), FlydError> {
        let Ok(entries) = std::fs::read_dir(&self.machines_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let known = self
                .store
                .machine(&id)?
                .is_some_and(|m| m.state != MachineState::Destroyed);
            if known {
                continue;
            }
            let dir = entry.path();
            if pilot::status(&dir).await.is_some_and(|s| s.exit.is_none()) {
                tracing::warn!(machine = %id, "killing the workload of a machine this host does not know");
                kill_workload(&id, &dir).await?;
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(machine = %id, error = %e, "removing an unknown machine's directory");
            }
        }
        Ok(())
    }
}

/// SIGKILLs a machine's workload through its pilot and waits for the exit.
async fn kill_workload(id: &str, dir: &Path) -> Result<ExitInfo, FlydError> {
    let _ = pilot::signal(dir, 9).await;
    tokio::time::timeout(KILL_WAIT, pilot::wait_exit(dir))
        .await
        .map_err(|_| FlydError::Runtime {
            id: id.to_string(),
            reason: format!("workload still running {KILL_WAIT:?} after SIGKILL"),
        })
}

fn stop_input(run: &FsmRun) -> Result<StopInput, FlydError> {
    serde_json::from_value(run.input.clone()).map_err(|e| FlydError::Runtime {
        id: run.machine_id.clone(),
        reason: format!("stop input does not decode: {e}"),
    })
}

fn describe_exit(exit: ExitInfo) -> String {
    match (exit.exit_code, exit.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "exit status unknown".to_string(),
    }
}

/// The program and arguments that run a machine's workload.
fn workload_argv(exe: &Path, config: &hangar_api::MachineConfig) -> Result<Vec<String>, FlydError> {
    if config.image == ECHO_IMAGE {
        return Ok(vec![exe.display().to_string(), "echo".to_string()]);
    }
    let init = config.init.clone().unwrap_or_default();
    let argv = if !init.exec.is_empty() {
        init.exec
    } else {
        [init.entrypoint, init.cmd].concat()
    };
    if argv.is_empty() {
        return Err(FlydError::BadRequest(format!(
            "config.image: {:?} cannot run here: use the built-in image {ECHO_IMAGE:?}, or give a host command in config.init.exec",
            config.image
        )));
    }
    Ok(argv)
}

/// The workload's environment: the config's `env` plus Fly's variables.
fn workload_env(rec: &MachineRecord) -> BTreeMap<String, String> {
    let mut env = rec.config.env.clone();
    let port = rec
        .config
        .services
        .first()
        .map(|s| s.internal_port)
        .unwrap_or(8080);
    env.entry("PORT".into()).or_insert_with(|| port.to_string());
    env.insert("FLY_MACHINE_ID".into(), rec.id.clone());
    env.insert("FLY_APP_NAME".into(), rec.app.clone());
    env.insert("FLY_REGION".into(), rec.region.clone());
    env.insert("FLY_PRIVATE_IP".into(), rec.private_ip.clone());
    env.insert("FLY_MACHINE_VERSION".into(), rec.version.clone());
    env.insert("FLY_IMAGE_REF".into(), rec.config.image.clone());
    env
}

/// Runs futures concurrently and waits for all of them.
async fn futures_join_all<F: Future<Output = ()> + Send + 'static>(futs: impl Iterator<Item = F>) {
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("SIGINT").unwrap(), 2);
        assert_eq!(parse_signal("term").unwrap(), 15);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("99").is_err());
    }

    #[test]
    fn machine_ids_look_like_flys() {
        let id = random_machine_id();
        assert_eq!(id.len(), 14);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn workloads_are_echo_or_a_host_command() {
        let exe = Path::new("/bin/hangar");
        let mut cfg = hangar_api::MachineConfig {
            image: ECHO_IMAGE.into(),
            ..Default::default()
        };
        assert_eq!(workload_argv(exe, &cfg).unwrap(), ["/bin/hangar", "echo"]);
        cfg.image = "nginx".into();
        assert!(matches!(
            workload_argv(exe, &cfg),
            Err(FlydError::BadRequest(_))
        ));
        cfg.init = Some(hangar_api::machine::MachineInit {
            cmd: vec!["sleep".into(), "5".into()],
            ..Default::default()
        });
        assert_eq!(workload_argv(exe, &cfg).unwrap(), ["sleep", "5"]);
    }
}

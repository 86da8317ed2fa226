//! The bodies of the FSM steps, and what happens when a workload exits on
//! its own (the restart policy). Each step first checks whether its effect
//! is already there, so a step interrupted by a crash can run again.

use crate::capacity::Guest;
use crate::checks::initial_statuses;
use crate::flyd::{Flyd, FlydError, StopInput};
use crate::fsm::{FsmKind, FsmRun};
use crate::pilot::ExitInfo;
use crate::record::{MAX_VERSIONS, MachineRecord, now_rfc3339};
use crate::runtime::Launch;
use crate::runtime::sandbox::LaunchImage;
use crate::workload::{workload_argv, workload_env};
use hangar_api::machine::{ECHO_IMAGE, MachineConfig, MachineState, MachineVersion};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How often the ready step probes a service port.
const READY_POLL: Duration = Duration::from_millis(5);
/// `on-failure` restarts in a row when `max_retries` is unset (Fly's default).
const DEFAULT_MAX_RETRIES: u32 = 10;

/// The new config of an update run, kept in its input so a resumed run
/// applies the same one.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct UpdateInput {
    pub version: String,
    /// The new config's image, resolved when the update was asked for.
    #[serde(default)]
    pub image_ref: Option<hangar_api::machine::ImageRef>,
    pub config: MachineConfig,
    #[serde(default)]
    pub name: Option<String>,
}

impl Flyd {
    pub(crate) fn step_record(&self, run: &FsmRun) -> Result<(), FlydError> {
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

    pub(crate) async fn step_spawn(&self, id: &str) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        if self.runtime.alive(id).await {
            // Running already: launched before a crash, or suspended (then
            // thawing resumes it; to a running workload it is nothing). A
            // workload that cannot be thawed fails the start, which then
            // kills it: it must not be reported started while frozen.
            return self
                .runtime
                .thaw(id)
                .await
                .map_err(|e| FlydError::runtime(id, e));
        }
        let block = self.address_block(&rec.config);
        let address = match rec.private_ip.parse() {
            Ok(ip) if block.contains(ip) => ip,
            // The machine changed between a host command and an image, or
            // this host gained or lost its sandboxes, since it was given
            // its address: a new one (published with the state below).
            _ => self.allocate_ip(block)?,
        };
        rec.private_ip = address.to_string();
        let image = self.machine_image(&rec)?;
        let run_config = image.as_ref().map(|(i, _)| &i.config);
        let guest = Guest::of(&rec.config);
        let launch = Launch {
            argv: workload_argv(&rec.config, run_config)?,
            env: workload_env(&rec, run_config, self.app_secrets(&rec.app)?),
            memory_mb: guest.memory_mb,
            image: image.as_ref().map(|(i, root)| LaunchImage {
                root: root.clone(),
                cwd: i.config.working_dir.clone(),
                user: i.config.user.clone(),
                cpus: guest.cpus,
                shared_cpu: rec
                    .config
                    .guest
                    .as_ref()
                    .and_then(|g| g.cpu_kind.as_deref())
                    .is_none_or(|kind| kind != "performance"),
                builtin: rec.config.image == ECHO_IMAGE,
                address,
            }),
        };
        rec.state = MachineState::Starting;
        rec.updated_at = now_rfc3339();
        self.save(&mut rec)?;
        let pid = self
            .runtime
            .spawn(id, &launch)
            .await
            .map_err(|e| FlydError::runtime(id, e))?;
        rec.pilot_pid = Some(pid);
        self.store.put_machine(&rec)?;
        Ok(())
    }

    /// The image machine `rec` runs and where its root is unpacked; none
    /// for a host command. An image gone from the store (removed by hand)
    /// is pulled again by its name.
    fn machine_image(
        &self,
        rec: &MachineRecord,
    ) -> Result<Option<(crate::images::ImageRecord, std::path::PathBuf)>, FlydError> {
        let Some(image_ref) = &rec.image_ref else {
            return Ok(None);
        };
        let found = self.images.get(&image_ref.digest).and_then(|image| {
            let root = self.images.rootfs_path(&image.digest)?;
            root.is_dir().then_some((image, root))
        });
        found.map(Some).ok_or_else(|| FlydError::Runtime {
            id: rec.id.clone(),
            reason: format!(
                "its image {} ({}) is no longer on this host: update the machine to pull it again",
                rec.config.image, image_ref.digest
            ),
        })
    }

    /// Waits until every service port accepts a connection. A workload that
    /// exits meanwhile fails the start; one that is merely slow is reported
    /// started after `ready_timeout_ms`, as Fly reports a machine started
    /// once its process runs.
    pub(crate) async fn step_ready(&self, id: &str) -> Result<(), FlydError> {
        let rec = self.record(id)?;
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
                if !self.runtime.accepts(id, SocketAddr::from((ip, port))).await {
                    still.push(port);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if let Some(exit) = self.runtime.exited(id).await {
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

    pub(crate) fn step_started(self: &Arc<Self>, id: &str) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        if rec.state != MachineState::Started {
            // A new run: its checks start over, so a machine with service
            // checks takes traffic once they pass.
            rec.checks = initial_statuses(&rec.config);
            rec.transition(MachineState::Started, "start", "user", None);
            self.save(&mut rec)?;
        }
        self.watch_exit(id.to_string(), rec.pilot_pid);
        self.watch_checks(id, rec.pilot_pid)
    }

    pub(crate) async fn step_signal(&self, id: &str, input: StopInput) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        if !rec.has_process() {
            return Ok(());
        }
        if rec.state != MachineState::Stopping {
            rec.state = MachineState::Stopping;
            rec.updated_at = now_rfc3339();
            self.save(&mut rec)?;
        }
        // A workload that is gone has nothing left to signal; the next
        // step reads how it ended. A suspended workload must run to handle
        // its stop signal.
        let _ = self.runtime.thaw(id).await;
        if let Err(e) = self.runtime.signal(id, input.signal).await {
            tracing::debug!(machine = id, error = %e, "stop signal not delivered");
        }
        Ok(())
    }

    pub(crate) async fn step_exited(&self, id: &str, input: StopInput) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        if rec.state != MachineState::Stopping {
            return Ok(());
        }
        let grace = Duration::from_millis(input.timeout_ms);
        let exit = match tokio::time::timeout(grace, self.runtime.wait_exit(id)).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::info!(machine = id, ?grace, "stop timeout passed; sending SIGKILL");
                self.kill(id).await?
            }
        };
        rec.pilot_pid = None;
        let request = serde_json::json!({ "exit_event": exit, "signal": input.signal });
        rec.transition(MachineState::Stopped, "stop", "user", Some(request));
        self.save(&mut rec)
    }

    pub(crate) async fn step_teardown(&self, id: &str) -> Result<(), FlydError> {
        if self.runtime.alive(id).await {
            self.kill(id).await?;
        }
        self.runtime
            .remove(id)
            .await
            .map_err(|e| FlydError::runtime(id, e))
    }

    /// Freezes the workload: memory stays, the CPU is freed.
    pub(crate) async fn step_freeze(&self, id: &str) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        if rec.state == MachineState::Suspended {
            return Ok(());
        }
        if !self.runtime.alive(id).await {
            return Err(FlydError::Runtime {
                id: id.to_string(),
                reason: "workload is not running; nothing to suspend".into(),
            });
        }
        rec.state = MachineState::Suspending;
        rec.updated_at = now_rfc3339();
        self.save(&mut rec)?;
        if let Err(e) = self.runtime.freeze(id).await {
            // Not frozen: it is still started.
            rec.state = MachineState::Started;
            rec.updated_at = now_rfc3339();
            self.save(&mut rec)?;
            return Err(FlydError::runtime(id, e));
        }
        rec.transition(MachineState::Suspended, "suspend", "user", None);
        self.save(&mut rec)
    }

    /// Replaces the config with the update's, listing the old version.
    pub(crate) fn step_reconfigure(&self, run: &FsmRun) -> Result<(), FlydError> {
        let input: UpdateInput =
            serde_json::from_value(run.input.clone()).map_err(|e| FlydError::Runtime {
                id: run.machine_id.clone(),
                reason: format!("update input does not decode: {e}"),
            })?;
        let mut rec = self.record(&run.machine_id)?;
        if rec.version == input.version {
            return Ok(()); // applied before a crash
        }
        rec.versions.insert(
            0,
            MachineVersion {
                version: rec.version.clone(),
                user_config: rec.config.clone(),
            },
        );
        rec.versions.truncate(MAX_VERSIONS);
        rec.version = input.version;
        rec.config = input.config;
        rec.image_ref = input.image_ref;
        if let Some(name) = input.name.filter(|n| !n.is_empty()) {
            rec.name = name;
        }
        let state = rec.state;
        rec.transition(state, "update", "user", None);
        self.save(&mut rec)
    }

    /// Sets `cordoned` as the run's input says.
    pub(crate) fn step_cordon(&self, run: &FsmRun) -> Result<(), FlydError> {
        let cordoned = run.input.get("cordoned").and_then(|v| v.as_bool()) == Some(true);
        let mut rec = self.record(&run.machine_id)?;
        if rec.cordoned != cordoned {
            rec.cordoned = cordoned;
            rec.updated_at = now_rfc3339();
            self.save(&mut rec)?;
        }
        Ok(())
    }

    /// Watches the workload of the run whose pilot is `pilot_pid`. When it
    /// exits on its own, records the exit and applies the restart policy:
    /// start again, destroy (`auto_destroy`), or stay stopped.
    pub(crate) fn watch_exit(self: &Arc<Self>, id: String, pilot_pid: Option<u32>) {
        let flyd = self.clone();
        tokio::spawn(async move {
            let exit = flyd.runtime.wait_exit(&id).await;
            // Queue behind any operation: a stop in progress records the exit itself.
            let Ok(_guard) = flyd.lock_machine(&id).await else {
                tracing::warn!(machine = %id, "exit not recorded: machine stayed busy");
                return;
            };
            if let Err(e) = flyd.on_exit(&id, pilot_pid, exit).await {
                tracing::error!(machine = %id, error = %e, "handling a workload exit");
            }
        });
    }

    async fn on_exit(
        self: &Arc<Self>,
        id: &str,
        pilot_pid: Option<u32>,
        exit: ExitInfo,
    ) -> Result<(), FlydError> {
        let mut rec = self.record(id)?;
        let running = matches!(rec.state, MachineState::Started | MachineState::Suspended);
        if !running || rec.pilot_pid != pilot_pid {
            return Ok(()); // an operation already dealt with this exit
        }
        tracing::info!(machine = %id, exit = %describe_exit(exit), "workload exited");
        let most = Duration::from_millis(self.cfg.restart_backoff_max_ms);
        if rec.up_for().is_some_and(|up| up >= most) {
            // It ran well for a while: a new run of restarts begins.
            rec.restarts = 0;
        }
        rec.pilot_pid = None;
        let event = serde_json::json!({ "exit_event": exit });
        rec.transition(MachineState::Stopped, "exit", "flyd", Some(event));
        match after_exit(&rec.config, exit, rec.restarts) {
            AfterExit::Restart => {
                let pause = restart_pause(
                    rec.restarts,
                    Duration::from_millis(self.cfg.restart_backoff_ms),
                    most,
                );
                rec.restarts += 1;
                self.save(&mut rec)?;
                tracing::info!(machine = %id, restarts = rec.restarts, ?pause, "restarting under the restart policy");
                if pause.is_zero() {
                    return self
                        .run(FsmRun::new(FsmKind::Start, id, serde_json::Value::Null))
                        .await;
                }
                self.restart_after(id.to_string(), pause, rec.restarts, rec.version.clone());
                Ok(())
            }
            AfterExit::Destroy => {
                self.save(&mut rec)?;
                tracing::info!(machine = %id, "auto_destroy: destroying the exited machine");
                self.run(FsmRun::new(FsmKind::Destroy, id, serde_json::Value::Null))
                    .await
            }
            AfterExit::Stay => self.save(&mut rec),
        }
    }

    /// Starts the machine again after `pause`, unless meanwhile someone
    /// else acted on it (it is no longer stopped, was started by a user,
    /// or updated). The machine's lock is not held while waiting.
    fn restart_after(
        self: &Arc<Self>,
        id: String,
        pause: Duration,
        restarts: u32,
        version: String,
    ) {
        let flyd = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let Ok(_guard) = flyd.lock_machine(&id).await else {
                tracing::warn!(machine = %id, "restart skipped: machine stayed busy");
                return;
            };
            let due = flyd.record(&id).is_ok_and(|rec| {
                rec.state == MachineState::Stopped
                    && rec.restarts == restarts
                    && rec.version == version
            });
            if !due {
                return;
            }
            let run = FsmRun::new(FsmKind::Start, &id, serde_json::Value::Null);
            if let Err(e) = flyd.run(run).await {
                tracing::error!(machine = %id, error = %e, "restarting under the restart policy");
            }
        });
    }
}

/// The pause before a restart, `restarts` restarts into a run of them: none
/// for the first, then `first`, doubling up to `most`.
pub(crate) fn restart_pause(restarts: u32, first: Duration, most: Duration) -> Duration {
    match restarts {
        0 => Duration::ZERO,
        n => first.saturating_mul(1 << (n - 1).min(20)).min(most),
    }
}

/// What the restart policy says after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterExit {
    Restart,
    Destroy,
    Stay,
}

/// The restart policy: `always` restarts, `no` never does, and `on-failure`
/// (the default) restarts a failed workload up to `max_retries` times in a
/// row. A machine not restarted is destroyed if it has `auto_destroy`.
pub(crate) fn after_exit(config: &MachineConfig, exit: ExitInfo, restarts: u32) -> AfterExit {
    let restart = config.restart.clone().unwrap_or_default();
    let failed = exit.exit_code != Some(0);
    let again = match restart.policy.as_deref() {
        Some("always") => true,
        Some("no") => false,
        _ => failed && restarts < restart.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
    };
    if again {
        AfterExit::Restart
    } else if config.auto_destroy == Some(true) {
        AfterExit::Destroy
    } else {
        AfterExit::Stay
    }
}

pub(crate) fn stop_input(run: &FsmRun) -> Result<StopInput, FlydError> {
    serde_json::from_value(run.input.clone()).map_err(|e| FlydError::Runtime {
        id: run.machine_id.clone(),
        reason: format!("stop input does not decode: {e}"),
    })
}

pub(crate) fn describe_exit(exit: ExitInfo) -> String {
    match (exit.exit_code, exit.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "exit status unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_api::machine::MachineRestart;

    fn exit(code: i32) -> ExitInfo {
        ExitInfo {
            exit_code: Some(code),
            signal: None,
        }
    }

    #[test]
    fn restart_policy_decides_after_an_exit() {
        let mut cfg = MachineConfig::default();
        // Default on-failure: failures restart up to 10 times, clean exits stay.
        assert_eq!(after_exit(&cfg, exit(1), 0), AfterExit::Restart);
        assert_eq!(after_exit(&cfg, exit(1), 10), AfterExit::Stay);
        assert_eq!(after_exit(&cfg, exit(0), 0), AfterExit::Stay);
        let killed = ExitInfo {
            exit_code: None,
            signal: Some(9),
        };
        assert_eq!(after_exit(&cfg, killed, 0), AfterExit::Restart);
        cfg.restart = Some(MachineRestart {
            policy: Some("on-failure".into()),
            max_retries: Some(2),
        });
        assert_eq!(after_exit(&cfg, exit(3), 2), AfterExit::Stay);
        cfg.restart = Some(MachineRestart {
            policy: Some("always".into()),
            max_retries: None,
        });
        assert_eq!(after_exit(&cfg, exit(0), 100), AfterExit::Restart);
        cfg.restart = Some(MachineRestart {
            policy: Some("no".into()),
            max_retries: None,
        });
        assert_eq!(after_exit(&cfg, exit(1), 0), AfterExit::Stay);
        cfg.auto_destroy = Some(true);
        assert_eq!(after_exit(&cfg, exit(1), 0), AfterExit::Destroy);
    }
}

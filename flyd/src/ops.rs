//! The lifecycle operations flyd serves: each checks its preconditions (and
//! the machine's lease) under the machine's operation lock, then runs its
//! FSM. Also the read-only views: get, list, wait, events, versions.

use crate::capacity::Guest;
use crate::flyd::{Flyd, FlydError, StopInput};
use crate::fsm::{FsmKind, FsmRun};
use crate::images::{ImagePin, ImageRecord};
use crate::record::{MachineRecord, now_rfc3339};
use crate::steps::UpdateInput;
use crate::workload::{check_host_command, workload_argv};
use hangar_api::duration::GoDuration;
use hangar_api::host::HostCreateRequest;
use hangar_api::machine::{
    CreateLeaseRequest, HOST_IMAGE, Machine, MachineEvent, MachineState, MachineVersion,
    StartResponse, StopRequest, UpdateMachineRequest, WaitResponse,
};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

/// What `wait` waits for.
#[derive(Debug, Clone, Default)]
pub struct WaitFor {
    pub states: Vec<MachineState>,
    /// Only this version (`version` or `instance_id`) counts.
    pub version: Option<String>,
    /// Only an event after this one counts.
    pub from_event_id: Option<String>,
}

/// Parses a signal name (`SIGINT`, `INT`) or number.
pub(crate) fn parse_signal(text: &str) -> Result<i32, FlydError> {
    let name = text.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let n = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "TRAP" => 5,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
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

fn precondition(id: &str, op: &str, state: MachineState) -> FlydError {
    FlydError::Precondition(format!("unable to {op} machine {id} from state '{state}'"))
}

impl Flyd {
    /// Starts an operation on machine `id`: takes its lock (queueing behind
    /// the one in progress), reads its record, and checks the caller's lease.
    pub(crate) async fn begin(
        &self,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<(OwnedMutexGuard<()>, MachineRecord), FlydError> {
        let guard = self.lock_machine(id).await?;
        let rec = self.record(id)?;
        self.check_lease(&rec, nonce)?;
        Ok((guard, rec))
    }

    /// Creates a machine and, unless `skip_launch`, starts it. With
    /// `skip_service_registration` it starts cordoned; with `lease_ttl` the
    /// answer carries the nonce of a new lease.
    pub async fn create(self: &Arc<Self>, req: HostCreateRequest) -> Result<Machine, FlydError> {
        let m = req.machine;
        m.config.validate().map_err(FlydError::BadRequest)?;
        check_host_command(&m.config, self.cfg.host_commands)?;
        // Pulled before anything is recorded: an image that cannot be had
        // fails the create and leaves nothing behind. The pin keeps it
        // until the record names it.
        let (image, _pin) = self.resolve_image(&m.config.image).await?;
        workload_argv(&m.config, image.as_ref().map(|i| &i.config))?;
        let image_ref = image.map(|i| i.image_ref(&m.config.image));
        let id = random_machine_id();
        let now = now_rfc3339();
        let rec = MachineRecord {
            name: m
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("{}-{id}", req.app)),
            id: id.clone(),
            app: req.app,
            region: self.cfg.region.to_string(),
            host: self.cfg.host_id.clone(),
            state: MachineState::Created,
            private_ip: self.allocate_ip(self.address_block(&m.config))?.to_string(),
            image_ref,
            config: m.config,
            version: ulid::Ulid::new().to_string(),
            created_at: now.clone(),
            updated_at: now,
            cordoned: m.skip_service_registration,
            events: Vec::new(),
            rib_version: 0,
            pilot_pid: None,
            lease: None,
            versions: Vec::new(),
            restarts: 0,
            checks: Vec::new(),
        };
        let guest = Guest::of(&rec.config);
        self.reserve(guest)?;
        let guard = self.lock_machine(&id).await?;
        let mut input = serde_json::to_value(&rec).expect("records serialize");
        input["skip_launch"] = m.skip_launch.into();
        if let Err(e) = self.run(FsmRun::new(FsmKind::Create, &id, input)).await {
            // A machine that was never recorded reserves nothing.
            if self.store.machine(&id)?.is_none() {
                self.release(guest);
            }
            return Err(e);
        }
        drop(guard);
        let mut machine = self.record(&id)?.to_api();
        if let Some(ttl) = m.lease_ttl {
            let req = CreateLeaseRequest {
                ttl: Some(ttl),
                description: Some("taken with create".into()),
            };
            machine.nonce = Some(self.lease_acquire(&id, None, req).await?.nonce);
        }
        Ok(machine)
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

    /// Forgets every machine of `app`, once all are destroyed (412 while
    /// one is not): a deleted app's name, made again by anyone, must not
    /// show its machines, config or env. Returns how many were forgotten.
    pub fn purge_app(&self, app: &str) -> Result<usize, FlydError> {
        let records: Vec<MachineRecord> = self
            .store
            .machines()?
            .into_iter()
            .filter(|m| m.app == app)
            .collect();
        if let Some(live) = records.iter().find(|m| m.state != MachineState::Destroyed) {
            return Err(precondition(&live.id, "forget", live.state));
        }
        let ids: Vec<String> = records.into_iter().map(|m| m.id).collect();
        self.store.delete_machines(&ids)?;
        if !ids.is_empty() {
            tracing::info!(
                app,
                machines = ids.len(),
                "forgot the machines of a deleted app"
            );
        }
        Ok(ids.len())
    }

    /// Starts a created or stopped machine, or resumes a suspended one.
    pub async fn start(
        self: &Arc<Self>,
        id: &str,
        nonce: Option<&str>,
    ) -> Result<StartResponse, FlydError> {
        let (_guard, mut rec) = self.begin(id, nonce).await?;
        let previous = rec.state;
        if !matches!(
            previous,
            MachineState::Created
                | MachineState::Stopped
                | MachineState::Failed
                | MachineState::Suspended
        ) {
            return Err(precondition(id, "start", previous));
        }
        if rec.restarts != 0 {
            // A user's start begins a new run of restart attempts.
            rec.restarts = 0;
            self.store.put_machine(&rec)?;
        }
        self.run(FsmRun::new(FsmKind::Start, id, serde_json::Value::Null))
            .await?;
        Ok(StartResponse {
            previous_state: previous,
            migrated: false,
            new_host: String::new(),
        })
    }

    /// Stops a running (or suspended) machine: the signal, then SIGKILL
    /// after the timeout.
    pub async fn stop(
        self: &Arc<Self>,
        id: &str,
        req: StopRequest,
        nonce: Option<&str>,
    ) -> Result<(), FlydError> {
        let (_guard, rec) = self.begin(id, nonce).await?;
        if !rec.has_process() {
            return Err(precondition(id, "stop", rec.state));
        }
        let input = self.stop_input(&rec, &req)?;
        self.run(FsmRun::new(
            FsmKind::Stop,
            id,
            serde_json::to_value(input).expect("serializes"),
        ))
        .await
    }

    /// Suspends a started machine: its processes are frozen (SIGSTOP), and a
    /// start resumes them where they were.
    pub async fn suspend(self: &Arc<Self>, id: &str, nonce: Option<&str>) -> Result<(), FlydError> {
        let (_guard, rec) = self.begin(id, nonce).await?;
        if rec.state != MachineState::Started {
            return Err(precondition(id, "suspend", rec.state));
        }
        self.run(FsmRun::new(FsmKind::Suspend, id, serde_json::Value::Null))
            .await
    }

    /// Restarts a started machine: stop (signal, timeout) and start again.
    pub async fn restart(
        self: &Arc<Self>,
        id: &str,
        req: StopRequest,
        nonce: Option<&str>,
    ) -> Result<(), FlydError> {
        let (_guard, rec) = self.begin(id, nonce).await?;
        if rec.state != MachineState::Started {
            return Err(precondition(id, "restart", rec.state));
        }
        let input = self.stop_input(&rec, &req)?;
        self.run(FsmRun::new(
            FsmKind::Restart,
            id,
            serde_json::to_value(input).expect("serializes"),
        ))
        .await
    }

    /// Replaces the machine's config with a new version. A running machine
    /// is restarted on it; a stopped one is started unless `skip_launch`.
    /// `current_version` guards against lost updates (409).
    pub async fn update(
        self: &Arc<Self>,
        id: &str,
        req: UpdateMachineRequest,
        nonce: Option<&str>,
    ) -> Result<Machine, FlydError> {
        req.config.validate().map_err(FlydError::BadRequest)?;
        check_host_command(&req.config, self.cfg.host_commands)?;
        // Before the machine's lock: a pull can take a while.
        let (image, _pin) = self.resolve_image(&req.config.image).await?;
        workload_argv(&req.config, image.as_ref().map(|i| &i.config))?;
        let image_ref = image.map(|i| i.image_ref(&req.config.image));
        let (_guard, rec) = self.begin(id, nonce).await?;
        if rec.state == MachineState::Destroyed {
            return Err(precondition(id, "update", rec.state));
        }
        if let Some(current) = req.current_version.as_deref().filter(|v| !v.is_empty()) {
            if current != rec.version {
                return Err(FlydError::Conflict(format!(
                    "machine {id} is at version {}, not {current}: reload it and retry",
                    rec.version
                )));
            }
        }
        // Reserve a bigger guest before changing anything; return what a
        // smaller one frees once the update is recorded.
        let (old, new) = (Guest::of(&rec.config), Guest::of(&req.config));
        let grow = Guest {
            cpus: new.cpus.saturating_sub(old.cpus),
            memory_mb: new.memory_mb.saturating_sub(old.memory_mb),
        };
        let shrink = Guest {
            cpus: old.cpus.saturating_sub(new.cpus),
            memory_mb: old.memory_mb.saturating_sub(new.memory_mb),
        };
        if grow != Guest::default() {
            self.reserve(grow)?;
        }
        let stop = self.stop_input(&rec, &StopRequest::default())?;
        let update = UpdateInput {
            version: ulid::Ulid::new().to_string(),
            image_ref,
            config: req.config,
            name: req.name,
        };
        let mut input = serde_json::to_value(&update).expect("serializes");
        input["signal"] = stop.signal.into();
        input["timeout_ms"] = stop.timeout_ms.into();
        input["skip_launch"] = req.skip_launch.into();
        let result = self.run(FsmRun::new(FsmKind::Update, id, input)).await;
        let applied = self.record(id)?.version != rec.version;
        if applied && shrink != Guest::default() {
            self.release(shrink);
        } else if !applied && grow != Guest::default() {
            self.release(grow);
        }
        result?;
        Ok(self.record(id)?.to_api())
    }

    /// Resolves stop parameters: the request, then the machine's
    /// `stop_config`, then flyd's default (SIGINT, `stop_timeout_ms`); the
    /// grace period at most `max_stop_timeout_ms`.
    pub(crate) fn stop_input(
        &self,
        rec: &MachineRecord,
        req: &StopRequest,
    ) -> Result<StopInput, FlydError> {
        let stop_config = rec.config.stop_config.as_ref();
        let signal = req
            .signal
            .as_deref()
            .or_else(|| stop_config.and_then(|s| s.signal.as_deref()))
            .map(parse_signal)
            .transpose()?
            .unwrap_or(2);
        let timeout = req
            .timeout
            .or_else(|| stop_config.and_then(|s| s.timeout))
            .map(|d: GoDuration| d.0)
            .unwrap_or(Duration::from_millis(self.cfg.stop_timeout_ms))
            .min(Duration::from_millis(self.cfg.max_stop_timeout_ms));
        Ok(StopInput {
            signal,
            timeout_ms: timeout.as_millis() as u64,
        })
    }

    /// Destroys a machine; one with a running process only with `force`
    /// (it is killed).
    pub async fn destroy(
        self: &Arc<Self>,
        id: &str,
        force: bool,
        nonce: Option<&str>,
    ) -> Result<(), FlydError> {
        let (_guard, rec) = self.begin(id, nonce).await?;
        if rec.state == MachineState::Destroyed {
            return Err(FlydError::Precondition(format!(
                "machine {id} is already destroyed"
            )));
        }
        if rec.has_process() && !force {
            return Err(FlydError::Precondition(format!(
                "unable to destroy machine {id} in state '{}': stop it first or pass force=true",
                rec.state
            )));
        }
        self.run(FsmRun::new(
            FsmKind::Destroy,
            id,
            serde_json::json!({ "force": force }),
        ))
        .await
    }

    /// Cordons (no new traffic from the proxy) or uncordons a machine.
    pub async fn cordon(
        self: &Arc<Self>,
        id: &str,
        cordoned: bool,
        nonce: Option<&str>,
    ) -> Result<(), FlydError> {
        let (_guard, rec) = self.begin(id, nonce).await?;
        if rec.state == MachineState::Destroyed {
            let op = if cordoned { "cordon" } else { "uncordon" };
            return Err(precondition(id, op, rec.state));
        }
        self.run(FsmRun::new(
            FsmKind::Cordon,
            id,
            serde_json::json!({ "cordoned": cordoned }),
        ))
        .await
    }

    /// Waits until the machine satisfies `want`, or `timeout` passes (408).
    pub async fn wait(
        &self,
        id: &str,
        want: &WaitFor,
        timeout: Duration,
    ) -> Result<WaitResponse, FlydError> {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Mark seen before reading, so a change between the read and the
            // await still wakes us.
            changed.borrow_and_update();
            let rec = self.record(id)?;
            if let Some(event) = reached(&rec, want) {
                return Ok(WaitResponse {
                    ok: true,
                    state: rec.state,
                    event_id: event,
                    version: Some(rec.version),
                });
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(FlydError::WaitTimeout {
                    id: id.to_string(),
                    states: want
                        .states
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

    /// The machine's newest `limit` events.
    pub fn events(&self, id: &str, limit: usize) -> Result<Vec<MachineEvent>, FlydError> {
        let rec = self.record(id)?;
        Ok(rec.events.into_iter().take(limit).collect())
    }

    /// The current version and the earlier ones, newest first.
    pub fn versions(&self, id: &str) -> Result<Vec<MachineVersion>, FlydError> {
        let rec = self.record(id)?;
        let current = MachineVersion {
            version: rec.version,
            user_config: rec.config,
        };
        Ok(std::iter::once(current).chain(rec.versions).collect())
    }
}

/// Whether the record satisfies `want`; if so, the id of the event that
/// counts (the newest one).
fn reached(rec: &MachineRecord, want: &WaitFor) -> Option<Option<String>> {
    if !want.states.contains(&rec.state) {
        return None;
    }
    if want.version.as_deref().is_some_and(|v| v != rec.version) {
        return None;
    }
    let newest = rec.events.first().map(|e| e.id.clone());
    match &want.from_event_id {
        // Event ids are ULIDs: a later event sorts after.
        Some(from) => rec
            .events
            .iter()
            .any(|e| e.id.as_str() > from.as_str() && e.status == rec.state.as_str())
            .then_some(newest),
        None => Some(newest),
    }
}

impl Flyd {
    /// The images machines use (destroyed ones aside): digest → machine ids.
    pub fn images_in_use(&self) -> Result<BTreeMap<String, Vec<String>>, FlydError> {
        let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for rec in self.store.machines()? {
            if rec.state == MachineState::Destroyed {
                continue;
            }
            if let Some(image) = &rec.image_ref {
                used.entry(image.digest.clone()).or_default().push(rec.id);
            }
        }
        Ok(used)
    }

    /// Removes an image, or one of its names (409 while a machine uses it).
    pub async fn image_remove(&self, what: &str) -> Result<ImageRecord, FlydError> {
        let in_use = self.images_in_use()?;
        Ok(self.images.remove(what, &in_use).await?)
    }

    /// Removes every image no machine uses.
    pub async fn image_prune(&self) -> Result<Vec<ImageRecord>, FlydError> {
        let in_use = self.images_in_use()?;
        Ok(self.images.prune(&in_use, |_| true).await?)
    }

    /// The image a config names, pulled if need be, held until the pin
    /// drops; none for a host command.
    async fn resolve_image(
        &self,
        image: &str,
    ) -> Result<(Option<ImageRecord>, Option<ImagePin>), FlydError> {
        if image == HOST_IMAGE {
            return Ok((None, None));
        }
        let (rec, pin) = self.images.pull(image).await?;
        Ok((Some(rec), Some(pin)))
    }

    /// Pulls an image ahead of any machine (`hangar images pull`).
    pub async fn image_pull(&self, image: &str) -> Result<ImageRecord, FlydError> {
        Ok(self.images.refresh(image).await?.0)
    }

    /// Imports the images of an archive at `path` (`hangar images import`).
    pub async fn image_import(&self, path: &Path) -> Result<Vec<ImageRecord>, FlydError> {
        Ok(self.images.import(path).await?)
    }

    /// Every image on this host.
    pub fn image_list(&self) -> Vec<ImageRecord> {
        self.images.list()
    }

    /// Where uploads for `image_import` are staged (the store's `tmp/`,
    /// on the store's file system, cleared at start).
    pub fn image_staging(&self) -> PathBuf {
        self.images.staging()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("SIGINT").unwrap(), 2);
        assert_eq!(parse_signal("term").unwrap(), 15);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), 10);
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
}

//! A machine's workload: what runs (argv and environment), and the
//! operations on it that go through its pilot: signal, exec, ps.

use crate::flyd::{Flyd, FlydError};
use crate::ops::parse_signal;
use crate::pilot;
use crate::record::MachineRecord;
use hangar_api::machine::{
    ECHO_IMAGE, ExecRequest, ExecResponse, HOST_IMAGE, MachineState, ProcessStat,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Default and longest `exec` timeouts.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(600);

/// The program and arguments that run a machine's workload: the built-in
/// echo image, or a host command where `host_commands` allows it. An image
/// from a registry is pulled and recorded, but not run yet: that needs the
/// sandbox runtime, which is still to come.
pub(crate) fn workload_argv(
    exe: &Path,
    config: &hangar_api::MachineConfig,
    host_commands: bool,
) -> Result<Vec<String>, FlydError> {
    if config.image == ECHO_IMAGE {
        return Ok(vec![exe.display().to_string(), "echo".to_string()]);
    }
    if config.image != HOST_IMAGE {
        return Err(FlydError::BadRequest(format!(
            "config.image: {:?} is stored on this host, but machines cannot run registry images yet (no sandbox runtime): create it with skip_launch, or use {ECHO_IMAGE:?}",
            config.image
        )));
    }
    if !host_commands {
        return Err(FlydError::BadRequest(format!(
            "config.image: {HOST_IMAGE:?} runs a host command outside any sandbox, and flyd.host_commands is off on this host"
        )));
    }
    let init = config.init.clone().unwrap_or_default();
    let argv = if !init.exec.is_empty() {
        init.exec
    } else {
        [init.entrypoint, init.cmd].concat()
    };
    if argv.is_empty() {
        return Err(FlydError::BadRequest(format!(
            "config.init.exec: {HOST_IMAGE:?} needs the command to run"
        )));
    }
    Ok(argv)
}

/// The workload's environment: the config's `env`, the app's secrets, and
/// Fly's variables.
pub(crate) fn workload_env(
    rec: &MachineRecord,
    secrets: Vec<(String, String)>,
) -> BTreeMap<String, String> {
    // Config env, then app secrets over it, then Fly's variables over both.
    let mut env = rec.config.env.clone();
    env.extend(secrets);
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

impl Flyd {
    /// The record of a machine whose workload runs (412 otherwise).
    fn running(&self, id: &str, op: &str) -> Result<MachineRecord, FlydError> {
        let rec = self.record(id)?;
        if rec.state != MachineState::Started {
            return Err(FlydError::Precondition(format!(
                "unable to {op} machine {id} in state '{}': it must be started",
                rec.state
            )));
        }
        Ok(rec)
    }

    /// Sends a signal to the workload's process group.
    pub async fn signal(
        &self,
        id: &str,
        signal: &str,
        nonce: Option<&str>,
    ) -> Result<(), FlydError> {
        let signal = parse_signal(signal)?;
        let _guard = self.lock_machine(id).await?;
        let rec = self.running(id, "signal")?;
        self.check_lease(&rec, nonce)?;
        self.runtime
            .signal(id, signal)
            .await
            .map_err(|e| FlydError::runtime(id, e))
    }

    /// Runs a command beside the workload, with its environment, and
    /// returns its exit status and output.
    pub async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExecResponse, FlydError> {
        let argv = if !req.command.is_empty() {
            req.command
        } else {
            req.cmd
                .as_deref()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        if argv.is_empty() {
            return Err(FlydError::BadRequest("command: required".into()));
        }
        let timeout = req
            .timeout
            .map(Duration::from_secs)
            .unwrap_or(EXEC_TIMEOUT)
            .min(MAX_EXEC_TIMEOUT);
        // No operation lock: a long exec must not hold up a stop.
        self.running(id, "exec")?;
        let call = pilot::ExecCall {
            argv,
            timeout_ms: timeout.as_millis() as u64,
            stdin: req.stdin,
        };
        self.runtime
            .exec(id, &call)
            .await
            .map_err(|e| FlydError::runtime(id, e))
    }

    /// The workload's processes.
    pub async fn ps(&self, id: &str) -> Result<Vec<ProcessStat>, FlydError> {
        self.running(id, "list processes of")?;
        self.runtime
            .ps(id)
            .await
            .map_err(|e| FlydError::runtime(id, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_echo_or_an_allowed_host_command() {
        let exe = Path::new("/bin/hangar");
        let mut cfg = hangar_api::MachineConfig {
            image: ECHO_IMAGE.into(),
            ..Default::default()
        };
        assert_eq!(
            workload_argv(exe, &cfg, false).unwrap(),
            ["/bin/hangar", "echo"]
        );
        cfg.image = "nginx".into();
        assert!(matches!(
            workload_argv(exe, &cfg, true),
            Err(FlydError::BadRequest(_))
        ));
        cfg.image = HOST_IMAGE.into();
        cfg.init = Some(hangar_api::machine::MachineInit {
            cmd: vec!["sleep".into(), "5".into()],
            ..Default::default()
        });
        assert_eq!(workload_argv(exe, &cfg, true).unwrap(), ["sleep", "5"]);
        let e = workload_argv(exe, &cfg, false).unwrap_err();
        assert!(e.to_string().contains("host_commands is off"), "{e}");
    }
}

//! A machine's workload: what runs (argv and environment), and the
//! operations on it that go through its pilot: signal, exec, ps.

use crate::flyd::{Flyd, FlydError};
use crate::images::RunConfig;
use crate::ops::parse_signal;
use crate::pilot;
use crate::record::MachineRecord;
use hangar_api::machine::{ExecRequest, ExecResponse, HOST_IMAGE, MachineState, ProcessStat};
use std::collections::BTreeMap;
use std::time::Duration;

/// Default and longest `exec` timeouts.
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(600);

/// Checks that a config may run a host command (`hangar/host`): only
/// where `host_commands` is on, and with a command.
pub(crate) fn check_host_command(
    config: &hangar_api::MachineConfig,
    host_commands: bool,
) -> Result<(), FlydError> {
    if config.image != HOST_IMAGE {
        return Ok(());
    }
    if !host_commands {
        return Err(FlydError::BadRequest(format!(
            "config.image: {HOST_IMAGE:?} runs a host command outside any sandbox, and flyd.host_commands is off on this host"
        )));
    }
    if workload_argv(config, None).is_err() {
        return Err(FlydError::BadRequest(format!(
            "config.init.exec: {HOST_IMAGE:?} needs the command to run"
        )));
    }
    Ok(())
}

/// The program and arguments a machine runs, as Fly merges them:
/// `init.exec` replaces the image's command whole; otherwise
/// `init.entrypoint` and `init.cmd` each replace the image's `Entrypoint`
/// and `Cmd`.
pub(crate) fn workload_argv(
    config: &hangar_api::MachineConfig,
    image: Option<&RunConfig>,
) -> Result<Vec<String>, FlydError> {
    let init = config.init.clone().unwrap_or_default();
    let argv = if !init.exec.is_empty() {
        init.exec
    } else {
        let (entrypoint, cmd) = image
            .map(|i| (i.entrypoint.clone(), i.cmd.clone()))
            .unwrap_or_default();
        let pick = |given: Vec<String>, default: Vec<String>| {
            if given.is_empty() { default } else { given }
        };
        [pick(init.entrypoint, entrypoint), pick(init.cmd, cmd)].concat()
    };
    if argv.is_empty() {
        return Err(FlydError::BadRequest(format!(
            "config.image: {:?} names no command: set config.init.cmd or config.init.exec",
            config.image
        )));
    }
    Ok(argv)
}

/// The workload's environment: the config's `env`, the app's secrets, and
/// Fly's variables.
pub(crate) fn workload_env(
    rec: &MachineRecord,
    image: Option<&RunConfig>,
    secrets: Vec<(String, String)>,
) -> BTreeMap<String, String> {
    // The image's env, the config's over it, then app secrets, then Fly's
    // variables over all.
    let mut env: BTreeMap<String, String> = image
        .into_iter()
        .flat_map(|i| &i.env)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.extend(rec.config.env.clone());
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
    fn commands_merge_as_on_fly() {
        let image = RunConfig {
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["httpd -f".into()],
            ..RunConfig::default()
        };
        let mut cfg = hangar_api::MachineConfig {
            image: "busybox".into(),
            ..Default::default()
        };
        let argv = |cfg: &hangar_api::MachineConfig| workload_argv(cfg, Some(&image)).unwrap();
        assert_eq!(argv(&cfg), ["/bin/sh", "-c", "httpd -f"]);
        cfg.init = Some(hangar_api::machine::MachineInit {
            cmd: vec!["echo hi".into()],
            ..Default::default()
        });
        assert_eq!(argv(&cfg), ["/bin/sh", "-c", "echo hi"]);
        cfg.init = Some(hangar_api::machine::MachineInit {
            entrypoint: vec!["/bin/busybox".into()],
            ..Default::default()
        });
        assert_eq!(argv(&cfg), ["/bin/busybox", "httpd -f"]);
        cfg.init = Some(hangar_api::machine::MachineInit {
            exec: vec!["/bin/true".into()],
            cmd: vec!["ignored".into()],
            ..Default::default()
        });
        assert_eq!(argv(&cfg), ["/bin/true"]);
        cfg.init = None;
        assert!(workload_argv(&cfg, Some(&RunConfig::default())).is_err());
    }

    #[test]
    fn host_commands_need_the_switch_and_a_command() {
        let mut cfg = hangar_api::MachineConfig {
            image: HOST_IMAGE.into(),
            ..Default::default()
        };
        assert!(
            check_host_command(&cfg, true)
                .unwrap_err()
                .to_string()
                .contains("init.exec")
        );
        cfg.init = Some(hangar_api::machine::MachineInit {
            exec: vec!["sleep".into(), "5".into()],
            ..Default::default()
        });
        check_host_command(&cfg, true).unwrap();
        let e = check_host_command(&cfg, false).unwrap_err();
        assert!(e.to_string().contains("host_commands is off"), "{e}");
        cfg.image = "busybox".into();
        check_host_command(&cfg, false).unwrap();
    }
}

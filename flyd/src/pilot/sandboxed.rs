//! pilot's side of a sandbox: the machine's container, run by runc from
//! the bundle flyd prepared (`runtime::sandbox`).
//!
//! pilot runs `runc run --detach`: runc creates the container (its
//! namespaces, cgroup, root, seccomp filter, capabilities), starts its
//! init, and exits. The init, whose parent runc was, is then reparented to
//! pilot, a child subreaper, so pilot waits for it as for any child, and
//! the container's output (runc passes pilot's pipes through) goes to
//! `machine.log` as a host workload's does. No runc process stays beside a
//! running machine.

use super::{ExitInfo, Started};
use hangar_api::machine::ProcessStat;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The container pilot runs: written by flyd into pilot's spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The OCI runtime (runc).
    pub runc: PathBuf,
    /// runc's state directory (`--root`).
    pub state: PathBuf,
    /// The bundle: `config.json`, and where the init's pid is written.
    pub bundle: PathBuf,
    /// The container's name (the machine's id).
    pub container: String,
    /// The mount point of the container's root.
    pub root: PathBuf,
    /// The container's freezer: `freezer.state` (cgroup v1) or
    /// `cgroup.freeze` (v2).
    pub freezer: Option<PathBuf>,
}

/// How long runc may take to create and start the container.
const RUNC_WAIT: Duration = Duration::from_secs(30);

fn runc(spec: &SandboxSpec) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&spec.runc);
    cmd.arg("--root").arg(&spec.state);
    cmd
}

/// Creates and starts the container; its init's pid, output and exit.
pub(super) async fn start(spec: &SandboxSpec) -> Result<Started, String> {
    let pid_file = spec.bundle.join("init.pid");
    let _ = std::fs::remove_file(&pid_file);
    let mut child = runc(spec)
        .arg("run")
        .arg("--detach")
        .arg("--bundle")
        .arg(&spec.bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&spec.container)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", spec.runc.display()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let status = tokio::time::timeout(RUNC_WAIT, child.wait())
        .await
        .map_err(|_| format!("runc did not start the container within {RUNC_WAIT:?}"))?
        .map_err(|e| format!("waiting for runc: {e}"))?;
    if !status.success() {
        // No container holds the pipe: runc's error is all there is.
        let mut text = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut text),
        )
        .await;
        // Nothing runs: what runc made, and the root flyd mounted, go now
        // (the machine is recorded stopped, and may never start again).
        clean_up(spec);
        return Err(runc_error(&String::from_utf8_lossy(&text)));
    }
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| format!("reading {}: {e}", pid_file.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", pid_file.display()))?;
    Ok(Started {
        pid,
        stdout: Box::new(stdout),
        stderr: Box::new(stderr),
        exit: Box::pin(async move {
            tokio::task::spawn_blocking(move || wait(pid))
                .await
                .map_err(std::io::Error::other)?
        }),
    })
}

/// runc's error, without its log decoration (`time=... level=error
/// msg="..."`).
fn runc_error(text: &str) -> String {
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("runc failed without saying why");
    match line.split_once("msg=\"") {
        Some((_, msg)) => format!("runc: {}", msg.trim_end_matches('"').replace("\\\"", "\"")),
        None => format!("runc: {}", line.trim()),
    }
}

/// Waits for the init, pilot's child since runc exited.
fn wait(pid: u32) -> std::io::Result<ExitInfo> {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
            // `hangar init` reports a command killed by signal N as 128 + N.
            Ok(WaitStatus::Exited(_, code)) if code > 128 && code <= 128 + 64 => {
                return Ok(ExitInfo {
                    exit_code: None,
                    signal: Some(code - 128),
                });
            }
            Ok(WaitStatus::Exited(_, code)) => {
                return Ok(ExitInfo {
                    exit_code: Some(code),
                    signal: None,
                });
            }
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Ok(ExitInfo {
                    exit_code: None,
                    signal: Some(signal as i32),
                });
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Once the container's init is gone: removes the container (its cgroup
/// and runc's state; its network namespace, and the veth pair with it, go
/// with it), its bundle (the environment, secrets included) and unmounts
/// its root, so a stopped machine holds no mount, no link and no secret.
/// The next start makes them anew.
pub(super) fn clean_up(spec: &SandboxSpec) {
    let deleted = std::process::Command::new(&spec.runc)
        .arg("--root")
        .arg(&spec.state)
        .args(["delete", "--force", &spec.container])
        .output();
    if let Ok(out) = &deleted
        && !out.status.success()
    {
        tracing::warn!(
            error = %String::from_utf8_lossy(&out.stderr).trim(),
            "removing the container"
        );
    }
    if let Err(e) = crate::mounts::remove_mount(&spec.root) {
        tracing::warn!(error = %e, "unmounting the container's root");
    }
    if let Err(e) = std::fs::remove_dir_all(&spec.bundle) {
        tracing::warn!(error = %e, "removing the container's bundle");
    }
}

/// Sends `signal` to the container's init. From outside its PID
/// namespace, SIGKILL always lands, and takes every process of the
/// namespace with it.
pub(super) fn signal(pid: u32, signal: i32) {
    use nix::sys::signal::{Signal, kill};
    match Signal::try_from(signal) {
        Ok(sig) => {
            if let Err(e) = kill(nix::unistd::Pid::from_raw(pid as i32), sig) {
                tracing::warn!(pid, %sig, error = %e, "signalling the container's init failed");
            }
        }
        Err(e) => tracing::warn!(signal, error = %e, "not a signal"),
    }
}

/// Freezes or thaws the container's cgroup, and waits until the kernel
/// says it is so (a v1 freezer passes through FREEZING).
pub(super) async fn freeze(freezer: &Path, frozen: bool) -> Result<(), String> {
    let v1 = freezer.file_name().is_some_and(|n| n == "freezer.state");
    let (write, want) = match (v1, frozen) {
        (true, true) => ("FROZEN", "FROZEN"),
        (true, false) => ("THAWED", "THAWED"),
        (false, true) => ("1", "1"),
        (false, false) => ("0", "0"),
    };
    std::fs::write(freezer, write).map_err(|e| format!("{}: {e}", freezer.display()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = std::fs::read_to_string(freezer).unwrap_or_default();
        if now.trim() == want {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the freezer is {} after 5s, not {want}",
                now.trim()
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The live processes of the container: those in its init's PID
/// namespace (zombies, which an init that does not reap leaves, aside).
pub(super) fn processes(init: u32) -> Vec<ProcessStat> {
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let Some(ours) = ns(init) else {
        return Vec::new();
    };
    super::processes(|stat| !stat.zombie && ns(stat.pid).as_ref() == Some(&ours))
}

/// The argv that runs `argv` in the container, and the file runc writes
/// the command's pid to.
pub(super) fn exec_argv(spec: &SandboxSpec, argv: &[String]) -> (Vec<String>, PathBuf) {
    let pid_file = spec.bundle.join(format!("exec-{}.pid", ulid::Ulid::new()));
    let mut full = vec![
        spec.runc.display().to_string(),
        "--root".into(),
        spec.state.display().to_string(),
        "exec".into(),
        "--pid-file".into(),
        pid_file.display().to_string(),
        spec.container.clone(),
    ];
    full.extend(argv.iter().cloned());
    (full, pid_file)
}

/// Kills an exec's command in the container (killing runc does not
/// reach it).
pub(super) fn kill_exec(pid_file: &Path) {
    if let Ok(text) = std::fs::read_to_string(pid_file)
        && let Ok(pid) = text.trim().parse::<u32>()
    {
        signal(pid, 9);
    }
}

/// Reaps pilot's children that are dead processes of the sandbox (not
/// its init): an exec's command whose runc died before it. pilot's own
/// children (runc) live in the host's PID namespace and are left to
/// tokio.
pub(super) fn reap_strays(init: u32) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    for (pid, zombie) in super::children_of(std::process::id()) {
        if !zombie || pid == init {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let nested = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|ids| ids.split_whitespace().count() > 1);
        if nested {
            let _ = waitpid(
                nix::unistd::Pid::from_raw(pid as i32),
                Some(WaitPidFlag::WNOHANG),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_errors_are_told_plainly() {
        let text = "time=\"2026-12-07T22:11:31Z\" level=error msg=\"runc run failed: unable to start container process: exec: \\\"/nope\\\": stat /nope: no such file or directory\"\n";
        assert_eq!(
            runc_error(text),
            "runc: runc run failed: unable to start container process: exec: \"/nope\": stat /nope: no such file or directory"
        );
        assert_eq!(runc_error(""), "runc: runc failed without saying why");
    }
}

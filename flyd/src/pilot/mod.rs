//! pilot: the init of one machine, and flyd's client for it.
//!
//! flyd launches `hangar pilot --dir <machine dir>` per running machine.
//! pilot starts a new session (so it outlives flyd and never receives the
//! terminal's Ctrl-C), reads the [`PilotSpec`] flyd writes to its stdin,
//! runs the workload it describes as its child in a process group of its
//! own, appends the workload's stdout and stderr to `machine.log` (rotated
//! by size), and serves a control API on `pilot.sock` (mode 0600): one JSON
//! request per line, one JSON answer per line.
//!
//! pilot is its workload's child subreaper: whatever the workload leaves
//! running when it exits, detached with `setsid` or not, is reparented to
//! pilot and killed before the exit is reported, so nothing outlives its
//! machine. Commands run by `exec` get a process group of their own, killed
//! whole at their timeout, and their output is capped while it is read.
//!
//! The spec holds the app's opened secrets, so it never touches the disk:
//! it lives in flyd's and pilot's memory only, and the workload's
//! environment.
//!
//! | request | answer |
//! |---|---|
//! | `{"op":"status"}` | `{"pid":N,"exit":null}` or `{"pid":N,"exit":{...}}` |
//! | `{"op":"signal","signal":15}` | `{"ok":true}` (to the workload's group) |
//! | `{"op":"wait"}` | the [`ExitInfo`], once the workload has exited |
//! | `{"op":"exec","argv":[..],"timeout_ms":N}` | an [`ExecResponse`] |
//! | `{"op":"ps"}` | the workload group's [`ProcessStat`]s |
//!
//! Failures answer `{"error": "..."}` (with `"timeout": true` for an exec
//! that ran out of time).
//!
//! When the workload exits, pilot writes `exit.json` (so the exit status
//! survives when flyd is down), answers every waiter, and exits itself.
//! It prints `ready <workload pid>` on stdout once the socket is bound: flyd's
//! readiness signal.

mod sandboxed;

pub use sandboxed::SandboxSpec;

use crate::logfile::RotatingLog;
use hangar_api::machine::{ExecResponse, ProcessStat};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// What pilot runs: written by flyd to pilot's stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PilotSpec {
    pub machine_id: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The workload's whole environment (besides `PATH`, inherited).
    pub env: BTreeMap<String, String>,
    /// The cgroup to run in (memory limit), where flyd has one.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The sandbox to run the workload in (an image's machine); `None`
    /// runs `argv` as a host process.
    #[serde(default)]
    pub sandbox: Option<sandboxed::SandboxSpec>,
    /// `machine.log` is rotated past this size...
    pub log_max_bytes: u64,
    /// ...keeping this many rotated files.
    pub log_files: u32,
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// pilot's answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PilotStatus {
    pub pid: u32,
    pub exit: Option<ExitInfo>,
}

/// A command to run beside the workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecCall {
    pub argv: Vec<String>,
    pub timeout_ms: u64,
    #[serde(default)]
    pub stdin: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Status,
    Signal { signal: i32 },
    Wait,
    Exec(ExecCall),
    Ps,
    Freeze,
    Thaw,
}

/// Most output kept per stream of an exec (1 MiB).
const MAX_EXEC_OUTPUT: usize = 1 << 20;

/// Files of a machine directory.
fn socket_path(dir: &Path) -> PathBuf {
    dir.join("pilot.sock")
}
fn exit_path(dir: &Path) -> PathBuf {
    dir.join("exit.json")
}
/// The workload's log.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("machine.log")
}

/// How long pilot keeps answering after the workload exited: enough for
/// requests already accepted to be answered. Later callers read exit.json.
const LINGER: Duration = Duration::from_millis(100);

/// Runs pilot for the machine directory `dir` until its workload exits.
pub async fn run(dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    // A session of our own: flyd's exit or a terminal's signals do not reach us.
    nix::unistd::setsid().context("setsid")?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut text).context("reading the spec")?;
    let spec: PilotSpec = serde_json::from_slice(&text).context("decoding the spec")?;
    let spec = Arc::new(spec);
    let program = spec.argv.first().context("the spec's argv is empty")?;
    let _ = std::fs::remove_file(exit_path(dir));
    let log = RotatingLog::open(&log_path(dir), spec.log_max_bytes, spec.log_files)
        .context("opening machine.log")?;
    // What the workload leaves behind comes back to us, to be killed.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    if let Some(cgroup) = &spec.cgroup {
        // Before the workload starts, so it and its children inherit it.
        crate::cgroup::enter(cgroup).context("entering the machine's cgroup")?;
    }
    let started = match &spec.sandbox {
        None => start_host(&spec.env, program, &spec.argv[1..]),
        Some(sandbox) => sandboxed::start(sandbox).await,
    };
    let Started {
        pid,
        stdout,
        stderr,
        exit,
    } = match started {
        Ok(started) => started,
        Err(reason) => {
            // flyd reads this line in place of `ready`.
            println!("failed {}", reason.replace('\n', " "));
            anyhow::bail!("starting the workload: {reason}");
        }
    };
    let output = tokio::spawn(crate::logfile::copy_output(stdout, stderr, log));

    let sock = socket_path(dir);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    {
        // Whoever connects can signal and exec in the machine: owner only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", sock.display()))?;
    }
    let our_socket = socket_inode(&sock);
    let (exit_tx, exit_rx) = watch::channel(None::<ExitInfo>);
    println!("ready {pid}");
    tracing::info!(machine = %spec.machine_id, pid, "workload started");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut children = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    tokio::pin!(exit);
    let info = loop {
        tokio::select! {
            status = &mut exit => break status?,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_conn(stream, pid, spec.clone(), exit_rx.clone()));
                }
            }
            // Someone asked pilot to stop: pass it on, keep waiting for the exit.
            _ = term.recv() => deliver(&spec, pid, libc_sig::SIGTERM),
            // A process of the sandbox left to pilot (its runc exec died
            // first): reaped, or the sandbox's init could not end.
            _ = children.recv(), if spec.sandbox.is_some() => sandboxed::reap_strays(pid),
        }
    };
    sweep_descendants().await;
    if let Some(sandbox) = &spec.sandbox {
        sandboxed::clean_up(sandbox);
    }
    // Its output ends with it (what kept the pipes open is gone); the log
    // gets what is left of it.
    let _ = tokio::time::timeout(LINGER, output).await;
    std::fs::write(exit_path(dir), serde_json::to_vec(&info)?).context("writing exit.json")?;
    exit_tx.send_replace(Some(info));
    tracing::info!(machine = %spec.machine_id, ?info, "workload exited");
    // Keep answering for a moment: a waiter may be connecting right now.
    let linger = tokio::time::sleep(LINGER);
    tokio::pin!(linger);
    loop {
        tokio::select! {
            _ = &mut linger => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_conn(stream, pid, spec.clone(), exit_rx.clone()));
                }
            }
        }
    }
    // A new pilot for the next run may already have bound this path: only
    // remove the socket if it is still ours.
    if our_socket.is_some() && socket_inode(&sock) == our_socket {
        let _ = std::fs::remove_file(&sock);
    }
    Ok(())
}

/// A workload that started: its pid (the container's init, for a
/// sandbox), its output, and how it will end.
pub(crate) struct Started {
    pid: u32,
    stdout: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    stderr: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    exit: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<ExitInfo>> + Send>>,
}

impl ExitInfo {
    fn of(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            exit_code: status.code(),
            signal: status.signal(),
        }
    }
}

/// Starts `program` as a host process in a group of its own, so a signal
/// reaches everything it spawns.
fn start_host(
    env: &BTreeMap<String, String>,
    program: &str,
    args: &[String],
) -> Result<Started, String> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {program:?}: {e}"))?;
    let pid = child
        .id()
        .ok_or("the workload exited before it was watched")?;
    Ok(Started {
        pid,
        stdout: Box::new(child.stdout.take().expect("stdout is piped")),
        stderr: Box::new(child.stderr.take().expect("stderr is piped")),
        exit: Box::pin(async move { child.wait().await.map(ExitInfo::of) }),
    })
}

/// Sends `signal` to the workload: a host workload's whole group, or a
/// sandbox's init (which, as any init, passes it on or not).
fn deliver(spec: &PilotSpec, pid: u32, signal: i32) {
    if spec.sandbox.is_some() {
        sandboxed::signal(pid, signal);
    } else {
        signal_group(pid, signal);
    }
}

/// Kills every process left under pilot: the workload's descendants,
/// reparented to pilot (a child subreaper) as their parents die, and
/// commands of `exec`. Rounds of SIGKILL until none is left (zombies are
/// reaped), at most a second.
async fn sweep_descendants() {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitPidFlag, waitpid};
    use nix::unistd::Pid;
    let me = std::process::id();
    for _ in 0..100 {
        let mut live = 0;
        for (pid, zombie) in children_of(me) {
            let pid = Pid::from_raw(pid as i32);
            if zombie {
                let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
            } else {
                live += 1;
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        if live == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!("processes left by the workload survived SIGKILL for a second");
}

/// The children of `parent` (from /proc), each with whether it is a zombie.
fn children_of(parent: u32) -> Vec<(u32, bool)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces and parens.
            let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
            let state = rest.next()?;
            let ppid: u32 = rest.next()?.parse().ok()?;
            (ppid == parent).then_some((pid, state == "Z"))
        })
        .collect()
}

fn socket_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Signal numbers pilot sends on its own.
mod libc_sig {
    pub const SIGTERM: i32 = 15;
}

fn signal_group(pid: u32, signal: i32) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    match Signal::try_from(signal) {
        Ok(sig) => {
            if let Err(e) = killpg(Pid::from_raw(pid as i32), sig) {
                tracing::warn!(pid, %sig, error = %e, "signalling the workload failed");
            }
        }
        Err(e) => tracing::warn!(signal, error = %e, "not a signal"),
    }
}

async fn serve_conn(
    stream: UnixStream,
    pid: u32,
    spec: Arc<PilotSpec>,
    mut exit: watch::Receiver<Option<ExitInfo>>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => serde_json::to_value(PilotStatus {
                pid,
                exit: *exit.borrow(),
            }),
            Ok(Request::Signal { signal }) => {
                if exit.borrow().is_none() {
                    deliver(&spec, pid, signal);
                }
                Ok(serde_json::json!({ "ok": true }))
            }
            Ok(Request::Wait) => match exit.wait_for(|e| e.is_some()).await {
                Ok(info) => serde_json::to_value(*info),
                Err(_) => return,
            },
            Ok(Request::Exec(call)) => Ok(match exec_beside(&spec, &call).await {
                Ok(answer) => serde_json::to_value(answer).expect("serializes"),
                Err((error, timeout)) => serde_json::json!({ "error": error, "timeout": timeout }),
            }),
            Ok(Request::Ps) => serde_json::to_value(match &spec.sandbox {
                Some(_) => sandboxed::processes(pid),
                None => processes(|stat| stat.pgrp == pid),
            }),
            Ok(Request::Freeze) | Ok(Request::Thaw) => {
                let frozen = matches!(serde_json::from_str(&line), Ok(Request::Freeze));
                Ok(match freeze_workload(&spec, pid, frozen).await {
                    Ok(()) => serde_json::json!({ "ok": true }),
                    Err(e) => serde_json::json!({ "error": e }),
                })
            }
            Err(e) => Ok(serde_json::json!({ "error": format!("bad request: {e}") })),
        };
        let Ok(mut text) = answer.map(|v| v.to_string()) else {
            return;
        };
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Stops (`frozen`) or resumes every process of the workload: a host
/// workload's group by SIGSTOP and SIGCONT, a sandbox by its cgroup's
/// freezer, which no process can notice or resist.
async fn freeze_workload(spec: &PilotSpec, pid: u32, frozen: bool) -> Result<(), String> {
    match spec.sandbox.as_ref().and_then(|s| s.freezer.as_ref()) {
        Some(freezer) => sandboxed::freeze(freezer, frozen).await,
        None => {
            let signal = if frozen { 19 } else { 18 }; // SIGSTOP, SIGCONT
            deliver(spec, pid, signal);
            Ok(())
        }
    }
}

/// Runs `call` with the workload's environment (in its sandbox, if it has
/// one). Errors carry whether the command ran out of time.
async fn exec_beside(spec: &PilotSpec, call: &ExecCall) -> Result<ExecResponse, (String, bool)> {
    use std::os::unix::process::ExitStatusExt;
    let program = call
        .argv
        .first()
        .ok_or(("argv is empty".to_string(), false))?;
    // In a sandbox, runc runs it there, with the container's environment,
    // user and limits; its pid inside is written to a file, to be killed
    // at the timeout with runc's.
    let (program, args, env, inside) = match &spec.sandbox {
        Some(sandbox) => {
            let (argv, pid_file) = sandboxed::exec_argv(sandbox, &call.argv);
            (
                argv[0].clone(),
                argv[1..].to_vec(),
                BTreeMap::new(),
                Some(pid_file),
            )
        }
        None => (
            program.clone(),
            call.argv[1..].to_vec(),
            spec.env.clone(),
            None,
        ),
    };
    let mut child = tokio::process::Command::new(&program)
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&env)
        .stdin(if call.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, killed whole at the timeout.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| (format!("starting {program:?}: {e}"), false))?;
    let group = child.id();
    if let (Some(input), Some(mut stdin)) = (&call.stdin, child.stdin.take()) {
        let input = input.clone();
        tokio::spawn(async move {
            let _ = stdin.write_all(input.as_bytes()).await;
        });
    }
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (out, err, status) = tokio::join!(
            read_capped(stdout.expect("stdout is piped")),
            read_capped(stderr.expect("stderr is piped")),
            child.wait()
        );
        status.map(|status| (out, err, status))
    };
    let limit = Duration::from_millis(call.timeout_ms);
    let finished = tokio::time::timeout(limit, run).await;
    if let Some(pid_file) = inside {
        // The command in the sandbox first, so that runc, its parent,
        // reaps it and exits: killed before it, runc would leave it to
        // pilot, and the sandbox's init could not end until pilot reaped it.
        if finished.is_err() {
            sandboxed::kill_exec(&pid_file);
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    if let Some(group) = group {
        // Whatever it started in its group goes with it, finished or not
        // (usually nothing is left: the group is gone, which is no error).
        let group = nix::unistd::Pid::from_raw(group as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    }
    let (out, err, status) = finished
        .map_err(|_| (format!("command did not finish within {limit:?}"), true))?
        .map_err(|e| (format!("waiting for {program:?}: {e}"), false))?;
    Ok(ExecResponse {
        exit_code: status.code().unwrap_or(-1),
        exit_signal: status.signal(),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    })
}

/// Reads `from` to its end, keeping the first [`MAX_EXEC_OUTPUT`] bytes
/// (the rest is read and dropped, so a command never blocks on a full pipe
/// and never fills pilot's memory).
async fn read_capped(mut from: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_EXEC_OUTPUT - kept.len();
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The processes `keep` keeps, read from /proc.
pub(crate) fn processes(keep: impl Fn(&Stat) -> bool) -> Vec<ProcessStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<ProcessStat> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| process_stat(pid, &keep))
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

/// What [`processes`] selects by.
pub(crate) struct Stat {
    pub pid: u32,
    pub pgrp: u32,
    pub zombie: bool,
}

/// One process's stats, if `keep` keeps it.
fn process_stat(pid: u32, keep: impl Fn(&Stat) -> bool) -> Option<ProcessStat> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let pgrp: u32 = fields.get(2)?.parse().ok()?;
    let zombie = fields.first() == Some(&"Z");
    if !keep(&Stat { pid, pgrp, zombie }) {
        return None;
    }
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let command = std::fs::read(proc_dir.join("cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let rss_kb = std::fs::read_to_string(proc_dir.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Some(ProcessStat {
        pid,
        command,
        cpu: ticks(11) + ticks(12),
        rss: rss_kb * 1024,
        directory: std::fs::read_link(proc_dir.join("cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        listen_sockets: Vec::new(),
    })
}

// ---- flyd's side ----

/// A failed conversation with a pilot.
#[derive(Debug, thiserror::Error)]
pub enum PilotError {
    #[error("pilot of {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pilot of {dir}: {reason}")]
    Protocol { dir: String, reason: String },
    #[error("pilot of {dir}: {reason}")]
    Timeout { dir: String, reason: String },
}

/// Launches pilot for the machine directory `dir`, hands it `spec` on its
/// stdin, and waits for its ready line. Returns the pilot's pid.
pub async fn launch(
    exe: &Path,
    dir: &Path,
    spec: &PilotSpec,
    timeout: Duration,
) -> Result<u32, PilotError> {
    let io = |source| PilotError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let pilot_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pilot.log"))
        .map_err(io)?;
    let mut child = tokio::process::Command::new(exe)
        .arg("pilot")
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(pilot_log)
        .spawn()
        .map_err(io)?;
    let pilot_pid = child.id().unwrap_or_default();
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let text = serde_json::to_vec(spec).expect("specs serialize");
    // Closed once written: pilot reads to its end. A pilot that died
    // before reading shows below as one that never got ready.
    let _ = tokio::time::timeout(timeout, stdin.write_all(&text)).await;
    drop(stdin);
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut first = String::new();
    let read = tokio::time::timeout(timeout, BufReader::new(stdout).read_line(&mut first)).await;
    // pilot outlives us in its own session; tokio reaps it if it exits first.
    drop(child);
    match read {
        Ok(Ok(_)) if first.starts_with("ready ") => Ok(pilot_pid),
        Ok(Ok(_)) if first.starts_with("failed ") => Err(PilotError::Protocol {
            dir: dir.display().to_string(),
            reason: first["failed ".len()..].trim().to_string(),
        }),
        Ok(Ok(_)) => Err(PilotError::Protocol {
            dir: dir.display().to_string(),
            reason: format!(
                "exited before it was ready (see {})",
                dir.join("pilot.log").display()
            ),
        }),
        Ok(Err(e)) => Err(io(e)),
        Err(_) => Err(PilotError::Protocol {
            dir: dir.display().to_string(),
            reason: format!("not ready within {timeout:?}"),
        }),
    }
}

async fn ask(dir: &Path, request: &Request) -> Result<serde_json::Value, PilotError> {
    let io = |source| PilotError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let stream = UnixStream::connect(socket_path(dir)).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    write.write_all(line.as_bytes()).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| PilotError::Protocol {
        dir: dir.display().to_string(),
        reason: format!("unreadable answer {answer:?}: {e}"),
    })
}

/// The recorded exit of the machine's last run, if pilot wrote one.
pub fn recorded_exit(dir: &Path) -> Option<ExitInfo> {
    serde_json::from_slice(&std::fs::read(exit_path(dir)).ok()?).ok()
}

/// The workload's status, or `None` when no pilot answers (it has exited,
/// or never ran).
pub async fn status(dir: &Path) -> Option<PilotStatus> {
    let value = ask(dir, &Request::Status).await.ok()?;
    serde_json::from_value(value).ok()
}

/// Whether a pilot answers and its workload has not exited.
pub async fn alive(dir: &Path) -> bool {
    status(dir).await.is_some_and(|s| s.exit.is_none())
}

/// Sends `signal` to the workload's process group.
pub async fn signal(dir: &Path, signal: i32) -> Result<(), PilotError> {
    ask(dir, &Request::Signal { signal }).await.map(drop)
}

/// Stops (`frozen`) or resumes every process of the workload.
pub async fn freeze(dir: &Path, frozen: bool) -> Result<(), PilotError> {
    let request = if frozen {
        Request::Freeze
    } else {
        Request::Thaw
    };
    let answer = ask(dir, &request).await?;
    match answer.get("error").and_then(|e| e.as_str()) {
        Some(error) => Err(PilotError::Protocol {
            dir: dir.display().to_string(),
            reason: error.to_string(),
        }),
        None => Ok(()),
    }
}

/// Waits until the workload exits. When no pilot answers, the exit it
/// recorded is returned (or a synthetic one if it recorded none).
pub async fn wait_exit(dir: &Path) -> ExitInfo {
    if let Ok(value) = ask(dir, &Request::Wait).await {
        if let Ok(info) = serde_json::from_value(value) {
            return info;
        }
    }
    recorded_exit(dir).unwrap_or(ExitInfo {
        exit_code: None,
        signal: None,
    })
}

/// Runs a command beside the workload.
pub async fn exec(dir: &Path, call: &ExecCall) -> Result<ExecResponse, PilotError> {
    let answer = ask(dir, &Request::Exec(call.clone())).await?;
    if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
        let (dir, reason) = (dir.display().to_string(), error.to_string());
        return Err(if answer["timeout"] == true {
            PilotError::Timeout { dir, reason }
        } else {
            PilotError::Protocol { dir, reason }
        });
    }
    serde_json::from_value(answer).map_err(|e| PilotError::Protocol {
        dir: dir.display().to_string(),
        reason: format!("unreadable exec answer: {e}"),
    })
}

/// The workload's processes.
pub async fn ps(dir: &Path) -> Result<Vec<ProcessStat>, PilotError> {
    let answer = ask(dir, &Request::Ps).await?;
    serde_json::from_value(answer).map_err(|e| PilotError::Protocol {
        dir: dir.display().to_string(),
        reason: format!("unreadable ps answer: {e}"),
    })
}

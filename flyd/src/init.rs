//! `hangar init`: the PID 1 of every sandbox, as Fly puts its own init
//! before a machine's command. The kernel gives a PID namespace's init no
//! default signal actions, so a command run as PID 1 would ignore every
//! stop signal it has no handler for, and nothing would reap the orphans
//! of its exec'd commands. init runs the command as its child instead,
//! passes on each signal the machine gets, reaps every process that ends,
//! and exits as the command did: with its exit code, or, killed by signal
//! N, with 128 + N (as a shell reports it; pilot reads it back as the
//! signal).

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::task::Poll;
use tokio::signal::unix::{SignalKind, signal};

/// The signals passed on to the command.
const FORWARDED: [Signal; 8] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGTERM,
    Signal::SIGWINCH,
];

/// Runs `argv` as init's child until it exits; returns init's exit code.
pub async fn run(argv: &[String]) -> anyhow::Result<i32> {
    use anyhow::Context;
    let program = argv.first().context("init: no command to run")?;
    let mut forward = Vec::new();
    for sig in FORWARDED {
        forward.push((sig, signal(SignalKind::from_raw(sig as i32))?));
    }
    let mut children = signal(SignalKind::child())?;
    // Not tokio's process: init reaps every child itself, the command's
    // among them, and tokio's would race it.
    let child = std::process::Command::new(program)
        .args(&argv[1..])
        .spawn()
        .with_context(|| format!("init: starting {program:?}"))?;
    let pid = Pid::from_raw(child.id() as i32);
    drop(child);
    loop {
        // The next signal: a child's end, or one to pass on.
        let received = std::future::poll_fn(|cx| {
            if children.poll_recv(cx).is_ready() {
                return Poll::Ready(None);
            }
            for (sig, stream) in forward.iter_mut() {
                if stream.poll_recv(cx).is_ready() {
                    return Poll::Ready(Some(*sig));
                }
            }
            Poll::Pending
        })
        .await;
        if let Some(sig) = received {
            let _ = kill(pid, sig);
            continue;
        }
        // Reap everything that ended; stop once the command has.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(code),
                Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => return Ok(128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

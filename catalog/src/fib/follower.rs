//! The follower: the one thread that keeps a [`Fib`] in step with the RIB,
//! and the watchdog that makes sure it still does.
//!
//! The follower waits on its control channel. A commit in this process
//! sends `Wake` (through the RIB's commit hook, at most one pending). A
//! commit by another process changes SQLite's `data_version` and appends
//! to the RIB's write-ahead log: the kernel tells a watcher thread of the
//! change (inotify), which sends `Check`, and the follower compares
//! `data_version`. Either way it catches up under the FIB's writer lock.
//! Where the log cannot be watched, the follower compares `data_version`
//! whenever the channel has been quiet for `poll` instead; the watch
//! spares an idle process those wake-ups (with a 2 ms poll, nearly all of
//! its thread wake-ups).
//!
//! The watchdog pings the follower over the same channel. A follower that
//! has not answered within the deadline is stuck (in SQLite, or inside the
//! writer lock), and a proxy routing on an ever older table is worse than
//! one that restarts: the watchdog logs who holds the writer lock and for
//! how long, then aborts the process (tests substitute their own action).

use super::Fib;
use crate::rib::Rib;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// After a failed catch-up, wait this long before the next try.
const RETRY: Duration = Duration::from_millis(100);

/// A commit writes its frames to the log before it is committed (its
/// commit point is in SQLite's shared-memory index, whose changes the
/// kernel does not report), so the change a watch sees may come just
/// before the commit. After the log changes, `data_version` is compared
/// every `SETTLE_POLL` for `SETTLE`: a commit caught half-way is not
/// missed, and an idle RIB costs nothing.
const SETTLE: Duration = Duration::from_millis(50);
const SETTLE_POLL: Duration = Duration::from_millis(1);

/// What the watchdog saw when it fired.
#[derive(Debug, Clone)]
pub struct Stall {
    /// How long the follower has not answered.
    pub silent_for: Duration,
    /// Who holds the FIB's writer lock, and for how long.
    pub holder: Option<(&'static str, Duration)>,
    pub last_holder: Option<&'static str>,
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the catalog follower has not answered for {:?}; ",
            self.silent_for
        )?;
        match self.holder {
            Some((label, held)) => write!(f, "fib.writer held by {label} for {held:?}")?,
            None => write!(f, "fib.writer is free")?,
        }
        write!(f, " (last holder: {})", self.last_holder.unwrap_or("none"))
    }
}

/// How the follower runs.
#[derive(Clone)]
pub struct FollowerOptions {
    /// How often to check for commits made by other processes when the
    /// RIB's write-ahead log cannot be watched.
    pub poll: Duration,
    /// Watch the write-ahead log (off only to test the polling).
    pub watch_wal: bool,
    /// How long the follower may go without answering the watchdog; `None`
    /// runs no watchdog.
    pub watchdog: Option<Duration>,
    /// What the watchdog does when it fires. The default logs and aborts.
    pub on_stall: Arc<dyn Fn(&Stall) + Send + Sync>,
}

impl Default for FollowerOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(2),
            watch_wal: true,
            watchdog: Some(Duration::from_secs(30)),
            on_stall: Arc::new(abort),
        }
    }
}

fn abort(stall: &Stall) {
    tracing::error!("catalog watchdog: {stall}; aborting");
    eprintln!("hangar: catalog watchdog: {stall}; aborting the process");
    std::process::abort();
}

enum Control {
    Wake,
    /// The write-ahead log changed: compare `data_version`.
    Check,
    /// The log is no longer watched: poll.
    Unwatched,
    Ping(mpsc::SyncSender<()>),
    Stop,
}

/// The running follower (and watchdog); stopped and joined on drop.
pub struct Follower {
    control: mpsc::Sender<Control>,
    /// Dropped to stop the watchdog.
    watchdog_stop: Option<mpsc::Sender<()>>,
    /// Removed to stop the watcher.
    wal_watch: Option<WalWatch>,
    threads: Vec<JoinHandle<()>>,
}

impl Follower {
    /// Starts following `rib` into `fib`.
    pub fn spawn(fib: Arc<Fib>, rib: Arc<Rib>, options: FollowerOptions) -> std::io::Result<Self> {
        let (control, inbox) = mpsc::channel();
        let pending = Arc::new(AtomicBool::new(false));
        {
            // The hook holds the FIB weakly: the RIB may outlive it.
            let (control, pending, fib) = (control.clone(), pending.clone(), Arc::downgrade(&fib));
            rib.on_commit(Arc::new(move |seq| {
                if let Some(fib) = Weak::upgrade(&fib) {
                    fib.noticed.fetch_max(seq, Ordering::Relaxed);
                }
                if !pending.swap(true, Ordering::AcqRel) {
                    let _ = control.send(Control::Wake);
                }
            }));
        }
        let mut threads = Vec::new();
        // Watched before the follower's first catch-up: no commit falls
        // between the two.
        let mut wal_watch = None;
        if options.watch_wal {
            match WalWatch::start(&rib.wal_path(), control.clone()) {
                Ok((watch, thread)) => {
                    wal_watch = Some(watch);
                    threads.push(thread);
                }
                Err(e) => {
                    tracing::warn!(error = %e, poll = ?options.poll, "fib: cannot watch the rib's write-ahead log; polling for other processes' commits");
                }
            }
        }
        let poll = options.poll;
        let watched = wal_watch.is_some();
        let follower_fib = fib.clone();
        threads.push(
            std::thread::Builder::new()
                .name("fib-follower".into())
                .spawn(move || run(&follower_fib, &rib, &inbox, &pending, poll, watched))?,
        );
        let mut watchdog_stop = None;
        if let Some(deadline) = options.watchdog {
            let (stop, stopped) = mpsc::channel();
            watchdog_stop = Some(stop);
            let control = control.clone();
            let on_stall = options.on_stall.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("fib-watchdog".into())
                    .spawn(move || watch(&fib, &control, &stopped, deadline, &*on_stall))?,
            );
        }
        Ok(Self {
            control,
            watchdog_stop,
            wal_watch,
            threads,
        })
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Stop);
        self.watchdog_stop = None;
        if let Some(watch) = self.wal_watch.take() {
            watch.stop();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The kernel's word that the RIB's write-ahead log changed, read by a
/// thread of its own that sends `Check`.
struct WalWatch {
    inotify: Arc<Inotify>,
    wal: WatchDescriptor,
}

impl WalWatch {
    fn start(
        wal: &Path,
        control: mpsc::Sender<Control>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let inotify = Arc::new(Inotify::init(InitFlags::IN_CLOEXEC)?);
        let descriptor = inotify.add_watch(wal, AddWatchFlags::IN_MODIFY)?;
        let events = inotify.clone();
        let thread = std::thread::Builder::new()
            .name("fib-wal-watch".into())
            .spawn(move || {
                loop {
                    match events.read_events() {
                        // Removed: stopped, or the log is gone.
                        Ok(read) if read.iter().any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED)) => break,
                        Ok(_) => {
                            if control.send(Control::Check).is_err() {
                                return;
                            }
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "fib: reading the rib's write-ahead log watch failed");
                            break;
                        }
                    }
                }
                let _ = control.send(Control::Unwatched);
            })?;
        Ok((
            Self {
                inotify,
                wal: descriptor,
            },
            thread,
        ))
    }

    /// Removing the watch wakes the thread with `IN_IGNORED`.
    fn stop(self) {
        let _ = self.inotify.rm_watch(self.wal);
    }
}

fn run(
    fib: &Fib,
    rib: &Rib,
    inbox: &mpsc::Receiver<Control>,
    pending: &AtomicBool,
    poll: Duration,
    mut watched: bool,
) {
    let mut version = None;
    let mut dirty = true;
    let mut settle_until = None;
    loop {
        let mut wait = if settle_until.is_some_and(|until| Instant::now() < until) {
            Some(SETTLE_POLL.min(poll))
        } else {
            (!watched).then_some(poll)
        };
        if dirty {
            // Cleared first: a commit during the catch-up wakes us again.
            pending.store(false, Ordering::Release);
            // Read before catching up: a commit after it changes it again.
            version = rib.follower_data_version().ok();
            match fib.catch_up_as("follower", rib) {
                Ok(_) => dirty = false,
                Err(e) => {
                    tracing::warn!(error = %e, "fib: catching up with the rib failed; retrying");
                    wait = Some(RETRY);
                }
            }
        }
        let received = match wait {
            Some(wait) => inbox.recv_timeout(wait),
            None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(Control::Wake) => dirty = true,
            Ok(Control::Ping(reply)) => {
                fib.answered_ms
                    .store(fib.born.elapsed().as_millis() as u64, Ordering::Relaxed);
                let _ = reply.try_send(());
            }
            Ok(Control::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Control::Unwatched) => {
                watched = false;
                dirty = true;
            }
            Ok(Control::Check) => {
                settle_until = Some(Instant::now() + SETTLE);
                dirty |= rib.follower_data_version().ok() != version;
            }
            Err(RecvTimeoutError::Timeout) => {
                dirty |= rib.follower_data_version().ok() != version;
            }
        }
    }
}

fn watch(
    fib: &Fib,
    control: &mpsc::Sender<Control>,
    stopped: &mpsc::Receiver<()>,
    deadline: Duration,
    on_stall: &(dyn Fn(&Stall) + Send + Sync),
) {
    let every = deadline / 4;
    loop {
        match stopped.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let asked = Instant::now();
        if control.send(Control::Ping(reply)).is_err() {
            return; // The follower is gone.
        }
        match answer.recv_timeout(deadline) {
            Ok(()) => continue,
            // The follower stopped and dropped the ping unanswered.
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        on_stall(&Stall {
            silent_for: asked.elapsed(),
            holder: fib.writer.holder(),
            last_holder: fib.writer.last_holder(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fib::tests::{app_row, rib};
    use crate::{FibOptions, Rib};
    use parking_lot::Mutex;

    /// Waits (bounded) until `done` holds.
    fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn woken_by_commits_in_this_process() {
        let (_dir, rib) = rib();
        let fib = Fib::load(&rib).unwrap();
        // Polling once an hour: only the commit hook can be fast.
        let options = FollowerOptions {
            poll: Duration::from_secs(3600),
            ..FollowerOptions::default()
        };
        let follower = Follower::spawn(fib.clone(), rib.clone(), options).unwrap();
        rib.create_app(&app_row("hello")).unwrap();
        eventually("the app", || fib.lookup("hello").is_some());
        drop(follower);
    }

    /// Another handle, as another process would have: no hook reaches the
    /// follower, only the log's change (or its poll).
    fn notices_commits_of_another_connection(options: FollowerOptions) {
        let (dir, rib) = rib();
        let fib = Fib::load(&rib).unwrap();
        let follower = Follower::spawn(fib.clone(), rib.clone(), options).unwrap();
        let other = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
        // Many, each waited for: a watch that saw a commit's frames
        // before its commit point must not miss it.
        for i in 0..200 {
            let app = format!("elsewhere-{i}");
            other.create_app(&app_row(&app)).unwrap();
            eventually("the other process's app", || fib.lookup(&app).is_some());
        }
        drop(follower);
    }

    #[test]
    fn the_write_ahead_log_watch_sees_commits_of_another_connection() {
        // Polling once an hour: only the watch can be fast.
        notices_commits_of_another_connection(FollowerOptions {
            poll: Duration::from_secs(3600),
            ..FollowerOptions::default()
        });
    }

    #[test]
    fn without_the_watch_polling_sees_commits_of_another_connection() {
        notices_commits_of_another_connection(FollowerOptions {
            watch_wal: false,
            ..FollowerOptions::default()
        });
    }

    #[test]
    fn a_writer_stalled_in_the_lock_is_named_readers_keep_answering_and_the_watchdog_fires() {
        let (_dir, rib) = rib();
        rib.create_app(&app_row("before")).unwrap();
        let fib = Fib::load_with(
            &rib,
            FibOptions {
                lock_wait: Duration::from_millis(50),
                ..FibOptions::default()
            },
        )
        .unwrap();
        let stalls: Arc<Mutex<Vec<Stall>>> = Arc::default();
        let options = FollowerOptions {
            watchdog: Some(Duration::from_millis(200)),
            on_stall: {
                let stalls = stalls.clone();
                Arc::new(move |stall: &Stall| stalls.lock().push(stall.clone()))
            },
            ..FollowerOptions::default()
        };
        let follower = Follower::spawn(fib.clone(), rib.clone(), options).unwrap();

        // The follower's next catch-up blocks inside the writer lock until
        // released. Waiting for the lock to be held would not do: a
        // catch-up already past the stall (the follower's first) holds it
        // too, and this thread's own catch-up below would then stall.
        let (release, wait) = mpsc::channel::<()>();
        let (stalled, entered) = mpsc::channel::<()>();
        *fib.stall.lock() = Some((stalled, wait));
        rib.create_app(&app_row("during")).unwrap();
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the follower to stall");

        // Readers answer from the last snapshot.
        assert!(fib.lookup("before").is_some());
        assert!(fib.lookup("during").is_none());
        // Another writer gives up in time and is told who holds the lock.
        match fib.catch_up(&rib) {
            Err(crate::RibError::Lock(timeout)) => assert_eq!(timeout.holder, "follower"),
            other => panic!("expected a lock timeout, got {other:?}"),
        }
        assert_eq!(fib.stats().writer.holder, Some("follower"));
        assert_eq!(fib.stats().writer.waits["catch_up"].timeouts, 1);
        // The watchdog fires and names the holder.
        eventually("the watchdog", || !stalls.lock().is_empty());
        let stall = stalls.lock()[0].clone();
        assert_eq!(stall.holder.map(|(label, _)| label), Some("follower"));
        assert!(stall.to_string().contains("held by follower"), "{stall}");

        release.send(()).unwrap();
        eventually("the follower to recover", || fib.lookup("during").is_some());
        drop(follower);
    }
}

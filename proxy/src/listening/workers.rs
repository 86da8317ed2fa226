//! The proxy's worker threads: one single-threaded tokio runtime each, like
//! nginx's worker processes.
//!
//! Every worker accepts on the shared listeners itself (connections on
//! apps' own addresses are handed to the next worker in turn), and
//! everything a connection does (TLS, HTTP, the upstream connection it
//! borrows, its timers) stays on that worker's thread. Nothing is stolen
//! or woken across threads on the request path, and the upstream pools are
//! per worker ([`crate::forwarding::upstream`]), so a pooled connection is always driven
//! by the reactor it is registered with.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// Running workers; they stop when this is dropped.
pub(crate) struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender ends its worker's `block_on`, which drops the
    /// runtime on its own thread and cancels whatever still runs there.
    _stops: Vec<oneshot::Sender<()>>,
    next: usize,
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub(crate) fn start(count: usize) -> io::Result<Self> {
        let count = count.max(1);
        let mut handles = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    let _ = runtime.block_on(stopped);
                })?;
        }
        Ok(Self {
            handles,
            _stops: stops,
            next: 0,
        })
    }

    pub(crate) fn count(&self) -> usize {
        self.handles.len()
    }

    /// Every worker's index and runtime.
    pub(crate) fn handles(&self) -> impl Iterator<Item = (usize, &Handle)> {
        self.handles.iter().enumerate()
    }

    /// The next worker in turn, and its index.
    pub(crate) fn next(&mut self) -> (usize, &Handle) {
        let i = self.next;
        self.next = (i + 1) % self.handles.len();
        (i, &self.handles[i])
    }
}

/// How many connections each worker serves. Every worker is woken for
/// each new connection on the shared listeners and the first to accept it
/// wins, which is as often the busy one as the idle one; a burst of new
/// connections can leave one worker with twice the other's (a 15%
/// throughput loss measured with 32 clients on 2 workers). So a worker
/// ahead of another lets it accept first, as nginx's workers do past 7/8
/// of their connections.
#[derive(Clone)]
pub(crate) struct Loads(Arc<[AtomicUsize]>);

/// How far ahead of another worker one may be before it steps back.
const AHEAD_BY: usize = 1;

/// How long a worker that is ahead waits before accepting anyway: the
/// others were woken for the same connection and take it meanwhile; if
/// they are stuck, it is still accepted soon.
pub(crate) const STEP_BACK: Duration = Duration::from_millis(1);

impl Loads {
    pub(crate) fn new(workers: usize) -> Self {
        Self((0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect())
    }

    /// Publishes `worker`'s open connections.
    pub(crate) fn set(&self, worker: usize, open: usize) {
        if let Some(load) = self.0.get(worker) {
            load.store(open, Ordering::Relaxed);
        }
    }

    /// Whether `worker` serves more connections than another by more than
    /// [`AHEAD_BY`].
    pub(crate) fn ahead(&self, worker: usize) -> bool {
        let Some(mine) = self.0.get(worker).map(|l| l.load(Ordering::Relaxed)) else {
            return false;
        };
        self.0
            .iter()
            .enumerate()
            .any(|(i, l)| i != worker && l.load(Ordering::Relaxed) + AHEAD_BY < mine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_steps_back_only_when_ahead_of_another() {
        let loads = Loads::new(3);
        assert!(!loads.ahead(0));
        loads.set(0, 5);
        loads.set(1, 4);
        loads.set(2, 4);
        assert!(!loads.ahead(0), "one ahead is even enough");
        loads.set(2, 3);
        assert!(loads.ahead(0));
        assert!(!loads.ahead(2));
        assert!(!loads.ahead(7), "an unknown worker never steps back");
    }
}

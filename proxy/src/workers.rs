//! The proxy's worker threads: one single-threaded tokio runtime each, like
//! nginx's worker processes.
//!
//! Every worker accepts on the shared listeners itself (connections on
//! apps' own addresses are handed to the next worker in turn), and
//! everything a connection does (TLS, HTTP, the upstream connection it
//! borrows, its timers) stays on that worker's thread. Nothing is stolen
//! or woken across threads on the request path, and the upstream pools are
//! per worker ([`crate::upstream`]), so a pooled connection is always driven
//! by the reactor it is registered with.

use std::io;
use std::thread;
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

//! The connections of one server, so shutdown can drain them with a
//! deadline instead of leaving them to the runtime.

use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::task::JoinSet;

/// How long an accept loop pauses after an accept error. Errors such as
/// running out of file descriptors repeat at once; pausing lets in-flight
/// connections finish and free some instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Open connections: each runs in its own task, registered with a
/// [`GracefulShutdown`] so [`Conns::drain`] can ask them all to finish.
pub(crate) struct Conns {
    graceful: GracefulShutdown,
    tasks: JoinSet<()>,
}

impl Conns {
    pub(crate) fn new() -> Self {
        Self {
            graceful: GracefulShutdown::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Runs one connection on the runtime of `on`. The watcher is taken here, before the task
    /// starts, so a shutdown that begins while the task is still in its TLS
    /// handshake still reaches the connection.
    pub(crate) fn spawn<F>(&mut self, on: &Handle, conn: impl FnOnce(Watcher) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let watcher = self.graceful.watcher();
        self.tasks.spawn_on(conn(watcher), on);
    }

    /// Collects one finished connection task; pending while there is none,
    /// so it can sit in a `select!` beside `accept`.
    pub(crate) async fn reap(&mut self) {
        match self.tasks.join_next().await {
            Some(Err(e)) if e.is_panic() => {
                tracing::error!(error = %e, "proxy: a connection task panicked");
            }
            Some(_) => {}
            None => std::future::pending().await,
        }
    }

    /// Asks every connection to finish its in-flight requests and close,
    /// waits at most `deadline` for them, then cuts off the rest.
    pub(crate) async fn drain(mut self, server: &'static str, deadline: Duration) {
        let open = self.tasks.len();
        let graceful = self.graceful;
        if tokio::time::timeout(deadline, graceful.shutdown())
            .await
            .is_ok()
        {
            tracing::debug!(server, drained = open, "all connections drained");
        } else {
            tracing::warn!(
                server,
                open = self.tasks.len(),
                ?deadline,
                "drain deadline passed; closing the remaining connections"
            );
            self.tasks.abort_all();
        }
        // What is left either is past its connection and ends at once, or
        // is not HTTP (a raw TCP relay has no requests to finish) and is
        // cut here; aborted tasks end at their next await.
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Logs an accept error and pauses briefly; see [`ACCEPT_BACKOFF`].
pub(crate) async fn accept_failed(server: &'static str, error: &std::io::Error) {
    tracing::warn!(server, %error, "accept failed");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

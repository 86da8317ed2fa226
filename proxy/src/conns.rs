//! The connections of one server, so shutdown can drain them with a
//! deadline instead of leaving them to the runtime.

use hyper_util::server::graceful::GracefulConnection;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long an accept loop pauses after an accept error. Errors such as
/// running out of file descriptors repeat at once; pausing lets in-flight
/// connections finish and free some instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What tells every HTTP connection of a server to finish: shared by all
/// the accept loops, taken (`None`) once shutdown begins. Each connection
/// holds a [`Watcher`] until it ends, so the drain knows when all have.
pub(crate) type Graceful = Arc<Mutex<Option<watch::Sender<bool>>>>;

/// A connection's view of [`Graceful`]: turns true when the server shuts
/// down; dropped when the connection no longer serves requests.
pub(crate) type Watcher = watch::Receiver<bool>;

/// A new [`Graceful`].
pub(crate) fn graceful() -> Graceful {
    Arc::new(Mutex::new(Some(watch::Sender::new(false))))
}

/// Connections accepted by one accept loop: each runs in its own task,
/// registered with the server's [`Graceful`] so [`drain`] can ask them all
/// to finish.
pub(crate) struct Conns {
    graceful: Graceful,
    tasks: JoinSet<()>,
}

impl Conns {
    pub(crate) fn new(graceful: Graceful) -> Self {
        Self {
            graceful,
            tasks: JoinSet::new(),
        }
    }

    /// Runs one connection on the runtime of `on`, or on the current one.
    /// The watcher is taken here, before the task starts, so a shutdown
    /// that begins while the task is still in its TLS handshake still
    /// reaches the connection. Once shutdown has begun the connection is
    /// closed instead.
    pub(crate) fn spawn<F>(&mut self, on: Option<&Handle>, conn: impl FnOnce(Watcher) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(watcher) = self.graceful.lock().as_ref().map(watch::Sender::subscribe) else {
            return;
        };
        match on {
            Some(on) => self.tasks.spawn_on(conn(watcher), on),
            None => self.tasks.spawn(conn(watcher)),
        };
    }

    /// Connections running (or finished and not yet collected).
    pub(crate) fn len(&self) -> usize {
        self.tasks.len()
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
}

/// Asks every connection of `graceful`'s server to finish its in-flight
/// requests and close, waits at most `deadline` for them, then cuts off
/// the rest (`conns`: every accept loop's).
pub(crate) async fn drain(
    graceful: &Graceful,
    mut conns: Vec<Conns>,
    server: &'static str,
    deadline: Duration,
) {
    let open: usize = conns.iter().map(|c| c.tasks.len()).sum();
    let Some(shutdown) = graceful.lock().take() else {
        return;
    };
    shutdown.send_replace(true);
    if tokio::time::timeout(deadline, shutdown.closed())
        .await
        .is_ok()
    {
        tracing::debug!(server, drained = open, "all connections drained");
    } else {
        let left: usize = conns.iter().map(|c| c.tasks.len()).sum();
        tracing::warn!(
            server,
            open = left,
            ?deadline,
            "drain deadline passed; closing the remaining connections"
        );
    }
    // What is left either is past its connection and ends at once, or is
    // not HTTP (a raw TCP relay has no requests to finish) and is cut here;
    // aborted tasks end at their next await.
    for c in &mut conns {
        c.tasks.abort_all();
    }
    for c in &mut conns {
        while c.tasks.join_next().await.is_some() {}
    }
}

/// Runs one of hyper's connections until it ends, or until a shutdown has
/// let its in-flight requests finish.
pub(crate) async fn serve_until_drained<C>(conn: C, mut watcher: Watcher) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    let stop = async {
        // The value's guard must not live across an await.
        let _ = watcher.wait_for(|stop| *stop).await;
    };
    tokio::select! {
        result = &mut conn => result,
        () = stop => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// Logs an accept error and pauses briefly; see [`ACCEPT_BACKOFF`].
pub(crate) async fn accept_failed(server: &'static str, error: &std::io::Error) {
    tracing::warn!(server, %error, "accept failed");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

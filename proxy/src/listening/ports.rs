//! Listeners on apps' own addresses (flycast and dedicated, from IP
//! assignments), one per address and service port of the app's machines,
//! following the FIB.
//!
//! Each listener belongs to one app, so no Host or SNI is needed to route
//! what arrives on it. The port's handlers say what the proxy does with a
//! connection: `http` (with or without `tls`) serves HTTP requests as the
//! shared listeners do; anything else carries bytes ([`crate::forwarding::tcp`]).
//!
//! [`PortListeners::reconcile`] runs whenever the FIB's sequence moves: it
//! binds listeners that should exist and closes those that should not. A
//! listener that cannot bind (the address is not local, the port is taken
//! or privileged) is logged once and tried again at each later change.

use hangar_catalog::FibSnapshot;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// What a listener on an app's address does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spec {
    pub app: Arc<str>,
    /// The port's handlers, as the first machine declaring the port has
    /// them.
    pub handlers: Vec<String>,
}

impl Spec {
    pub(crate) fn has(&self, handler: &str) -> bool {
        self.handlers.iter().any(|h| h == handler)
    }
}

/// A connection accepted on an app's address.
pub(crate) struct Accepted {
    pub tcp: TcpStream,
    pub peer: SocketAddr,
    pub spec: Spec,
}

/// The running listeners.
pub(crate) struct PortListeners {
    running: HashMap<SocketAddr, (Spec, oneshot::Sender<()>)>,
    accepted: mpsc::Sender<Accepted>,
    /// The FIB sequence last reconciled with.
    seen: Option<u64>,
    /// Addresses that could not be bound (warned about once).
    failed: HashSet<SocketAddr>,
}

impl PortListeners {
    /// Accepted connections go to `accepted`.
    pub(crate) fn new(accepted: mpsc::Sender<Accepted>) -> Self {
        Self {
            running: HashMap::new(),
            accepted,
            seen: None,
            failed: HashSet::new(),
        }
    }

    /// Brings the listeners in line with `fib`, if it moved since last time.
    pub(crate) async fn reconcile(&mut self, fib: &FibSnapshot) {
        if self.seen == Some(fib.seq) {
            return;
        }
        self.seen = Some(fib.seq);
        let wanted = wanted(fib);
        self.running
            .retain(|addr, (spec, _)| wanted.get(addr) == Some(spec));
        for (addr, spec) in wanted {
            if self.running.contains_key(&addr) {
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, app = %spec.app, handlers = ?spec.handlers, "listening on an app address");
                    let (stop, stopped) = oneshot::channel();
                    tokio::spawn(accept(
                        listener,
                        spec.clone(),
                        self.accepted.clone(),
                        stopped,
                    ));
                    self.running.insert(addr, (spec, stop));
                }
                // Tried again at the next change of the FIB; said loudly
                // once per address.
                Err(e) if self.failed.insert(addr) => {
                    tracing::warn!(%addr, app = %spec.app, error = %e, "cannot listen on an app address");
                }
                Err(e) => {
                    tracing::debug!(%addr, app = %spec.app, error = %e, "still cannot listen on an app address");
                }
            }
        }
    }
}

/// Most ports one app address listens on, whatever its machines declare
/// (each machine's config is capped, but an app's machines may differ).
const MAX_PORTS_PER_ADDRESS: usize = hangar_api::machine::MAX_PORTS;

/// Every (address, port) the FIB's apps want a listener on: on each
/// address, the first [`MAX_PORTS_PER_ADDRESS`] ports its machines declare
/// (machines in the FIB's order, ports in theirs).
fn wanted(fib: &FibSnapshot) -> HashMap<SocketAddr, Spec> {
    let mut wanted = HashMap::new();
    for (ip, app) in fib.addresses() {
        let Some(routes) = fib.app(app) else { continue };
        let app: Arc<str> = Arc::from(app);
        let mut ports = 0;
        for m in routes.machines().iter() {
            for service in m.services.iter().filter(|s| s.protocol == "tcp") {
                for port in &service.ports {
                    let Some(number) = port.port else { continue };
                    let addr = SocketAddr::new(ip, number);
                    if !wanted.contains_key(&addr) {
                        if ports == MAX_PORTS_PER_ADDRESS {
                            tracing::debug!(%addr, %app, "an app address has all the ports it may have");
                            continue;
                        }
                        ports += 1;
                    }
                    wanted.entry(addr).or_insert_with(|| Spec {
                        app: app.clone(),
                        handlers: port.handlers.clone(),
                    });
                }
            }
        }
    }
    wanted
}

/// Accepts on one app address until stopped (or dropped).
async fn accept(
    listener: TcpListener,
    spec: Spec,
    accepted: mpsc::Sender<Accepted>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    crate::conns::accept_failed("app address", &e).await;
                    continue;
                }
            },
        };
        let conn = Accepted {
            tcp,
            peer,
            spec: spec.clone(),
        };
        if accepted.send(conn).await.is_err() {
            return;
        }
    }
}

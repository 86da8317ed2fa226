//! Autostart: a request for an app with no machine to take it starts one of
//! the app's stopped or suspended machines, by calling the flyd that owns
//! it, and waits until the catalog shows it routable.
//!
//! - Which machine: one with a service for the request whose `autostart` is
//!   not off, suspended before stopped (a resume takes milliseconds), the
//!   nearest region first ([`Near`]), then by id, so concurrent requests
//!   agree.
//! - Single flight per app: every request that finds the app without a
//!   machine while a start is under way waits for that start instead of
//!   starting another. The flight ends when flyd has answered and the FIB
//!   shows the machine routable (woken at each new snapshot by
//!   `Fib::changed()`), or fails; at most
//!   `hold` in all. At most `max_waiting` requests of an app wait for its
//!   start; more are answered at once (503 with `Retry-After`).
//! - The caller then routes again as usual; a failed or timed-out start is
//!   the caller's 503 with `Retry-After`.
//! - When the machine a request gets is already past its soft limit (every
//!   running machine of the app is), a stopped one is started in the
//!   background for the requests that follow; this one does not wait.

use crate::routing::balance::{Near, Want, service_for};
use compact_str::CompactString;
use dashmap::DashMap;
use hangar_api::machine::MachineState;
use hangar_catalog::{AppRoutes, Fib, RouteMachine};
use hangar_host_client::{HostCall, HostClient};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a start waits before asking again when flyd says the machine
/// cannot start yet (it is still stopping or suspending).
const SETTLE: Duration = Duration::from_millis(5);

/// What the proxy looks up in the RIB beyond the FIB: where each host's
/// flyd listens, and whose an API token is.
pub trait Directory: Send + Sync {
    /// The flyd RPC address of `host`, if the host is known.
    fn address(&self, host: &str) -> Option<String>;
    /// The org an API token belongs to, if it is one (a read of the RIB:
    /// only for the rare request that presents a token to the proxy).
    fn token_org(&self, token: &str) -> Option<String>;
}

/// How a start ended, shared by everyone waiting on it.
pub(crate) type Outcome = Result<(), String>;

/// Starts in flight, one per app.
pub(crate) struct Autostart {
    flights: DashMap<CompactString, Flight>,
    fib: Arc<Fib>,
    hosts: Arc<dyn Directory>,
    client: HostClient,
    hold: Duration,
    max_waiting: usize,
    metrics: crate::metrics::EdgeMetrics,
}

/// One app's start in flight: its outcome once known, and how many
/// requests wait for it.
#[derive(Clone)]
struct Flight {
    outcome: watch::Receiver<Option<Outcome>>,
    waiting: Arc<AtomicUsize>,
}

/// One request's place among a flight's waiters.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The machine to start for a request, among those `allowed`: see the
/// module docs. A machine
/// still stopping or suspending counts (after the settled ones): its start
/// waits until flyd takes it; so does one already starting (started by
/// someone else), whose start just waits for it.
pub(crate) fn pick<'a>(
    app: &'a AppRoutes,
    want: Want,
    near: Near<'_>,
    allowed: impl Fn(&RouteMachine) -> bool,
) -> Option<&'a RouteMachine> {
    use MachineState::*;
    app.machines()
        .iter()
        .filter(|m| allowed(m))
        .filter(|m| {
            matches!(
                m.state,
                Stopped | Suspended | Created | Stopping | Suspending | Starting
            )
        })
        .filter(|m| !m.cordoned)
        .filter(|m| {
            service_for(&m.services, want).is_some_and(|s| m.services[s].autostart != Some(false))
        })
        .min_by_key(|m| {
            let settled = matches!(m.state, Stopped | Suspended | Created);
            let suspended = matches!(m.state, Suspended | Suspending);
            (!settled, !suspended, near.rank(&m.region), m.id.clone())
        })
}

impl Autostart {
    pub(crate) fn new(
        fib: Arc<Fib>,
        hosts: Arc<dyn Directory>,
        (hold, max_waiting): (Duration, usize),
        credential: &str,
        metrics: crate::metrics::EdgeMetrics,
    ) -> Self {
        Self {
            flights: DashMap::new(),
            fib,
            hosts,
            // flyd answers a start once the machine is ready; the hold
            // bounds it.
            client: HostClient::new(hold, credential),
            hold,
            max_waiting,
            metrics,
        }
    }

    /// Starts `machine` of `app`, or joins the app's start in flight, and
    /// waits for the outcome.
    pub(crate) async fn start(self: &Arc<Self>, app: &str, machine: &RouteMachine) -> Outcome {
        let Flight {
            mut outcome,
            waiting,
        } = self
            .flights
            .entry(CompactString::from(app))
            .or_insert_with(|| self.launch(app, machine, "no machine of the app is up"))
            .clone();
        if waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(format!(
                "{} requests already wait for the app's machine to start",
                self.max_waiting
            ));
        }
        let _waiting = Waiting(waiting);
        match outcome.wait_for(Option::is_some).await {
            Ok(done) => done
                .clone()
                .unwrap_or_else(|| Err("start abandoned".into())),
            Err(_) => Err("start abandoned".into()),
        }
    }

    /// Starts `machine` of `app` without waiting, unless the app already
    /// has a start in flight: the app's running machines are past their
    /// soft limit, and this request goes to one of them meanwhile.
    pub(crate) fn start_in_background(self: &Arc<Self>, app: &str, machine: &RouteMachine) {
        self.flights
            .entry(CompactString::from(app))
            .or_insert_with(|| {
                self.launch(app, machine, "every running machine is past its soft limit")
            });
    }

    /// Runs one start in a task of its own, so it completes (and frees the
    /// flight) even if the request that began it goes away.
    fn launch(self: &Arc<Self>, app: &str, machine: &RouteMachine, reason: &'static str) -> Flight {
        let (tx, rx) = watch::channel(None);
        let this = self.clone();
        let app = CompactString::from(app);
        let (id, host, from) = (machine.id.clone(), machine.host.clone(), machine.state);
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(this.hold, this.run(&app, &id, &host)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("machine {id} was not ready within {:?}", this.hold)),
            };
            let took = started.elapsed();
            match &outcome {
                Ok(true) => {
                    tracing::info!(%app, machine = %id, from = %from, reason, ?took, "autostart: started for requests");
                    this.metrics.autostarts.record(true, took);
                }
                // Someone else had started it: not a start of ours.
                Ok(false) => tracing::debug!(%app, machine = %id, "autostart: already starting"),
                Err(e) => {
                    tracing::warn!(%app, machine = %id, reason, ?took, error = %e, "autostart failed");
                    this.metrics.autostarts.record(false, took);
                }
            }
            this.flights.remove(&app);
            let _ = tx.send(Some(outcome.map(|_| ())));
        });
        Flight {
            outcome: rx,
            waiting: Arc::default(),
        }
    }

    /// Asks the machine's flyd to start it, then waits until the FIB routes
    /// to it. True when this start is what started it.
    async fn run(&self, app: &str, id: &str, host: &str) -> Result<bool, String> {
        let addr = self
            .hosts
            .address(host)
            .ok_or_else(|| format!("host {host} of machine {id} is unknown"))?;
        let path = hangar_api::host::machine_path(app, id, "/start");
        // Subscribed before the start, so no change after it is missed.
        let mut changed = self.fib.changed();
        let routable = || {
            self.fib
                .lookup(app)
                .is_some_and(|a| a.candidates().iter().any(|m| m.id == id))
        };
        // 412: not startable now, either still stopping (start it once it
        // has stopped) or started by someone else (the FIB will say).
        loop {
            let reply = self
                .client
                .call(&addr, HostCall::new(reqwest::Method::POST, &path))
                .await
                .map_err(|e| e.to_string())?;
            match reply.status {
                200..=299 => break,
                412 if routable() => return Ok(false),
                412 => tokio::time::sleep(SETTLE).await,
                status => {
                    return Err(format!(
                        "flyd answered {status}: {}",
                        reply
                            .body
                            .get("error")
                            .and_then(|e| e.as_str())
                            .unwrap_or("")
                    ));
                }
            }
        }
        while !routable() {
            changed.next().await;
        }
        Ok(true)
    }
}

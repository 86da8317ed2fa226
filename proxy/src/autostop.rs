//! Autostop: every `autostop_interval_ms` the proxy looks at each app and
//! region whose machines' services say `autostop = "stop"` or `"suspend"`,
//! and stops (or suspends) at most one machine per region per round:
//!
//! - when the region has more running machines than its load needs:
//!   `running − (machines past their soft limit + 1) ≥ 1`, the most idle
//!   machine with nothing in flight goes;
//! - a lone machine only after `autostop_idle_ms` without a request;
//! - never below the services' `min_machines_running` (per region here:
//!   Hangar has no primary region).
//!
//! A machine is never stopped with requests in flight: it is cordoned
//! first (the proxy sends it nothing new), the proxy waits up to
//! `autostop_drain_ms` for its in-flight count to reach zero, then asks its
//! flyd to stop or suspend it; if it does not drain in time it is
//! uncordoned and left alone. Every stop is logged with its reason and
//! counted with the time it took (`fly_edge_autostops_count{result}`,
//! `fly_edge_autostop_time_seconds`).
//!
//! A machine's idle clock restarts whenever a request or tunnel on it ends
//! ([`Activity`]); a machine the proxy has not served since it started
//! counts from the proxy's start.

use crate::autostart::HostDirectory;
use crate::metrics::EdgeMetrics;
use compact_str::CompactString;
use dashmap::DashMap;
use hangar_api::host::{HostCall, HostClient};
use hangar_api::machine::{Autostop, MachineService};
use hangar_catalog::{Fib, RouteMachine};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When each machine last finished serving something.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    last: DashMap<CompactString, AtomicU64>,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: DashMap::new(),
        }
    }

    /// `machine` just finished a request (or a tunnel, or a connection).
    pub(crate) fn touch(&self, machine: &str) {
        let now = self.epoch.elapsed().as_millis() as u64;
        if let Some(last) = self.last.get(machine) {
            last.store(now, Ordering::Relaxed);
            return;
        }
        self.last
            .insert(CompactString::from(machine), AtomicU64::new(now));
    }

    /// How long `machine` has been idle, as far as this proxy knows.
    fn idle_for(&self, machine: &str) -> Duration {
        let last = self
            .last
            .get(machine)
            .map_or(0, |l| l.load(Ordering::Relaxed));
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// The autostop loop's settings and what it talks to.
pub(crate) struct Autostopper {
    pub fib: Arc<Fib>,
    pub activity: Arc<Activity>,
    pub hosts: Arc<dyn HostDirectory>,
    pub client: HostClient,
    pub interval: Duration,
    pub idle: Duration,
    pub drain: Duration,
    pub metrics: EdgeMetrics,
}

/// One machine the round would put down, and why.
struct Pick {
    id: CompactString,
    host: Arc<str>,
    app: CompactString,
    how: Autostop,
    reason: String,
    load: Arc<std::sync::atomic::AtomicUsize>,
}

impl Autostopper {
    /// Runs rounds until the task is dropped.
    pub(crate) async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            for pick in self.round() {
                self.put_down(pick).await;
            }
        }
    }

    /// The machines this round stops: at most one per app and region.
    fn round(&self) -> Vec<Pick> {
        let snapshot = self.fib.snapshot();
        let mut picks = Vec::new();
        for app in snapshot.apps() {
            // Running machines whose service asks for autostop, by region.
            let mut regions: BTreeMap<&str, Vec<(&RouteMachine, &MachineService)>> =
                BTreeMap::new();
            for m in app.candidates() {
                let Some(service) = m.services.iter().find(|s| stops(s)) else {
                    continue;
                };
                regions.entry(&m.region).or_default().push((m, service));
            }
            for machines in regions.values() {
                if let Some(pick) = self.choose(&app.name, machines) {
                    picks.push(pick);
                }
            }
        }
        picks
    }

    /// The machine of one app and region to put down this round, if any.
    fn choose(&self, app: &str, machines: &[(&RouteMachine, &MachineService)]) -> Option<Pick> {
        let running = machines.len();
        let min = machines
            .iter()
            .filter_map(|(_, s)| s.min_machines_running)
            .max()
            .unwrap_or(0) as usize;
        if running <= min {
            return None;
        }
        let loads: Vec<usize> = machines
            .iter()
            .map(|(m, _)| m.inflight.load(Ordering::Relaxed))
            .collect();
        let past_soft = machines
            .iter()
            .zip(&loads)
            .filter(|((_, s), load)| **load > crate::balance::Limits::of(s).soft)
            .count();
        // The most idle machine with nothing in flight.
        let (m, service, idle) = machines
            .iter()
            .zip(&loads)
            .filter(|(_, load)| **load == 0)
            .map(|((m, s), _)| (*m, *s, self.activity.idle_for(&m.id)))
            .max_by_key(|(_, _, idle)| *idle)?;
        let reason = if running == 1 {
            if idle < self.idle {
                return None;
            }
            format!("idle for {idle:?}, longer than {:?}", self.idle)
        } else if running > past_soft + 1 {
            format!("{running} running in its region, {past_soft} past their soft limit")
        } else {
            return None;
        };
        Some(Pick {
            id: m.id.clone(),
            host: m.host.clone(),
            app: app.into(),
            how: service.autostop.unwrap_or(Autostop::Stop),
            reason,
            load: m.inflight.clone(),
        })
    }

    /// Cordons the machine, waits for it to drain, stops or suspends it.
    async fn put_down(&self, pick: Pick) {
        let started = Instant::now();
        let Some(addr) = self.hosts.address(&pick.host) else {
            tracing::warn!(machine = %pick.id, host = %pick.host, "autostop: unknown host");
            return;
        };
        let call = |action: &'static str| {
            let path = format!("/v1/machines/{}/{action}", pick.id);
            let (client, addr) = (self.client.clone(), addr.clone());
            async move {
                let reply = client
                    .call(&addr, HostCall::new(reqwest::Method::POST, &path))
                    .await
                    .map_err(|e| e.to_string())?;
                match reply.status {
                    200..=299 => Ok(()),
                    status => Err(format!("{action}: flyd answered {status}")),
                }
            }
        };
        let outcome = async {
            call("cordon").await?;
            let deadline = Instant::now() + self.drain;
            // Once the FIB shows it cordoned no new request goes there;
            // then what is in flight drains.
            let cordoned = || {
                !self
                    .fib
                    .lookup(&pick.app)
                    .is_some_and(|a| a.candidates().iter().any(|m| m.id == pick.id))
            };
            while !cordoned() || pick.load.load(Ordering::Acquire) > 0 {
                if Instant::now() >= deadline {
                    let _ = call("uncordon").await;
                    return Err(format!("still busy after {:?}; left running", self.drain));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            call(match pick.how {
                Autostop::Suspend => "suspend",
                _ => "stop",
            })
            .await?;
            // A stopped machine is routed to again once started; it must
            // not stay cordoned.
            call("uncordon").await
        }
        .await;
        let took = started.elapsed();
        match &outcome {
            Ok(()) => {
                tracing::info!(app = %pick.app, machine = %pick.id, how = ?pick.how, reason = pick.reason, ?took, "autostop")
            }
            Err(e) => {
                tracing::warn!(app = %pick.app, machine = %pick.id, reason = pick.reason, error = %e, "autostop did not stop the machine")
            }
        }
        self.metrics.autostops.record(outcome.is_ok(), took);
    }
}

/// Whether a service asks for its machines to be stopped when idle.
fn stops(service: &MachineService) -> bool {
    matches!(service.autostop, Some(Autostop::Stop | Autostop::Suspend))
}

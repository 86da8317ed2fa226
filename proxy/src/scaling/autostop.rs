//! Autostop: every `autostop_interval_ms` the proxy looks at each app and
//! region whose machines' services say `autostop = "stop"` or `"suspend"`,
//! and stops (or suspends) at most one machine per region per round:
//!
//! - when the region has more running machines than its load needs:
//!   `running − (machines past their soft limit + 1) ≥ 1`, the most idle
//!   machine with nothing in flight goes;
//! - a lone machine only after `autostop_idle_ms` without a request;
//! - never below the services' `min_machines_running` in the app's primary
//!   region, as Fly: the region the machines' config names in
//!   `env.PRIMARY_REGION` (Fly's tools set it from `primary_region`); an
//!   app whose machines name none keeps the minimum in every region.
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
//! ([`Activity`]); a machine the proxy has not served yet counts from when
//! this proxy first looked at it (its start, for machines running then). What is open on a machine keeps it up:
//! a request in flight, a streaming response, a WebSocket or other tunnel,
//! a raw TCP connection all count in its in-flight load. An idle
//! keep-alive client connection does not: between requests it holds no
//! machine (each request is routed afresh).
//!
//! An app tells the proxy it is busy beyond that (a job running after the
//! response, say) with a response header, `fly-keep-alive-until: <Unix
//! seconds>` or an RFC 3339 time: the machine is not stopped before then
//! (at most [`MAX_KEEP_ALIVE`] ahead). The proxy takes the header out of
//! the response.

use crate::hash::FastHash;
use crate::metrics::EdgeMetrics;
use crate::scaling::autostart::Directory;
use compact_str::CompactString;
use dashmap::DashMap;
use hangar_api::machine::{Autostop, MachineService};
use hangar_catalog::{Fib, Load, RouteMachine};
use hangar_host_client::{HostCall, HostClient};
use http::HeaderValue;
use http::header::HeaderName;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The response header an app keeps its machine up with.
pub(crate) const FLY_KEEP_ALIVE_UNTIL: HeaderName = HeaderName::from_static("fly-keep-alive-until");

/// How far ahead `fly-keep-alive-until` is honoured: a wrong clock or a
/// typo must not pin a machine for good.
pub const MAX_KEEP_ALIVE: Duration = Duration::from_secs(24 * 3600);

/// When each machine last finished serving something, and until when its
/// app asked for it to be kept up.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    last: DashMap<CompactString, AtomicU64, FastHash>,
    /// Milliseconds since `epoch`, from `fly-keep-alive-until`.
    kept_until: DashMap<CompactString, AtomicU64, FastHash>,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: DashMap::default(),
            kept_until: DashMap::default(),
        }
    }

    /// `machine`'s app answered with `fly-keep-alive-until: value`. A
    /// value that is not a time is ignored (and logged).
    pub(crate) fn keep_alive(&self, machine: &str, value: &HeaderValue) {
        let Some(left) = keep_alive_left(value, SystemTime::now()) else {
            tracing::debug!(
                machine,
                ?value,
                "fly-keep-alive-until is not a Unix time or RFC 3339 time; ignored"
            );
            return;
        };
        let until = (self.epoch.elapsed() + left).as_millis() as u64;
        match self.kept_until.get(machine) {
            Some(kept) => {
                kept.fetch_max(until, Ordering::Relaxed);
            }
            None => {
                self.kept_until
                    .insert(CompactString::from(machine), AtomicU64::new(until));
            }
        }
    }

    /// Whether `machine`'s app asked for it to be kept up until later.
    fn kept(&self, machine: &str) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.kept_until
            .get(machine)
            .is_some_and(|until| until.load(Ordering::Relaxed) > now)
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

    /// Forgets machines idle for longer than [`MAX_KEEP_ALIVE`] and keep-
    /// alives that ran out, so destroyed machines leave the maps within a
    /// day. (A machine idle that long was stopped long before, under any
    /// idle limit.)
    pub(crate) fn prune(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let day = MAX_KEEP_ALIVE.as_millis() as u64;
        self.last
            .retain(|_, last| now.saturating_sub(last.load(Ordering::Relaxed)) <= day);
        self.kept_until
            .retain(|_, until| until.load(Ordering::Relaxed) > now);
    }

    /// How long `machine` has been idle, as far as this proxy knows.
    fn idle_for(&self, machine: &str) -> Duration {
        let Some(last) = self.last.get(machine).map(|l| l.load(Ordering::Relaxed)) else {
            // First seen: its idle clock starts now, however long this
            // proxy has run.
            self.touch(machine);
            return Duration::ZERO;
        };
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// The autostop loop's settings and what it talks to.
pub(crate) struct Autostopper {
    pub fib: Arc<Fib>,
    pub activity: Arc<Activity>,
    pub hosts: Arc<dyn Directory>,
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
    load: Load,
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
            let primary = app.machines().iter().find_map(|m| m.primary_region.clone());
            for (region, machines) in &regions {
                let keeps_min = primary.as_deref().is_none_or(|p| p == *region);
                if let Some(pick) = self.choose(&app.name, machines, keeps_min) {
                    picks.push(pick);
                }
            }
        }
        picks
    }

    /// The machine of one app and region to put down this round, if any;
    /// `keeps_min`: `min_machines_running` holds in this region.
    fn choose(
        &self,
        app: &str,
        machines: &[(&RouteMachine, &MachineService)],
        keeps_min: bool,
    ) -> Option<Pick> {
        let running = machines.len();
        let min = machines
            .iter()
            .filter_map(|(_, s)| s.min_machines_running)
            .max()
            .filter(|_| keeps_min)
            .unwrap_or(0) as usize;
        if running <= min {
            return None;
        }
        let loads: Vec<usize> = machines.iter().map(|(m, _)| m.load.get()).collect();
        let past_soft = machines
            .iter()
            .zip(&loads)
            .filter(|((_, s), load)| **load > crate::routing::balance::Limits::of(s).soft)
            .count();
        // The most idle machine with nothing in flight that its app has
        // not asked to keep.
        let (m, service, idle) = machines
            .iter()
            .zip(&loads)
            .filter(|((m, _), load)| **load == 0 && !self.activity.kept(&m.id))
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
            load: m.load.clone(),
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
            let path = hangar_api::host::machine_path(&pick.app, &pick.id, &format!("/{action}"));
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
            let mut changed = self.fib.changed();
            let busy = || async {
                let _ = call("uncordon").await;
                Err(format!("still busy after {:?}; left running", self.drain))
            };
            if !changed.until(deadline.into(), cordoned).await {
                return busy().await;
            }
            // A lease's end is not announced (it is on every request's
            // path), so the draining is looked at every 5 ms.
            while pick.load.get() > 0 {
                if Instant::now() >= deadline {
                    return busy().await;
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

/// How long from `now` a `fly-keep-alive-until` value asks for: Unix
/// seconds or an RFC 3339 time, capped at [`MAX_KEEP_ALIVE`]; `None` when
/// it is neither (or already past).
fn keep_alive_left(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let until = match text.parse::<u64>() {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => humantime::parse_rfc3339_weak(text).ok()?,
    };
    let left = until.duration_since(now).ok()?;
    Some(left.min(MAX_KEEP_ALIVE))
}

/// Whether a service asks for its machines to be stopped when idle.
fn stops(service: &MachineService) -> bool {
    matches!(service.autostop, Some(Autostop::Stop | Autostop::Suspend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_until_takes_unix_seconds_or_rfc3339_capped() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let left = |v: &str| keep_alive_left(&HeaderValue::from_str(v).unwrap(), now);
        assert_eq!(left("1700000030"), Some(Duration::from_secs(30)));
        assert_eq!(left(" 2023-11-14T22:13:20Z "), Some(Duration::ZERO));
        assert_eq!(
            left("2023-11-14T22:14:20.5Z"),
            Some(Duration::from_millis(60_500))
        );
        assert_eq!(left("1799999999"), Some(MAX_KEEP_ALIVE));
        assert_eq!(left("1600000000"), None, "in the past");
        assert_eq!(left("soon"), None);
    }

    #[test]
    fn a_kept_machine_counts_as_kept_until_its_time() {
        let activity = Activity::new();
        assert!(!activity.kept("m1"));
        let secs = |d: Duration| {
            let t = SystemTime::now() + d;
            HeaderValue::from(t.duration_since(UNIX_EPOCH).unwrap().as_secs())
        };
        activity.keep_alive("m1", &secs(Duration::from_secs(60)));
        assert!(activity.kept("m1"));
        // A sooner time does not shorten it.
        activity.keep_alive("m1", &secs(Duration::ZERO));
        assert!(activity.kept("m1"));
        activity.keep_alive("m2", &HeaderValue::from_static("1"));
        assert!(!activity.kept("m2"));
    }
}

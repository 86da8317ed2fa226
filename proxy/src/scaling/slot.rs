//! Taking a slot on a machine for a request or a connection: the shared
//! code of HTTP and raw TCP. Choose (routing's [`balance`]); when every
//! machine is at its hard limit, wait in the app's queue; when none is up,
//! start one (autostart) and choose again.

use super::autostart::{self, Autostart};
use super::queue::Queues;
use crate::config::Peer;
use crate::error::{PathError, QueueError};
use crate::routing::balance::{self, Lease, Near, NoTarget, Released, Target, Want};
use crate::routing::steer::Steer;
use compact_str::CompactString;
use hangar_catalog::{AppRoutes, Fib, RouteMachine};
use std::sync::{Arc, OnceLock};

/// What taking a slot needs, shared by every request and connection.
pub(crate) struct Slots {
    pub fib: Arc<Fib>,
    /// This proxy's region: the nearest.
    pub region: String,
    /// Other regions' proxies, closest first.
    pub closer: Vec<Peer>,
    /// Requests waiting for a slot, per app.
    pub queues: Arc<Queues>,
    /// Starts of stopped machines for requests.
    pub autostart: Arc<Autostart>,
    /// What a lease's end tells (the queues, the idle clocks).
    pub released: Arc<dyn Released>,
}

impl Slots {
    /// Picks the machine and takes a slot on it; see [`balance`]. When
    /// every machine is at its hard limit the request waits in the app's
    /// queue ([`super::queue`]), reading the app's routes afresh on every
    /// try. When the app has no machine up, one is started
    /// ([`super::autostart`]) and the request routed again once it is.
    /// `steer` narrows or orders the choice; machines in `skip` are not
    /// chosen.
    pub(crate) async fn take(
        &self,
        app: &Arc<AppRoutes>,
        want: Want,
        steer: &Steer,
        skip: &[CompactString],
    ) -> Result<(Target, Lease), PathError> {
        let resolved = steer.resolve(app, &self.region)?;
        let near = Near {
            region: resolved.near,
            closer: &self.closer,
        };
        // A machine that refused the request is skipped, unless it has been
        // started for it since.
        let restarted = OnceLock::new();
        let allowed = |m: &RouteMachine| {
            resolved.allows(m) && (!skip.contains(&m.id) || restarted.get() == Some(&m.id))
        };
        // A machine that refused the request and is down now may be started
        // for it: autostart only picks machines the catalog shows down.
        let startable = |m: &RouteMachine| resolved.allows(m);
        let attempt = |app: &Arc<AppRoutes>| {
            // A preferred machine that can take the request gets it.
            if let Some(id) = resolved.prefer_instance {
                let only = |m: &RouteMachine| !allowed(m) || m.id != id;
                if let Ok(target) = balance::choose(app, want, near, only, &mut rand::rng())
                    && let Some(lease) = Lease::acquire(&target, Some(&self.released))
                {
                    return Some(Ok((target, lease)));
                }
            }
            let skip = |m: &RouteMachine| !allowed(m);
            match balance::choose(app, want, near, skip, &mut rand::rng()) {
                // A slot taken between choosing and leasing counts as full.
                Ok(target) => {
                    Lease::acquire(&target, Some(&self.released)).map(|l| Ok((target, l)))
                }
                Err(NoTarget::AtCapacity) => None,
                Err(no) => Some(Err(no)),
            }
        };
        let mut app = app.clone();
        let mut started = false;
        loop {
            let found = match attempt(&app) {
                Some(found) => found,
                None => Box::pin(
                    self.queues
                        .wait(&app.name, || attempt(&self.fib.lookup(&app.name)?)),
                )
                .await
                .map_err(|reason| PathError::AtCapacity {
                    app: app.name.to_string(),
                    reason,
                })?,
            };
            let no = match found {
                Ok(slot) => {
                    if slot.0.past_soft()
                        && let Some(machine) = autostart::pick(&app, want, near, startable)
                    {
                        self.autostart.start_in_background(&app.name, machine);
                    }
                    return Ok(slot);
                }
                Err(no @ (NoTarget::NoStartedMachine | NoTarget::NoHealthyMachine)) if !started => {
                    no
                }
                // A forced machine or region with nothing up there: start one.
                Err(no @ NoTarget::NoHttpService) if !started && steer.forces() => no,
                Err(no) => return Err(no_target(&app, no, &self.region)),
            };
            let Some(machine) = autostart::pick(&app, want, near, startable) else {
                return Err(no_target(&app, no, &self.region));
            };
            Box::pin(self.autostart.start(&app.name, machine))
                .await
                .map_err(|reason| PathError::StartFailed {
                    app: app.name.to_string(),
                    machine: machine.id.to_string(),
                    reason,
                })?;
            let _ = restarted.set(machine.id.clone());
            started = true;
            app = self
                .fib
                .lookup(&app.name)
                .ok_or_else(|| PathError::UnknownApp(app.name.to_string()))?;
        }
    }
}

/// The error for an app without a machine for this request. With none here
/// but some in other regions (a regional catalog keeps only this region's
/// machines), the error names those regions, from the catalog's summaries.
fn no_target(app: &AppRoutes, no: NoTarget, region: &str) -> PathError {
    let name = app.name.to_string();
    let elsewhere = app.regions_elsewhere(region);
    if app.candidates().is_empty() && !elsewhere.is_empty() {
        return PathError::OnlyElsewhere {
            app: name,
            region: region.to_string(),
            elsewhere: elsewhere.iter().map(|r| r.region.to_string()).collect(),
        };
    }
    match no {
        NoTarget::NoStartedMachine => PathError::NoStartedMachine(name),
        NoTarget::NoHealthyMachine => PathError::NoHealthyMachine(name),
        NoTarget::NoHttpService => PathError::NoHttpService(name),
        NoTarget::AtCapacity => PathError::AtCapacity {
            app: name,
            reason: QueueError::Full,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_nothing_here_the_error_names_the_regions_that_have_machines() {
        use hangar_catalog::RegionSummary;
        let summary = |region: &str, routable, capacity| RegionSummary {
            region: region.into(),
            started: routable,
            stopped: 1,
            suspended: 0,
            routable,
            capacity,
        };
        let app = Arc::new(AppRoutes::empty("hello").with_regions([
            summary("ams", 0, 0),
            summary("ord", 1, 20),
            summary("syd", 2, 40),
        ]));
        let err = no_target(&app, NoTarget::NoStartedMachine, "ams");
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            err.to_string(),
            "app \"hello\" has no machine taking traffic in region ams; it has in syd, ord"
        );
        let nowhere = Arc::new(AppRoutes::empty("hello"));
        assert!(matches!(
            no_target(&nowhere, NoTarget::NoStartedMachine, "ams"),
            PathError::NoStartedMachine(_)
        ));
    }
}

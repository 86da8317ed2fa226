//! Where a request may go beyond "the best machine of its app": Fly's
//! routing request headers ([`Steer::from_headers`]), and the next hop a
//! machine's `fly-replay` asks for ([`Hop::replay`], see [`crate::routing::replay`]).

use crate::error::PathError;
use crate::routing::balance::{Target, Want};
use crate::routing::replay::{Fallback, Replay};
use compact_str::CompactString;
use hangar_catalog::{AppRoutes, Fib, RouteMachine};
use std::sync::Arc;
use std::time::Duration;

/// What narrows or orders the choice of machine: `fly-force-instance-id`
/// (that machine only), `fly-prefer-instance-id` (that machine when it can
/// take the request), `fly-force-region` (machines of that region only),
/// `fly-prefer-region` (that region counts as the nearest); or the same
/// from a `fly-replay`.
#[derive(Debug, Default)]
pub(crate) struct Steer {
    force_instance: Option<String>,
    prefer_instance: Option<String>,
    /// In order of preference: the first the app has machines in is the
    /// only one allowed; `any` allows every region.
    force_regions: Vec<String>,
    prefer_region: Option<String>,
    /// The header that asked, for error messages.
    by: By,
}

#[derive(Debug, Default, Clone, Copy)]
enum By {
    #[default]
    Headers,
    Replay,
}

impl Steer {
    pub(crate) fn from_headers(headers: &http::HeaderMap) -> Self {
        let (mut force_instance, mut prefer_instance) = (None, None);
        let (mut force_region, mut prefer_region) = (None, None);
        // One pass over the names the client sent: looking each of the four
        // up would parse and hash four names for every request, and nearly
        // none carries any.
        for (name, value) in headers {
            let slot = match name.as_str() {
                "fly-force-instance-id" => &mut force_instance,
                "fly-prefer-instance-id" => &mut prefer_instance,
                "fly-force-region" => &mut force_region,
                "fly-prefer-region" => &mut prefer_region,
                _ => continue,
            };
            // The first of repeated headers with a value counts.
            if slot.is_none() {
                *slot = value
                    .to_str()
                    .ok()
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string);
            }
        }
        Self {
            force_instance,
            prefer_instance,
            force_regions: force_region.into_iter().collect(),
            prefer_region,
            by: By::Headers,
        }
    }

    /// Prefers the machine a sticky session is pinned to, unless the
    /// client's headers already name a machine.
    pub(crate) fn or_pinned(mut self, pinned: Option<&str>) -> Self {
        if self.force_instance.is_none() && self.prefer_instance.is_none() {
            self.prefer_instance = pinned.map(str::to_string);
        }
        self
    }

    fn from_replay(replay: &Replay) -> Self {
        Self {
            force_instance: replay.instance.clone(),
            prefer_instance: replay.prefer_instance.clone(),
            force_regions: replay.regions.clone(),
            prefer_region: None,
            by: By::Replay,
        }
    }

    /// A machine or region is required, so an app with nothing up there
    /// gets one started rather than an error.
    pub(crate) fn forces(&self) -> bool {
        self.force_instance.is_some() || !self.force_regions.is_empty()
    }

    /// The region the client forced, if any.
    pub(crate) fn forced_region(&self) -> Option<&str> {
        self.force_regions.first().map(String::as_str)
    }

    /// What this means for `app`, whose own region is `own`: errors when
    /// it has no such machine or no machine in any of the regions.
    pub(crate) fn resolve<'a>(
        &'a self,
        app: &AppRoutes,
        own: &'a str,
    ) -> Result<Resolved<'a>, PathError> {
        let (instance_by, region_by) = match self.by {
            By::Headers => ("fly-force-instance-id", "fly-force-region"),
            By::Replay => ("fly-replay", "fly-replay"),
        };
        if let Some(id) = &self.force_instance
            && !app.machines().iter().any(|m| m.id == id.as_str())
        {
            return Err(PathError::NoSuchMachine {
                app: app.name.to_string(),
                machine: id.clone(),
                by: instance_by,
            });
        }
        // The first listed region the app has machines in; `any`, or no
        // list, allows every region.
        let listed = self
            .force_regions
            .iter()
            .find(|r| *r == "any" || app.region(r).is_some());
        let region = match listed {
            Some(region) if region != "any" => Some(region.as_str()),
            Some(_) => None,
            None if self.force_regions.is_empty() => None,
            None => {
                return Err(PathError::NotInRegion {
                    app: app.name.to_string(),
                    region: self.force_regions.join(","),
                    by: region_by,
                });
            }
        };
        Ok(Resolved {
            instance: self.force_instance.as_deref(),
            prefer_instance: self.prefer_instance.as_deref(),
            region,
            near: region.or(self.prefer_region.as_deref()).unwrap_or(own),
        })
    }
}

/// A [`Steer`] for one app.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved<'a> {
    instance: Option<&'a str>,
    pub prefer_instance: Option<&'a str>,
    region: Option<&'a str>,
    /// The region that counts as nearest.
    pub near: &'a str,
}

impl Resolved<'_> {
    pub(crate) fn allows(&self, m: &RouteMachine) -> bool {
        self.instance.is_none_or(|id| m.id == id) && self.region.is_none_or(|r| &*m.region == r)
    }
}

/// One leg of a request's way: to the client's app first, then to
/// wherever each `fly-replay` sends it.
pub(crate) struct Hop {
    pub app: AppRef,
    pub want: Want,
    pub steer: Steer,
    /// A machine not to choose (`elsewhere=true`).
    pub exclude: Option<CompactString>,
    /// How long finding and reaching a machine may take (`timeout`).
    pub timeout: Option<Duration>,
    /// Replays so far.
    pub replays: usize,
    /// Where the request goes back to when this replay cannot reach its
    /// target (`fallback`).
    origin: Option<Origin>,
    /// The request came back from a failed replay, and is not replayed
    /// again.
    pub fell_back: bool,
}

/// The app a hop goes to: found already, or named by a replay and looked
/// up when the request goes out (an unknown app is then the replay's
/// failure, which may fall back).
pub(crate) enum AppRef {
    Found(Arc<AppRoutes>),
    /// An app a machine named, which must belong to `org`, the asking
    /// app's: another org's app is unknown to it.
    Named {
        name: String,
        org: CompactString,
    },
}

impl AppRef {
    pub(crate) fn routes(&self, fib: &Fib) -> Result<Arc<AppRoutes>, PathError> {
        match self {
            Self::Found(routes) => Ok(routes.clone()),
            Self::Named { name, org } => fib
                .lookup(name)
                .filter(|app| app.org == *org)
                .ok_or_else(|| PathError::UnknownApp(name.clone())),
        }
    }
}

/// The machine that asked for a replay with a `fallback`.
struct Origin {
    app: Arc<AppRoutes>,
    want: Want,
    machine: CompactString,
    fallback: Fallback,
}

impl Hop {
    /// The client's request, as it arrived.
    pub(crate) fn first(app: Arc<AppRoutes>, want: Want, steer: Steer) -> Self {
        Self {
            app: AppRef::Found(app),
            want,
            steer,
            exclude: None,
            timeout: None,
            replays: 0,
            origin: None,
            fell_back: false,
        }
    }

    /// The hop `replay` asks for, from the machine `asker` chose. Another
    /// app is asked for HTTP as on `other_app`'s listener.
    pub(crate) fn replay(&self, replay: &Replay, asker: &Target, other_app: Want) -> Self {
        let (app, machine, want) = (asker.app(), asker.machine(), asker.want());
        let same = replay.app.as_deref().is_none_or(|a| a == &*app.name);
        Self {
            app: match &replay.app {
                Some(name) if !same => AppRef::Named {
                    name: name.clone(),
                    org: app.org.clone(),
                },
                _ => AppRef::Found(app.clone()),
            },
            want: if same { want } else { other_app },
            steer: Steer::from_replay(replay),
            exclude: replay.elsewhere.then(|| machine.id.clone()),
            timeout: replay.timeout,
            replays: self.replays + 1,
            origin: replay.fallback.map(|fallback| Origin {
                app: app.clone(),
                want,
                machine: machine.id.clone(),
                fallback,
            }),
            fell_back: false,
        }
    }

    /// Where the request goes after this hop failed with `error`: back to
    /// the machine that asked for the replay, when it set a `fallback` and
    /// the request reached no machine.
    pub(crate) fn fall_back(&self, error: &PathError) -> Option<Self> {
        let origin = self
            .origin
            .as_ref()
            .filter(|_| error.reached_no_machine())?;
        let id = origin.machine.to_string();
        let steer = match origin.fallback {
            Fallback::ForceSelf => Steer {
                force_instance: Some(id),
                by: By::Replay,
                ..Steer::default()
            },
            Fallback::PreferSelf => Steer {
                prefer_instance: Some(id),
                by: By::Replay,
                ..Steer::default()
            },
        };
        Some(Self {
            app: AppRef::Found(origin.app.clone()),
            want: origin.want,
            steer,
            exclude: None,
            timeout: None,
            replays: self.replays,
            origin: None,
            fell_back: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_catalog::RegionSummary;

    fn app_in(regions: &[&str]) -> AppRoutes {
        let summary = |region: &str| RegionSummary {
            region: region.into(),
            started: 1,
            stopped: 0,
            suspended: 0,
            routable: 1,
            capacity: 20,
        };
        AppRoutes::empty("hello")
            .with_regions(regions.iter().map(|r| summary(r)).collect::<Vec<_>>())
    }

    #[test]
    fn the_first_listed_region_the_app_has_is_forced() {
        let app = app_in(&["ams", "ord"]);
        let replay = |regions: &[&str]| {
            Steer::from_replay(&Replay {
                regions: regions.iter().map(|r| r.to_string()).collect(),
                ..Replay::default()
            })
        };
        let steer = replay(&["sjc", "ord", "ams"]);
        let resolved = steer.resolve(&app, "dev").unwrap();
        assert_eq!((resolved.region, resolved.near), (Some("ord"), "ord"));
        let steer = replay(&["sjc", "any"]);
        let resolved = steer.resolve(&app, "dev").unwrap();
        assert_eq!((resolved.region, resolved.near), (None, "dev"));
        let err = replay(&["sjc", "syd"]).resolve(&app, "dev").unwrap_err();
        assert_eq!(
            err.to_string(),
            "app \"hello\" has no machine in region \"sjc,syd\" (fly-replay)"
        );
    }

    #[test]
    fn a_forced_machine_the_app_lacks_is_named_with_its_header() {
        let mut headers = http::HeaderMap::new();
        headers.insert("fly-force-instance-id", "m9".parse().unwrap());
        headers.insert("fly-prefer-region", "ord".parse().unwrap());
        let steer = Steer::from_headers(&headers);
        assert!(steer.forces());
        let err = steer.resolve(&app_in(&["ord"]), "dev").unwrap_err();
        assert_eq!(
            err.to_string(),
            "app \"hello\" has no machine \"m9\" (fly-force-instance-id)"
        );
    }
}

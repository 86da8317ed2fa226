//! Sticky sessions: a service with `sticky` pins each client to the machine
//! that first served it, for as long as that machine can take its requests
//! (routable, below its hard limit); otherwise the request is routed as
//! usual and the client is pinned to the machine that serves it instead.
//!
//! - `sticky.cookie = NAME`: the proxy answers with `Set-Cookie:
//!   NAME=<machine id>; Path=/; Max-Age=<ttl>; HttpOnly; SameSite=Lax`
//!   and routes requests carrying that cookie to that machine.
//! - `sticky.header = NAME`: the machine hands out a value in a response
//!   header (`Mcp-Session-Id`, a session token); the proxy remembers which
//!   machine gave it out and routes requests carrying it to that machine.
//!   At most [`MAX_PINS`] values are remembered, each until unused for
//!   `ttl_secs`.
//!
//! Which key an app uses is read from the service of its first machine
//! (machines of an app normally share one config); a pin applies only to
//! a machine whose own service is sticky.

use crate::routing::balance::{Want, service_for};
use compact_str::CompactString;
use dashmap::DashMap;
use hangar_api::machine::Sticky;
use hangar_catalog::AppRoutes;
use http::header::{COOKIE, HeaderMap, HeaderValue, SET_COOKIE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Header values remembered at most, over all apps: beyond that new
/// sessions are not pinned (and a warning is logged once per sweep).
pub(crate) const MAX_PINS: usize = 100_000;

/// Header values remembered at most for one app, so one app's clients
/// cannot take every pin.
pub(crate) const MAX_PINS_PER_APP: usize = 10_000;

/// The sticky service of the app's first machine with a service for the
/// request, if it is sticky.
pub(crate) fn of(app: &AppRoutes, want: Want) -> Option<&Sticky> {
    let m = app.machines().first()?;
    m.services[service_for(&m.services, want)?].sticky.as_ref()
}

/// Header-keyed pins, per app and value.
pub(crate) struct Pins {
    map: DashMap<(CompactString, Box<str>), Pinned>,
    /// How many of `map`'s pins each app has (recounted at each sweep).
    per_app: DashMap<CompactString, usize>,
    epoch: Instant,
}

struct Pinned {
    machine: CompactString,
    /// Milliseconds since `epoch` at the last use.
    used: AtomicU64,
    ttl_ms: u64,
}

impl Pins {
    pub(crate) fn new() -> Self {
        Self {
            map: DashMap::new(),
            per_app: DashMap::new(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The machine a request is pinned to, by `sticky`'s key in its
    /// headers.
    pub(crate) fn pinned(
        &self,
        app: &str,
        sticky: &Sticky,
        headers: &HeaderMap,
    ) -> Option<CompactString> {
        if let Some(name) = &sticky.cookie {
            return cookie(headers, name).map(CompactString::from);
        }
        let value = headers.get(sticky.header.as_deref()?)?.to_str().ok()?;
        let key = (CompactString::from(app), Box::<str>::from(value));
        let pin = self.map.get(&key)?;
        let now = self.now();
        if now.saturating_sub(pin.used.load(Ordering::Relaxed)) > pin.ttl_ms {
            return None;
        }
        pin.used.store(now, Ordering::Relaxed);
        Some(pin.machine.clone())
    }

    /// After `machine` answered: a cookie pin is set on the response
    /// unless the request already carried it; a header pin is remembered
    /// when the machine handed out a value.
    pub(crate) fn learn(
        &self,
        app: &str,
        sticky: &Sticky,
        machine: &str,
        pinned: Option<&str>,
        response: &mut HeaderMap,
    ) {
        let ttl = sticky.ttl_secs.unwrap_or(Sticky::DEFAULT_TTL_SECS);
        if let Some(name) = &sticky.cookie {
            if pinned != Some(machine) {
                let set =
                    format!("{name}={machine}; Path=/; Max-Age={ttl}; HttpOnly; SameSite=Lax");
                if let Ok(set) = HeaderValue::from_str(&set) {
                    response.append(SET_COOKIE, set);
                }
            }
            return;
        }
        let Some(name) = sticky.header.as_deref() else {
            return;
        };
        let Some(value) = response.get(name).and_then(|v| v.to_str().ok()) else {
            return;
        };
        if self.map.len() >= MAX_PINS {
            return;
        }
        let app = CompactString::from(app);
        if self
            .per_app
            .get(&app)
            .is_some_and(|n| *n >= MAX_PINS_PER_APP)
        {
            return;
        }
        let pinned = Pinned {
            machine: machine.into(),
            used: AtomicU64::new(self.now()),
            ttl_ms: ttl.saturating_mul(1000),
        };
        // One map's lock at a time: never `per_app`'s while `map`'s is held.
        if self
            .map
            .insert((app.clone(), value.into()), pinned)
            .is_none()
        {
            *self.per_app.entry(app).or_insert(0) += 1;
        }
    }

    /// Forgets pins unused for longer than their ttl.
    pub(crate) fn sweep(&self) {
        let now = self.now();
        let full = self.map.len() >= MAX_PINS;
        self.map
            .retain(|_, p| now.saturating_sub(p.used.load(Ordering::Relaxed)) <= p.ttl_ms);
        let mut counts: std::collections::HashMap<CompactString, usize> = Default::default();
        for pin in self.map.iter() {
            *counts.entry(pin.key().0.clone()).or_insert(0) += 1;
        }
        self.per_app.clear();
        for (app, n) in counts {
            self.per_app.insert(app, n);
        }
        if full {
            tracing::warn!(
                max = MAX_PINS,
                "sticky pins are full; new sessions are not pinned until old ones expire"
            );
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_cookie() -> Sticky {
        Sticky {
            cookie: Some("pin".into()),
            ..Sticky::default()
        }
    }

    fn by_header(ttl: u64) -> Sticky {
        Sticky {
            header: Some("mcp-session-id".into()),
            ttl_secs: Some(ttl),
            ..Sticky::default()
        }
    }

    #[test]
    fn a_cookie_pin_is_set_once_and_read_back() {
        let pins = Pins::new();
        let mut response = HeaderMap::new();
        pins.learn("a", &by_cookie(), "m1", None, &mut response);
        assert_eq!(
            response[SET_COOKIE],
            "pin=m1; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"
        );
        let mut again = HeaderMap::new();
        pins.learn("a", &by_cookie(), "m1", Some("m1"), &mut again);
        assert!(again.is_empty(), "already pinned there");
        let mut request = HeaderMap::new();
        request.insert(COOKIE, "x=1; pin=m1; y=2".parse().unwrap());
        assert_eq!(
            pins.pinned("a", &by_cookie(), &request).as_deref(),
            Some("m1")
        );
        assert_eq!(pins.pinned("a", &by_cookie(), &HeaderMap::new()), None);
    }

    #[test]
    fn a_header_pin_is_remembered_per_app_until_unused_for_its_ttl() {
        let pins = Pins::new();
        let mut response = HeaderMap::new();
        response.insert("mcp-session-id", "s1".parse().unwrap());
        pins.learn("a", &by_header(60), "m1", None, &mut response);
        let mut request = HeaderMap::new();
        request.insert("mcp-session-id", "s1".parse().unwrap());
        assert_eq!(
            pins.pinned("a", &by_header(60), &request).as_deref(),
            Some("m1")
        );
        assert_eq!(pins.pinned("b", &by_header(60), &request), None, "per app");
        request.insert("mcp-session-id", "s2".parse().unwrap());
        assert_eq!(pins.pinned("a", &by_header(60), &request), None);

        // Expired pins are not used and are swept.
        let old = Pins {
            epoch: Instant::now() - std::time::Duration::from_secs(10),
            ..Pins::new()
        };
        old.learn("a", &by_header(1), "m1", None, &mut response);
        old.map
            .iter()
            .for_each(|p| p.used.store(0, Ordering::Relaxed));
        request.insert("mcp-session-id", "s1".parse().unwrap());
        assert_eq!(old.pinned("a", &by_header(1), &request), None);
        old.sweep();
        assert!(old.map.is_empty());
        assert!(old.per_app.is_empty());
    }

    #[test]
    fn one_app_cannot_take_every_pin() {
        let pins = Pins::new();
        let mut response = HeaderMap::new();
        for i in 0..MAX_PINS_PER_APP + 5 {
            response.insert("mcp-session-id", i.to_string().parse().unwrap());
            pins.learn("greedy", &by_header(60), "m1", None, &mut response);
        }
        assert_eq!(pins.map.len(), MAX_PINS_PER_APP);
        pins.learn("other", &by_header(60), "m2", None, &mut response);
        assert_eq!(
            pins.map.len(),
            MAX_PINS_PER_APP + 1,
            "another app still pins"
        );
        pins.sweep();
        assert_eq!(*pins.per_app.get("greedy").unwrap(), MAX_PINS_PER_APP);
    }
}

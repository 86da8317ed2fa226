//! Rate limits per token and action, as Fly publishes them: reads (`GET`)
//! 5 per second with bursts of 10, everything else 1 per second with bursts
//! of 3. The action is the method and the route with its parameters
//! decoded, so limits apply per machine and per operation (`POST
//! .../{id}/start` and `.../{id}/stop` count apart), and one action has one
//! key however its path is spelled (`/v1/apps/hell%6f` is `hello`'s).
//! Paths that match no route share one key per token and method. Over the
//! limit answers 429 with `Retry-After`.

use crate::Flaps;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{Method, StatusCode, header::RETRY_AFTER};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::Deserialize;
use std::num::NonZeroU32;
use std::sync::Arc;

/// The `[flaps.rate_limits]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub get_per_sec: u32,
    pub get_burst: u32,
    pub mutate_per_sec: u32,
    pub mutate_burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            get_per_sec: 5,
            get_burst: 10,
            mutate_per_sec: 1,
            mutate_burst: 3,
        }
    }
}

impl RateLimitConfig {
    /// Every problem, one line each.
    pub fn problems(&self) -> Vec<String> {
        [
            ("get_per_sec", self.get_per_sec),
            ("get_burst", self.get_burst),
            ("mutate_per_sec", self.mutate_per_sec),
            ("mutate_burst", self.mutate_burst),
        ]
        .into_iter()
        .filter(|(_, v)| *v == 0)
        .map(|(k, _)| format!("flaps.rate_limits.{k}: must be at least 1"))
        .collect()
    }
}

/// Keys tracked before idle ones are dropped.
const MAX_KEYS: usize = 100_000;

/// The limiters: one for reads, one for everything else.
pub struct Limits {
    reads: DefaultKeyedRateLimiter<String>,
    writes: DefaultKeyedRateLimiter<String>,
}

fn quota(per_sec: u32, burst: u32) -> Quota {
    let n = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(n(per_sec)).allow_burst(n(burst))
}

impl Limits {
    pub fn new(cfg: &RateLimitConfig) -> Self {
        Self {
            reads: DefaultKeyedRateLimiter::keyed(quota(cfg.get_per_sec, cfg.get_burst)),
            writes: DefaultKeyedRateLimiter::keyed(quota(cfg.mutate_per_sec, cfg.mutate_burst)),
        }
    }

    /// Counts one call; the wait until the next one is allowed if over.
    fn check(&self, method: &Method, key: String) -> Result<(), std::time::Duration> {
        let limiter = if method == Method::GET {
            &self.reads
        } else {
            &self.writes
        };
        if limiter.len() > MAX_KEYS {
            limiter.retain_recent();
        }
        limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The action a request is counted as: its method and route, each
/// parameter in the route's text replaced by its decoded value.
fn action(method: &Method, route: Option<&MatchedPath>, params: &[(String, String)]) -> String {
    let Some(route) = route else {
        return format!("{method} (no such route)");
    };
    let mut path = route.as_str().to_string();
    for (name, value) in params {
        path = path.replace(&format!("{{{name}}}"), value);
    }
    format!("{method} {path}")
}

/// Middleware (after auth and routing): 429 with `Retry-After` over the
/// limit.
pub async fn limit(
    State(flaps): State<Arc<Flaps>>,
    route: Option<MatchedPath>,
    params: Option<Path<Vec<(String, String)>>>,
    req: Request,
    next: Next,
) -> Response {
    let (Some(limits), Some(caller)) = (&flaps.limits, req.extensions().get::<Caller>()) else {
        return next.run(req).await;
    };
    let params = params.map(|Path(p)| p).unwrap_or_default();
    let action = action(req.method(), route.as_ref(), &params);
    let key = format!("{} {action}", caller.token_id);
    match limits.check(req.method(), key) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("rate limit exceeded for {action}: retry in {secs}s"),
            )
            .into_response();
            resp.headers_mut().insert(RETRY_AFTER, secs.max(1).into());
            resp
        }
    }
}

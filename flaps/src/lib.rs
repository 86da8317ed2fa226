//! flaps: Hangar's Machines API gateway, compatible with Fly's public
//! Machines API so existing Fly clients work against it.
//!
//! flaps authenticates the caller (a bearer token that belongs to an org),
//! keeps orgs, tokens and apps in the RIB, validates and places machine
//! requests, and forwards machine operations to the flyd host that owns the
//! machine, relaying its answer. It keeps no machine state of its own.
//!
//! - [`config`]: the `[flaps]` config table.
//! - [`auth`]: tokens (stored hashed) and the auth middleware.
//! - [`ips`]: apps' flycast (private) addresses.
//! - [`openapi`]: `/openapi.json`, the operations Hangar implements.
//! - [`limits`]: rate limits per token and action (429 with `Retry-After`).
//! - [`quotas`]: what one org may hold (403 `quota_exceeded` past it).
//! - [`error`]: [`error::ApiError`], the one place failures become responses.
//! - [`apps`]: `/v1/apps` endpoints.
//! - [`machines`]: `/v1/apps/{app}/machines` endpoints and placement.
//! - [`certificates`]: custom certificates the proxy serves by SNI.
//! - [`secrets`]: app secrets, sealed at rest, given to machines at start.
//! - [`platform`]: regions, placements, the caller's token, an org's machines.
//!
//! Every response carries `fly-request-id`, which the log lines of the
//! request carry too.

pub mod apps;
pub mod auth;
pub mod certificates;
pub mod config;
pub mod error;
pub mod ips;
pub mod limits;
pub mod machines;
pub mod openapi;
pub mod platform;
pub mod quotas;
pub mod secrets;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use hangar_catalog::{ClusterKey, Rib, SecretBox};
use hangar_host_client::HostClient;
use std::sync::Arc;
use std::time::Duration;

pub use config::FlapsConfig;

/// Shared state of the API handlers.
pub struct Flaps {
    pub cfg: FlapsConfig,
    pub rib: Arc<Rib>,
    pub hosts: HostClient,
    /// Seals and opens app secrets.
    pub secrets: Arc<SecretBox>,
    /// Rate limiters, when enabled.
    pub limits: Option<limits::Limits>,
}

impl Flaps {
    /// A gateway over `rib` that reaches hosts with a pooled HTTP client,
    /// presenting `cluster`'s credential.
    pub fn new(
        cfg: FlapsConfig,
        rib: Arc<Rib>,
        secrets: Arc<SecretBox>,
        cluster: &ClusterKey,
    ) -> Arc<Self> {
        let hosts = HostClient::new(Duration::from_millis(cfg.host_timeout_ms), cluster.token());
        let limits = cfg
            .rate_limits
            .enabled
            .then(|| limits::Limits::new(&cfg.rate_limits));
        Arc::new(Self {
            cfg,
            rib,
            hosts,
            secrets,
            limits,
        })
    }
}

/// The whole API: every route requires a valid token.
pub fn router(flaps: Arc<Flaps>) -> Router {
    let body_limit = flaps.cfg.max_body_bytes;
    // Layers run outside in: request id, JSON errors, body limit, auth,
    // rate limit, route.
    Router::new()
        .merge(apps::routes())
        .merge(machines::routes())
        .merge(platform::routes())
        .merge(secrets::routes())
        .merge(certificates::routes())
        .merge(ips::routes())
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(
            flaps.clone(),
            limits::limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            flaps.clone(),
            auth::require_token,
        ))
        // Public: what the API offers, without a token.
        .route("/openapi.json", axum::routing::get(openapi::serve))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(flaps)
}

/// Tags the request and its response with a new `fly-request-id`.
async fn request_id(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let id = ulid::Ulid::new().to_string();
    let span = tracing::debug_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("fly-request-id", value);
    }
    resp
}

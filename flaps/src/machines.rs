//! `/v1/apps/{app}/machines`: machine operations.
//!
//! flaps checks the caller owns the app, validates the request, places new
//! machines on a host of the requested region, and forwards everything else
//! to the host that owns the machine (found through the RIB), relaying the
//! host's status and body unchanged.

use crate::Flaps;
use crate::apps::owned_app;
use crate::auth::Caller;
use crate::error::{ApiError, json_body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hangar_api::host::{HostCreateRequest, HostReply};
use hangar_api::machine::{CreateMachineRequest, Machine};
use hangar_catalog::HostRow;
use reqwest::Method;
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn routes() -> Router<Arc<Flaps>> {
    Router::new()
        .route("/v1/apps/{app}/machines", get(list).post(create))
        .route("/v1/apps/{app}/machines/{id}", get(show).delete(destroy))
        .route("/v1/apps/{app}/machines/{id}/start", post(start))
        .route("/v1/apps/{app}/machines/{id}/stop", post(stop))
        .route("/v1/apps/{app}/machines/{id}/wait", get(wait))
}

/// A host's answer, relayed as it is.
fn relay(reply: HostReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    (status, Json(reply.body)).into_response()
}

/// A host's error answer as an [`ApiError`].
pub(crate) fn relay_error(reply: HostReply) -> ApiError {
    let message = reply.body["error"]
        .as_str()
        .unwrap_or("host error")
        .to_string();
    ApiError::new(
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY),
        message,
    )
}

/// The host that runs machine `id` of `app`; 404 when the app has no such
/// machine (whichever org owns it, nothing else is revealed).
fn locate(flaps: &Flaps, app: &str, id: &str) -> Result<HostRow, ApiError> {
    let not_found = || ApiError::not_found(format!("machine {id:?} not found"));
    let row = flaps
        .rib
        .machine(id)?
        .filter(|m| m.app == app)
        .ok_or_else(not_found)?;
    flaps.rib.host(&row.host)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("host {} of machine {id} is not registered", row.host),
        )
    })
}

/// Placement: the least loaded host of the region.
fn place(flaps: &Flaps, region: &str) -> Result<HostRow, ApiError> {
    let hosts = flaps.rib.hosts(Some(region))?;
    if hosts.is_empty() {
        let known: Vec<String> = flaps
            .rib
            .hosts(None)?
            .into_iter()
            .map(|h| h.region)
            .collect();
        return Err(ApiError::bad_request(format!(
            "region: unknown region {region:?} (known: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    let loads = flaps.rib.host_loads()?;
    let load = |h: &HostRow| {
        loads
            .iter()
            .find(|(id, _)| *id == h.id)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    Ok(hosts
        .into_iter()
        .min_by_key(load)
        .expect("hosts is not empty"))
}

async fn create(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let req: CreateMachineRequest = json_body(body)?;
    req.config.validate().map_err(ApiError::bad_request)?;
    let region = req
        .region
        .clone()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| flaps.cfg.default_region.clone());
    let host = place(&flaps, &region)?;
    let host_req = HostCreateRequest {
        app: app.clone(),
        name: req.name,
        config: req.config,
        skip_launch: req.skip_launch,
    };
    let body = serde_json::to_value(&host_req).expect("requests serialize");
    let reply = flaps
        .hosts
        .call(
            &host.address,
            Method::POST,
            "/v1/machines",
            Some(&body),
            None,
        )
        .await?;
    if reply.status == 200 {
        tracing::info!(app = %app, machine = %reply.body["id"], host = %host.id, "machine created");
    }
    Ok(relay(reply))
}

async fn list(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<Vec<Machine>>, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let mut all = Vec::new();
    for host in flaps.rib.hosts(None)? {
        all.extend(flaps.hosts.list(&host.address, &app).await?);
    }
    all.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    Ok(Json(all))
}

/// A call to forward to the host of machine `id`: `method
/// /v1/machines/{id}{suffix}`.
struct Forward<'a> {
    method: Method,
    suffix: &'a str,
    body: Option<serde_json::Value>,
    timeout: Option<Duration>,
}

impl<'a> Forward<'a> {
    fn new(method: Method, suffix: &'a str) -> Self {
        Self {
            method,
            suffix,
            body: None,
            timeout: None,
        }
    }

    /// Checks the caller owns `app` and `id` is one of its machines, then
    /// relays the host's answer.
    async fn to(
        self,
        flaps: &Flaps,
        caller: &Caller,
        app: &str,
        id: &str,
    ) -> Result<Response, ApiError> {
        owned_app(flaps, caller, app)?;
        let host = locate(flaps, app, id)?;
        let path = format!("/v1/machines/{id}{}", self.suffix);
        let reply = flaps
            .hosts
            .call(
                &host.address,
                self.method,
                &path,
                self.body.as_ref(),
                self.timeout,
            )
            .await?;
        Ok(relay(reply))
    }
}

async fn show(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Forward::new(Method::GET, "")
        .to(&flaps, &caller, &app, &id)
        .await
}

async fn start(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Forward::new(Method::POST, "/start")
        .to(&flaps, &caller, &app, &id)
        .await
}

async fn stop(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: hangar_api::StopRequest = json_body(body)?;
    let body = serde_json::to_value(req).expect("requests serialize");
    Forward {
        body: Some(body),
        ..Forward::new(Method::POST, "/stop")
    }
    .to(&flaps, &caller, &app, &id)
    .await
}

#[derive(serde::Deserialize)]
struct DestroyQuery {
    #[serde(default)]
    force: Option<String>,
    /// Some clients send `kill=true` for the same thing.
    #[serde(default)]
    kill: Option<String>,
}

fn truthy(v: Option<&str>) -> Result<bool, ApiError> {
    match v {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "force: expected true or false, got {other:?}"
        ))),
    }
}

async fn destroy(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, id)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<DestroyQuery>,
) -> Result<Response, ApiError> {
    let force = truthy(q.force.as_deref())? || truthy(q.kill.as_deref())?;
    let suffix = format!("?force={force}");
    Forward::new(Method::DELETE, &suffix)
        .to(&flaps, &caller, &app, &id)
        .await
}

async fn wait(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    // The host validates state and timeout; the call may last up to the
    // longest wait the host accepts, plus a margin.
    let suffix = query
        .map(|q| format!("/wait?{q}"))
        .unwrap_or_else(|| "/wait".into());
    Forward {
        timeout: Some(Duration::from_secs(310)),
        ..Forward::new(Method::GET, &suffix)
    }
    .to(&flaps, &caller, &app, &id)
    .await
}

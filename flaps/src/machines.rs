//! `/v1/apps/{app}/machines`: machine operations.
//!
//! flaps checks the caller owns the app, validates and places new machines
//! on a host of the requested region, and forwards every operation on an
//! existing machine to the host that owns it (found through the RIB): same
//! method, sub-path, query, JSON body and lease nonce, with the host's
//! status and body relayed unchanged. flyd validates the operation itself.

use crate::Flaps;
use crate::apps::owned_app;
use crate::auth::Caller;
use crate::error::{ApiError, json_body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Extension, Json, Router};
use hangar_api::host::{HostCall, HostCreateRequest, HostReply, LEASE_NONCE_HEADER};
use hangar_api::machine::{CreateMachineRequest, Machine};
use hangar_catalog::HostRow;
use reqwest::Method;
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn routes() -> Router<Arc<Flaps>> {
    Router::new()
        .route("/v1/apps/{app}/machines", get(list).post(create))
        .route("/v1/apps/{app}/machines/{id}", any(forward))
        .route("/v1/apps/{app}/machines/{id}/{*rest}", any(forward))
}

/// A host's answer, relayed as it is (no body when the host sent none).
fn relay(reply: HostReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if reply.body.is_null() {
        status.into_response()
    } else {
        (status, Json(reply.body)).into_response()
    }
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

/// Placement: among the region's hosts with room for the guest, the one
/// with the most memory free. 400 for an unknown region, 503
/// `insufficient_capacity` when no host has room.
fn place(flaps: &Flaps, region: &str, guest: (u64, u64)) -> Result<HostRow, ApiError> {
    let hosts = flaps.rib.hosts(Some(region))?;
    if hosts.is_empty() {
        let mut known: Vec<String> = flaps
            .rib
            .hosts(None)?
            .into_iter()
            .map(|h| h.region)
            .collect();
        known.dedup();
        return Err(ApiError::bad_request(format!(
            "region: unknown region {region:?} (known: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    let (cpus, memory_mb) = guest;
    hosts
        .into_iter()
        .filter(|h| h.capacity.fits(cpus, memory_mb))
        .max_by_key(|h| h.capacity.memory_mb - h.capacity.memory_mb_reserved)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no host in region {region:?} has room for {cpus} vCPUs and {memory_mb} MB"
                ),
            )
            .with_code("insufficient_capacity")
        })
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
    let host = place(&flaps, &region, req.config.reservation())?;
    let host_req = HostCreateRequest {
        app: app.clone(),
        machine: req,
    };
    let body = serde_json::to_value(&host_req).expect("requests serialize");
    let call = HostCall {
        body: Some(&body),
        ..HostCall::new(Method::POST, "/v1/machines")
    };
    let reply = flaps.hosts.call(&host.address, call).await?;
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

/// The path parameters of a machine operation: `{id}` alone, or with the
/// sub-path after it (`start`, `lease`, `metadata/{key}`, ...).
#[derive(serde::Deserialize)]
struct MachinePath {
    app: String,
    id: String,
    #[serde(default)]
    rest: Option<String>,
}

/// How long a `wait` may take at the host (its longest timeout), plus a margin.
const WAIT_CALL: Duration = Duration::from_secs(310);

/// Forwards an operation on an existing machine to its host.
async fn forward(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    method: Method,
    Path(p): Path<MachinePath>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    owned_app(&flaps, &caller, &p.app)?;
    let host = locate(&flaps, &p.app, &p.id)?;
    let body = json_value(body)?;
    let mut path = format!("/v1/machines/{}", p.id);
    if let Some(rest) = &p.rest {
        path.push('/');
        path.push_str(rest);
    }
    if let Some(q) = &query {
        path.push('?');
        path.push_str(q);
    }
    let nonce = headers
        .get(LEASE_NONCE_HEADER)
        .and_then(|v| v.to_str().ok());
    let call = HostCall {
        body: body.as_ref(),
        timeout: (p.rest.as_deref() == Some("wait")).then_some(WAIT_CALL),
        lease_nonce: nonce,
        ..HostCall::new(method, &path)
    };
    Ok(relay(flaps.hosts.call(&host.address, call).await?))
}

/// The request body as JSON, or none when it is empty.
fn json_value(body: Result<Bytes, BytesRejection>) -> Result<Option<serde_json::Value>, ApiError> {
    let bytes =
        body.map_err(|r| ApiError::new(r.status(), format!("request body: {}", r.body_text())))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

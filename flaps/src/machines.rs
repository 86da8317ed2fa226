//! `/v1/apps/{app}/machines`: machine operations.
//!
//! flaps checks the caller owns the app, validates and places new machines
//! on a host of the requested region, and forwards each of the spec's
//! operations on an existing machine to the host that owns it (found
//! through the RIB): same method, operation, query, JSON body and lease
//! nonce, with the host's status and body relayed unchanged. flyd validates
//! the operation itself.
//!
//! Only what was authorized is forwarded: each operation has a route of its
//! own (nothing of the client's path is copied into the host's), the id
//! must be a machine id, the metadata key is one encoded segment, and the
//! host finds the machine only under the app flaps authorized.

use crate::Flaps;
use crate::apps::owned_app;
use crate::auth::Caller;
use crate::error::{ApiError, json_body, non_blank, parse_json};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hangar_api::MachineId;
use hangar_api::host::{self, LEASE_NONCE_HEADER};
use hangar_api::list::{ListQuery, MAX_PAGE};
use hangar_api::machine::{CreateMachineRequest, Machine};
use hangar_catalog::HostRow;
use hangar_host_client::{HostCall, HostReply};
use reqwest::Method;
use std::sync::Arc;
use std::time::Duration;

/// The machine operations, as the spec's Machines paths name them.
const MACHINE: &str = "/v1/apps/{app}/machines/{id}";

pub(crate) fn routes() -> Router<Arc<Flaps>> {
    let op = |rest: &str| format!("{MACHINE}{rest}");
    Router::new()
        .route("/v1/apps/{app}/machines", get(list).post(create))
        .route(
            MACHINE,
            get(forward).post(forward).put(forward).delete(forward),
        )
        .route(&op("/start"), post(forward))
        .route(&op("/stop"), post(forward))
        .route(&op("/suspend"), post(forward))
        .route(&op("/restart"), post(forward))
        .route(&op("/cordon"), post(forward))
        .route(&op("/uncordon"), post(forward))
        .route(&op("/wait"), get(forward))
        .route(&op("/events"), get(forward))
        .route(&op("/versions"), get(forward))
        .route(&op("/lease"), get(forward).post(forward).delete(forward))
        .route(&op("/metadata"), get(forward).put(forward).patch(forward))
        .route(
            &op("/metadata/{key}"),
            get(forward).post(forward).delete(forward),
        )
        .route(&op("/signal"), post(forward))
        .route(&op("/exec"), post(forward))
        .route(&op("/ps"), get(forward))
        .route(&op("/memory"), get(forward).put(forward))
        .route(&op("/memory/reclaim"), post(forward))
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

/// Placement without a requested region: the default region (the one
/// nearest the API), else any other region with room, by name.
fn place_anywhere(flaps: &Flaps, guest: (u64, u64)) -> Result<HostRow, ApiError> {
    let first = place(flaps, &flaps.cfg.default_region, guest);
    if first.is_ok() {
        return first;
    }
    let mut regions: Vec<String> = flaps
        .rib
        .hosts(None)?
        .into_iter()
        .map(|h| h.region)
        .collect();
    regions.sort();
    regions.dedup();
    regions
        .iter()
        .filter(|r| **r != flaps.cfg.default_region)
        .find_map(|r| place(flaps, r, guest).ok())
        .map_or(first, Ok)
}

async fn create(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let owner = owned_app(&flaps, &caller, &app)?;
    let req: CreateMachineRequest = json_body(body)?;
    crate::quotas::check(&flaps, &owner.org_slug, crate::quotas::Counted::Machines, 1)?;
    req.config.validate().map_err(ApiError::bad_request)?;
    let guest = req.config.reservation();
    let host = match req.region.as_deref().filter(|r| !r.is_empty()) {
        Some(region) => place(&flaps, region, guest)?,
        None => place_anywhere(&flaps, guest)?,
    };
    let body = serde_json::to_value(&req).expect("requests serialize");
    let path = host::machines_path(&app);
    let call = HostCall {
        body: Some(&body),
        ..HostCall::new(Method::POST, &path)
    };
    let reply = flaps.hosts.call(&host.address, call).await?;
    if reply.status == 200 {
        tracing::info!(app = %app, machine = %reply.body["id"], host = %host.id, "machine created");
    }
    Ok(relay(reply))
}

/// One page of `app`'s machines that `q` keeps, over every host, and the
/// cursor of the next page when more may remain. Each host sends at most a
/// page (filtered, ordered by id, after the cursor), never its whole
/// listing; the pages are merged by id. Without a `limit`, each host is
/// paged through to its end.
pub(crate) async fn machines_of(
    flaps: &Flaps,
    app: &str,
    q: &ListQuery,
) -> Result<(Vec<Machine>, Option<String>), ApiError> {
    let mut all = Vec::new();
    let mut more = false;
    for host in flaps.rib.hosts(None)? {
        let limit = q.limit.unwrap_or(MAX_PAGE);
        let mut cursor = q.cursor.clone();
        loop {
            let page = flaps
                .hosts
                .list(&host.address, app, q, (cursor.as_deref(), limit))
                .await?;
            let full = page.len() == limit;
            cursor = page.last().map(|m| m.id.clone());
            all.extend(page);
            if q.limit.is_some() {
                // A full page may have more behind it.
                more |= full;
                break;
            }
            if !full {
                break;
            }
        }
    }
    Ok(q.cut(all, more))
}

/// A machine as `summary=true` shows it: without config, checks, events.
fn summarize(m: &Machine) -> serde_json::Value {
    let mut v = serde_json::to_value(m).expect("machines serialize");
    if let Some(obj) = v.as_object_mut() {
        for key in ["config", "checks", "events", "host_status", "nonce"] {
            obj.remove(key);
        }
    }
    v
}

async fn list(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let q = ListQuery::parse(pairs).map_err(ApiError::bad_request)?;
    let (page, next) = machines_of(&flaps, &app, &q).await?;
    let body: Vec<serde_json::Value> = if q.summary {
        page.iter().map(summarize).collect()
    } else {
        page.iter()
            .map(|m| serde_json::to_value(m).expect("machines serialize"))
            .collect()
    };
    let mut resp = Json(body).into_response();
    if let Some(cursor) = next.and_then(|c| axum::http::HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert("fly-next-cursor", cursor);
    }
    Ok(resp)
}

/// The path parameters of a machine operation: the app, the machine, and
/// for `metadata/{key}` the key.
#[derive(serde::Deserialize)]
struct MachinePath {
    app: String,
    id: String,
    #[serde(default)]
    key: Option<String>,
}

/// How long a `wait` may take at the host (its longest timeout), plus a margin.
const WAIT_CALL: Duration = Duration::from_secs(310);

/// Forwards an operation on an existing machine to its host.
async fn forward(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    route: MatchedPath,
    Path(p): Path<MachinePath>,
    request: Parts,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // Another org's machine answers as a missing one: nothing about it leaks.
    owned_app(&flaps, &caller, &p.app).map_err(|e| {
        if e.status == StatusCode::FORBIDDEN {
            ApiError::not_found(format!("machine {:?} not found", p.id))
        } else {
            e
        }
    })?;
    if !MachineId::valid(&p.id) {
        return Err(ApiError::not_found(format!("machine {:?} not found", p.id)));
    }
    let host = locate(&flaps, &p.app, &p.id)?;
    let body = json_value(body)?;
    // The operation is the route's own text after `{id}`, never the client's.
    let op = route.as_str().strip_prefix(MACHINE).unwrap_or_default();
    let rest = match (op.strip_suffix("{key}"), &p.key) {
        (Some(prefix), Some(key)) => format!("{prefix}{}", metadata_key(key)?),
        _ => op.to_string(),
    };
    let mut path = host::machine_path(&p.app, &p.id, &rest);
    if let Some(q) = request.uri.query() {
        path.push('?');
        path.push_str(q);
    }
    let nonce = request
        .headers
        .get(LEASE_NONCE_HEADER)
        .and_then(|v| v.to_str().ok());
    let call = HostCall {
        body: body.as_ref(),
        timeout: (op == "/wait").then_some(WAIT_CALL),
        lease_nonce: nonce,
        ..HostCall::new(request.method.clone(), &path)
    };
    Ok(relay(flaps.hosts.call(&host.address, call).await?))
}

/// A metadata key as one path segment of the host's path: `.` and `..`
/// are refused (they name no key, only other paths).
fn metadata_key(key: &str) -> Result<String, ApiError> {
    if key.is_empty() || key == "." || key == ".." {
        return Err(ApiError::bad_request(format!(
            "metadata key {key:?} is not a key"
        )));
    }
    Ok(host::segment(key))
}

/// The request body as JSON, or none when it is empty.
fn json_value(body: Result<Bytes, BytesRejection>) -> Result<Option<serde_json::Value>, ApiError> {
    non_blank(body)?.map(|bytes| parse_json(&bytes)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_prefers_the_default_region_then_any_with_room() {
        use hangar_catalog::{HostCapacity, Rib, SecretBox};
        let dir = tempfile::tempdir().unwrap();
        let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
        let host = |id: &str, region: &str, free_mb: u64| HostRow {
            id: id.into(),
            region: region.into(),
            address: "127.0.0.1:1".into(),
            updated_at: 0,
            capacity: HostCapacity {
                cpus: 16,
                memory_mb: 1024,
                cpus_reserved: 0,
                memory_mb_reserved: 1024 - free_mb,
            },
        };
        rib.upsert_host(&host("d1", "dev", 256)).unwrap();
        rib.upsert_host(&host("a1", "ams", 1024)).unwrap();
        rib.upsert_host(&host("a2", "ams", 512)).unwrap();
        let secrets =
            std::sync::Arc::new(SecretBox::load_or_create(&dir.path().join("k")).unwrap());
        let cluster = hangar_catalog::ClusterKey::load_or_create(&dir.path().join("c")).unwrap();
        let flaps = Flaps::new(crate::FlapsConfig::default(), rib, secrets, &cluster);
        assert_eq!(place_anywhere(&flaps, (1, 256)).unwrap().id, "d1");
        // The default region is full for 512 MB: the roomiest host elsewhere.
        assert_eq!(place_anywhere(&flaps, (1, 512)).unwrap().id, "a1");
        let err = place_anywhere(&flaps, (1, 4096)).unwrap_err();
        assert_eq!(err.body.status.as_deref(), Some("insufficient_capacity"));
        let err = place(&flaps, "mars", (1, 256)).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.body.error.contains("ams, dev"), "{}", err.body.error);
    }
}

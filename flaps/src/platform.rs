//! Platform endpoints: the caller's token, regions, placement previews, and
//! an org's machines across its apps.

use crate::Flaps;
use crate::auth::Caller;
use crate::error::{ApiError, json_body};
use crate::machines::machines_of;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hangar_api::list::ListQuery;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

pub(crate) fn routes() -> Router<Arc<Flaps>> {
    Router::new()
        .route("/v1/tokens/current", get(current_token))
        .route("/v1/platform/regions", get(regions))
        .route("/v1/platform/placements", post(placements))
        .route("/v1/orgs/{org}/machines", get(org_machines))
}

/// `GET /v1/tokens/current`: what the caller's token is.
async fn current_token(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let name = flaps
        .rib
        .org_name(&caller.org)?
        .unwrap_or_else(|| caller.org.clone());
    Ok(Json(json!({
        "tokens": [{
            "token_id": caller.token_id,
            "org_slug": caller.org,
            "organization": name,
            "apps": [],
        }]
    })))
}

/// `GET /v1/platform/regions`: the regions that have hosts.
async fn regions(State(flaps): State<Arc<Flaps>>) -> Result<Json<Value>, ApiError> {
    let mut codes: Vec<String> = flaps
        .rib
        .hosts(None)?
        .into_iter()
        .map(|h| h.region)
        .collect();
    codes.sort();
    codes.dedup();
    let rows: Vec<Value> = codes
        .iter()
        .map(|code| {
            json!({
                "code": code, "name": code, "deprecated": false,
                "gateway_available": false, "requires_paid_plan": false,
            })
        })
        .collect();
    Ok(Json(
        json!({ "regions": rows, "nearest": flaps.cfg.default_region }),
    ))
}

#[derive(Deserialize, Default)]
struct PlacementsRequest {
    #[serde(default)]
    org_slug: Option<String>,
    #[serde(default)]
    compute: Option<hangar_api::machine::MachineGuest>,
    /// Comma-separated regions; all regions when absent.
    #[serde(default)]
    region: Option<String>,
}

/// `POST /v1/platform/placements`: how many machines of `compute` each
/// region can take now.
async fn placements(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: PlacementsRequest = json_body(body)?;
    if let Some(org) = req.org_slug.as_deref().filter(|o| *o != caller.org) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("org_slug: not authorized for org {org:?}"),
        ));
    }
    let config = hangar_api::MachineConfig {
        guest: req.compute,
        ..Default::default()
    };
    let (cpus, memory_mb) = config.reservation();
    let wanted: Option<Vec<String>> = req
        .region
        .filter(|r| !r.is_empty())
        .map(|r| r.split(',').map(|s| s.trim().to_string()).collect());
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for host in flaps.rib.hosts(None)? {
        if wanted.as_ref().is_some_and(|w| !w.contains(&host.region)) {
            continue;
        }
        let c = host.capacity;
        let by_cpu = c.cpus.saturating_sub(c.cpus_reserved) / cpus.max(1);
        let by_mem = c.memory_mb.saturating_sub(c.memory_mb_reserved) / memory_mb.max(1);
        *counts.entry(host.region).or_default() += by_cpu.min(by_mem);
    }
    let regions: Vec<Value> = counts
        .into_iter()
        .map(|(region, count)| json!({ "region": region, "count": count }))
        .collect();
    Ok(Json(json!({ "regions": regions })))
}

/// `GET /v1/orgs/{org}/machines`: the org's machines across its apps, with
/// the machine list's filters and paging.
async fn org_machines(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(org): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    if org != caller.org {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("not authorized for org {org:?}"),
        ));
    }
    let q = ListQuery::parse(pairs).map_err(ApiError::bad_request)?;
    let mut all = Vec::new();
    let mut more = false;
    let mut app_of = BTreeMap::new();
    for app in flaps.rib.apps(Some(&org))? {
        let (machines, next) = machines_of(&flaps, &app.name, &q).await?;
        more |= next.is_some();
        for m in machines {
            app_of.insert(m.id.clone(), app.name.clone());
            all.push(m);
        }
    }
    let (page, next) = q.cut(all, more);
    let machines: Vec<Value> = page
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "name": m.name, "state": m.state, "region": m.region,
                "app_name": app_of.get(&m.id), "private_ip": m.private_ip,
                "version": m.version, "created_at": m.created_at, "updated_at": m.updated_at,
            })
        })
        .collect();
    let mut body = json!({ "machines": machines });
    if let Some(next) = next {
        body["next_cursor"] = next.into();
    }
    Ok(Json(body))
}

//! `/v1/apps`: create, list, show and delete apps.

use crate::Flaps;
use crate::auth::Caller;
use crate::error::{ApiError, json_body};
use crate::quotas::Counted;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Extension, Json, Router};
use hangar_api::AppName;
use hangar_api::app::{
    App, AppOrganization, CreateAppRequest, CreateAppResponse, ListAppsResponse,
};
use hangar_api::host;
use hangar_api::machine::MachineState;
use hangar_catalog::{AppRow, RibError};
use hangar_host_client::HostCall;
use serde::Deserialize;
use std::sync::Arc;

pub(crate) fn routes() -> Router<Arc<Flaps>> {
    Router::new()
        .route("/v1/apps", get(list).post(create))
        .route("/v1/apps/{app}", get(show).delete(delete))
}

/// The app `name` if the caller's org owns it: 404 when it does not exist,
/// 403 when another org owns it (as Fly answers).
pub(crate) fn owned_app(flaps: &Flaps, caller: &Caller, name: &str) -> Result<AppRow, ApiError> {
    let app = flaps
        .rib
        .app(name)?
        .ok_or_else(|| ApiError::not_found(format!("app {name:?} not found")))?;
    if app.org_slug != caller.org {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("not authorized to access app {name:?}"),
        ));
    }
    Ok(app)
}

fn to_api(flaps: &Flaps, app: AppRow) -> Result<App, ApiError> {
    let machine_count = flaps
        .rib
        .machines_of_app(&app.name)?
        .iter()
        .filter(|m| m.state != MachineState::Destroyed)
        .count() as u64;
    let org_name = flaps
        .rib
        .org_name(&app.org_slug)?
        .unwrap_or_else(|| app.org_slug.clone());
    Ok(App {
        id: app.id,
        name: app.name,
        organization: AppOrganization {
            name: org_name,
            slug: app.org_slug,
        },
        network: app.network,
        status: if machine_count > 0 {
            "deployed"
        } else {
            "pending"
        }
        .to_string(),
        machine_count,
    })
}

async fn create(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<CreateAppResponse>), ApiError> {
    let req: CreateAppRequest = json_body(body)?;
    let name = req
        .app_name
        .ok_or_else(|| ApiError::bad_request("app_name: required"))?;
    let name: String = name
        .parse::<AppName>()
        .map_err(|e| ApiError::bad_request(format!("app_name: {e}")))?
        .into();
    let org = match req.org_slug.as_deref() {
        None | Some("") => caller.org.clone(),
        Some(slug) if slug == caller.org => caller.org.clone(),
        Some(slug) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("org_slug: not authorized for org {slug:?}"),
            ));
        }
    };
    crate::quotas::check(&flaps, &org, Counted::Apps, 1)?;
    let row = AppRow {
        id: format!("app_{}", hex_id()),
        name: name.clone(),
        org_slug: org,
        network: req
            .network
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
        created_at: hangar_api::time::now_ms(),
    };
    match flaps.rib.create_app(&row) {
        Ok(()) => {}
        Err(RibError::Conflict { .. }) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("app name {name:?} is already taken"),
            )
            .with_code("name_taken"));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(app = %name, "app created");
    Ok((
        StatusCode::CREATED,
        Json(CreateAppResponse {
            id: row.id,
            created_at: row.created_at,
        }),
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    org_slug: Option<String>,
}

async fn list(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> Result<Json<ListAppsResponse>, ApiError> {
    // A token sees its own org only: another org's slug lists nothing.
    let org = q
        .org_slug
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| caller.org.clone());
    let rows = if org == caller.org {
        flaps.rib.apps(Some(&org))?
    } else {
        Vec::new()
    };
    let apps = rows
        .into_iter()
        .map(|a| to_api(&flaps, a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(ListAppsResponse {
        total_apps: apps.len() as u64,
        apps,
    }))
}

async fn show(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<App>, ApiError> {
    let app = owned_app(&flaps, &caller, &name)?;
    Ok(Json(to_api(&flaps, app)?))
}

/// Deletes an app after force-destroying its machines. If a host cannot be
/// reached, nothing more is destroyed and the app stays (503), so no machine
/// is left running without its app.
async fn delete(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    owned_app(&flaps, &caller, &name)?;
    for m in flaps.rib.machines_of_app(&name)? {
        if m.state == MachineState::Destroyed {
            continue;
        }
        let host = flaps.rib.host(&m.host)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("host {} of machine {} is unknown", m.host, m.id),
            )
        })?;
        let reply = flaps
            .hosts
            .call(
                &host.address,
                HostCall::new(
                    reqwest::Method::DELETE,
                    &format!("{}?force=true", host::machine_path(&name, &m.id, "")),
                ),
            )
            .await?;
        // 412 here means it was destroyed meanwhile.
        if reply.status != 200 && reply.status != 412 {
            return Err(crate::machines::relay_error(reply));
        }
    }
    // Every host forgets the app's machines before its name is free: a new
    // app of that name (anyone's) must find none of them.
    for host in flaps.rib.hosts(None)? {
        let path = host::machines_path(&name);
        let reply = flaps
            .hosts
            .call(&host.address, HostCall::new(reqwest::Method::DELETE, &path))
            .await?;
        if reply.status != 200 {
            return Err(crate::machines::relay_error(reply));
        }
    }
    flaps.rib.delete_app(&name)?;
    flaps.rib.forget_machines_of_app(&name)?;
    flaps.rib.forget_app_data(&name)?;
    tracing::info!(app = %name, "app deleted");
    Ok(StatusCode::ACCEPTED)
}

/// A RIB time (milliseconds) as RFC 3339, as the API writes times.
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn hex_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

//! `/v1/apps/{app}/ip_assignments`: an app's own addresses.
//!
//! Two types, each from a loopback IPv4 block so a proxy can listen on them
//! on any host without IPv6 or routing setup:
//!
//! - `private_v6` (flycast): from `flycast_range` (default `127.20.0.0/16`);
//! - `v4` (a dedicated public address, what Fly gives apps with non-HTTP
//!   services): from `public_range` (default `127.30.0.0/16`).
//!
//! The proxy listens on every assigned address, on each service port of the
//! app's machines, with that port's handlers. `shared_v4` is not assigned:
//! the proxy's own HTTP/HTTPS listeners already serve every app by Host and
//! SNI.

use crate::Flaps;
use crate::apps::owned_app;
use crate::auth::Caller;
use crate::error::{ApiError, json_body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use hangar_catalog::{IpRow, RibError};
use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

pub(crate) fn routes() -> Router<Arc<Flaps>> {
    Router::new()
        .route("/v1/apps/{app}/ip_assignments", get(list).post(assign))
        .route("/v1/apps/{app}/ip_assignments/{ip}", delete(release))
}

fn shown(row: &IpRow) -> Value {
    json!({
        "ip": row.ip,
        "region": row.region,
        "service_name": row.service_name,
        "shared": false,
        "egress": false,
        "network": { "name": row.network, "org_slug": "" },
        "created_at": crate::apps::rfc3339(row.created_at),
    })
}

#[derive(Deserialize, Default)]
struct AssignRequest {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    service_name: Option<String>,
}

async fn assign(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let owner = owned_app(&flaps, &caller, &app)?;
    crate::quotas::check(&flaps, &owner.org_slug, crate::quotas::Counted::Ips, 1)?;
    let req: AssignRequest = json_body(body)?;
    let (kind, block) = match req.kind.as_deref() {
        Some("private_v6") => ("private_v6", &flaps.cfg.flycast_range),
        Some("v4") => ("v4", &flaps.cfg.public_range),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "type: {other:?} is not available in Hangar; \"private_v6\" (flycast) and \"v4\" (dedicated) are"
            )));
        }
        None => {
            return Err(ApiError::bad_request(
                "type: required (\"private_v6\" or \"v4\")",
            ));
        }
    };
    let hosts = block.hosts();
    let used: HashSet<String> = flaps.rib.ips(None)?.into_iter().map(|r| r.ip).collect();
    let mut row = IpRow {
        ip: String::new(),
        app: app.clone(),
        kind: kind.into(),
        network: req.network.unwrap_or_else(|| owner.network.clone()),
        region: req.region.unwrap_or_default(),
        service_name: req.service_name.unwrap_or_default(),
        created_at: hangar_api::time::now_ms(),
    };
    // Random picks keep concurrent assignments apart; the RIB's primary key
    // settles the rare race.
    for _ in 0..100 {
        let ip = Ipv4Addr::from(rand::rng().random_range(hosts.clone())).to_string();
        if used.contains(&ip) {
            continue;
        }
        row.ip = ip;
        match flaps.rib.add_ip(&row) {
            Ok(()) => return Ok(Json(shown(&row))),
            Err(RibError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("no free {kind} address in {block}"),
    ))
}

async fn list(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<Value>, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let ips: Vec<Value> = flaps.rib.ips(Some(&app))?.iter().map(shown).collect();
    Ok(Json(json!({ "ips": ips })))
}

async fn release(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, ip)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    if flaps.rib.release_ip(&app, &ip)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "app {app:?} has no address {ip:?}"
        )))
    }
}

//! `/v1/apps/{app}/secrets`: app secrets. Values are sealed at rest
//! ([`hangar_catalog::SecretBox`]), never returned unless `show_secrets` is
//! asked for, and reach machines as environment variables when they next
//! start (flyd opens them at launch). Each change bumps the app's secrets
//! version.

use crate::Flaps;
use crate::apps::{owned_app, rfc3339};
use crate::auth::Caller;
use crate::error::{ApiError, json_body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Extension, Json, Router};
use hangar_catalog::{AppRow, SealedSecret, SecretRow};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest secret value accepted (64 KiB).
const MAX_VALUE: usize = 64 << 10;

pub(crate) fn routes() -> Router<Arc<Flaps>> {
    Router::new()
        .route("/v1/apps/{app}/secrets", get(list).post(update))
        .route(
            "/v1/apps/{app}/secrets/{name}",
            get(show).post(set).delete(unset),
        )
}

/// Whether `name` can be an environment variable name.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    (1..=256).contains(&name.len())
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check(name: &str, value: Option<&str>) -> Result<(), ApiError> {
    if !valid_name(name) {
        return Err(ApiError::bad_request(format!(
            "secret name {name:?}: use letters, digits and '_', not starting with a digit"
        )));
    }
    if value.is_some_and(|v| v.len() > MAX_VALUE) {
        return Err(ApiError::bad_request(format!(
            "secret {name}: value is over {MAX_VALUE} bytes"
        )));
    }
    Ok(())
}

fn digest(value: &str) -> String {
    hex::encode(&Sha256::digest(value.as_bytes())[..8])
}

/// A secret as the API shows it; the value only when asked and it opens.
fn shown(flaps: &Flaps, app: &str, row: &SecretRow, show: bool) -> Result<Value, ApiError> {
    let mut v = json!({
        "name": row.name,
        "digest": row.digest,
        "created_at": rfc3339(row.created_at),
        "updated_at": rfc3339(row.updated_at),
    });
    if show {
        let plain = flaps
            .secrets
            .open(app, &row.name, &row.sealed)
            .map_err(|e| {
                tracing::error!(error = %e, "flaps: a secret does not open");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "a stored secret does not open; see the server log",
                )
            })?;
        v["value"] = String::from_utf8_lossy(&plain).into_owned().into();
    }
    Ok(v)
}

#[derive(Deserialize)]
struct ShowQuery {
    #[serde(default)]
    show_secrets: Option<String>,
}

impl ShowQuery {
    fn show(&self) -> bool {
        matches!(self.show_secrets.as_deref(), Some("" | "true" | "1"))
    }
}

async fn list(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Result<Json<Value>, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let secrets = flaps
        .rib
        .secrets(&app)?
        .iter()
        .map(|row| shown(&flaps, &app, row, q.show()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "secrets": secrets })))
}

async fn show(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, name)): Path<(String, String)>,
    Query(q): Query<ShowQuery>,
) -> Result<Json<Value>, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let row = flaps
        .rib
        .secrets(&app)?
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ApiError::not_found(format!("secret {name:?} not found")))?;
    Ok(Json(shown(&flaps, &app, &row, q.show())?))
}

/// Applies changes (`Some` sets, `None` unsets) to `owner`'s secrets;
/// returns the new version.
fn apply(
    flaps: &Flaps,
    owner: &AppRow,
    changes: BTreeMap<String, Option<String>>,
) -> Result<u64, ApiError> {
    let app = owner.name.as_str();
    for (name, value) in &changes {
        check(name, value.as_deref())?;
    }
    let held = flaps.rib.secrets(app)?;
    let new = changes
        .iter()
        .filter(|(name, value)| value.is_some() && !held.iter().any(|s| &s.name == *name))
        .count();
    if new > 0 {
        crate::quotas::check(flaps, &owner.org_slug, crate::quotas::Counted::Secrets, new)?;
    }
    let sealed: Vec<(String, Option<SealedSecret>)> = changes
        .into_iter()
        .map(|(name, value)| {
            let sealed = value.map(|v| SealedSecret {
                sealed: flaps.secrets.seal(app, &name, v.as_bytes()),
                digest: digest(&v),
            });
            (name, sealed)
        })
        .collect();
    Ok(flaps.rib.update_secrets(app, &sealed)?)
}

#[derive(Deserialize, Default)]
struct UpdateRequest {
    #[serde(default)]
    values: BTreeMap<String, Option<String>>,
}

/// `POST /secrets`: set and unset (`null`) several at once.
async fn update(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let owner = owned_app(&flaps, &caller, &app)?;
    let req: UpdateRequest = json_body(body)?;
    if req.values.is_empty() {
        return Err(ApiError::bad_request(
            "values: give at least one secret to set or unset",
        ));
    }
    let version = apply(&flaps, &owner, req.values)?;
    let secrets = flaps
        .rib
        .secrets(&app)?
        .iter()
        .map(|row| shown(&flaps, &app, row, false))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "secrets": secrets, "version": version })))
}

#[derive(Deserialize, Default)]
struct SetRequest {
    value: Option<String>,
}

async fn set(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let owner = owned_app(&flaps, &caller, &app)?;
    let req: SetRequest = json_body(body)?;
    let value = req
        .value
        .ok_or_else(|| ApiError::bad_request("value: required"))?;
    let version = apply(
        &flaps,
        &owner,
        BTreeMap::from([(name.clone(), Some(value))]),
    )?;
    let row = flaps
        .rib
        .secrets(&app)?
        .into_iter()
        .find(|r| r.name == name);
    let mut v = match row {
        Some(row) => shown(&flaps, &app, &row, false)?,
        None => json!({ "name": name }),
    };
    v["version"] = version.into();
    Ok((StatusCode::CREATED, Json(v)))
}

async fn unset(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let owner = owned_app(&flaps, &caller, &app)?;
    if !flaps.rib.secrets(&app)?.iter().any(|r| r.name == name) {
        return Err(ApiError::not_found(format!("secret {name:?} not found")));
    }
    let version = apply(&flaps, &owner, BTreeMap::from([(name, None)]))?;
    Ok(Json(json!({ "version": version })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_env_vars() {
        for good in ["DATABASE_URL", "_x", "a1"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "É"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_306_505_451), "2026-11-22T00:15:05Z");
    }
}

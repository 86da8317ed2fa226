//! `/v1/apps/{app}/certificates`: custom certificates. An uploaded
//! certificate and key (PEM) for a hostname make the proxy serve that
//! certificate for the hostname (by SNI) and route the hostname to the app.
//! The key is sealed at rest like a secret. ACME is not offered (501).

use crate::Flaps;
use crate::apps::owned_app;
use crate::auth::Caller;
use crate::error::{ApiError, json_body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use hangar_catalog::secrets::CERTIFICATE_KEYS;
use hangar_catalog::{CertificateRow, RibError};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

pub(crate) fn routes() -> Router<Arc<Flaps>> {
    Router::new()
        .route("/v1/apps/{app}/certificates", get(list))
        .route("/v1/apps/{app}/certificates/custom", post(upload))
        .route("/v1/apps/{app}/certificates/acme", post(no_acme))
        .route(
            "/v1/apps/{app}/certificates/{hostname}",
            get(show).delete(remove),
        )
        .route(
            "/v1/apps/{app}/certificates/{hostname}/custom",
            delete(remove_custom),
        )
        .route(
            "/v1/apps/{app}/certificates/{hostname}/acme",
            delete(no_acme),
        )
        .route(
            "/v1/apps/{app}/certificates/{hostname}/check",
            post(no_acme),
        )
}

/// Whether `name` is a hostname the proxy can serve: a DNS name, not under
/// `.localhost` (those name apps already).
fn valid_hostname(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && !name.ends_with(".localhost")
        && name.split('.').count() >= 2
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Checks that the chain and key parse, belong together, and that the
/// certificate is valid for `hostname` (its names, not its trust chain:
/// a self-signed certificate is the uploader's choice).
fn check_pair(hostname: &str, fullchain: &str, private_key: &str) -> Result<(), ApiError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(fullchain.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::bad_request(format!("fullchain: not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(ApiError::bad_request("fullchain: no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(private_key.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("private_key: not a PEM private key: {e}")))?;
    let name = rustls::pki_types::ServerName::try_from(hostname)
        .map_err(|e| ApiError::bad_request(format!("hostname: {e}")))?;
    webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| {
            ApiError::bad_request(format!("fullchain: unreadable leaf certificate: {e:?}"))
        })?
        .verify_is_valid_for_subject_name(&name)
        .map_err(|_| {
            ApiError::bad_request(format!(
                "fullchain: the certificate is not valid for {hostname:?}"
            ))
        })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| ApiError::bad_request(format!("private_key: unsupported key: {e}")))?;
    rustls::sign::CertifiedKey::new(chain, signing)
        .keys_match()
        .map_err(|_| ApiError::bad_request("private_key: does not match the certificate"))
}

fn summary(row: &CertificateRow) -> Value {
    let created = crate::apps::rfc3339(row.created_at);
    json!({
        "hostname": row.hostname,
        "configured": true,
        "status": "active",
        "has_custom_certificate": true,
        "has_fly_certificate": false,
        "acme_requested": false,
        "created_at": created,
        "updated_at": created,
    })
}

fn detail(row: &CertificateRow) -> Value {
    let s = summary(row);
    json!({
        "hostname": row.hostname,
        "configured": true,
        "status": "active",
        "acme_requested": false,
        "certificates": [{ "source": "custom", "status": "active", "created_at": s["created_at"] }],
    })
}

#[derive(Deserialize, Default)]
struct UploadRequest {
    hostname: Option<String>,
    fullchain: Option<String>,
    private_key: Option<String>,
}

async fn upload(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let req: UploadRequest = json_body(body)?;
    let hostname = req
        .hostname
        .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
        .ok_or_else(|| ApiError::bad_request("hostname: required"))?;
    if !valid_hostname(&hostname) {
        return Err(ApiError::bad_request(format!(
            "hostname: {hostname:?} is not a DNS name the proxy can serve (and .localhost names are apps')"
        )));
    }
    let fullchain = req
        .fullchain
        .ok_or_else(|| ApiError::bad_request("fullchain: required"))?;
    let private_key = req
        .private_key
        .ok_or_else(|| ApiError::bad_request("private_key: required"))?;
    check_pair(&hostname, &fullchain, &private_key)?;
    let row = CertificateRow {
        sealed_key: flaps
            .secrets
            .seal(CERTIFICATE_KEYS, &hostname, private_key.as_bytes()),
        hostname: hostname.clone(),
        app,
        fullchain,
        created_at: crate::apps::now_ms(),
    };
    match flaps.rib.put_certificate(&row) {
        Ok(()) => {}
        Err(RibError::Conflict { .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("hostname {hostname:?} already belongs to another app"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(app = %row.app, hostname = %hostname, "custom certificate uploaded");
    Ok((StatusCode::CREATED, Json(detail(&row))))
}

async fn list(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<Value>, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let certs: Vec<Value> = flaps
        .rib
        .certificates_of_app(&app)?
        .iter()
        .map(summary)
        .collect();
    Ok(Json(
        json!({ "total_count": certs.len(), "certificates": certs }),
    ))
}

fn find(flaps: &Flaps, app: &str, hostname: &str) -> Result<CertificateRow, ApiError> {
    flaps
        .rib
        .certificates_of_app(app)?
        .into_iter()
        .find(|c| c.hostname == hostname)
        .ok_or_else(|| {
            ApiError::not_found(format!("no certificate for {hostname:?} in app {app:?}"))
        })
}

async fn show(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, hostname)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    Ok(Json(detail(&find(&flaps, &app, &hostname)?)))
}

async fn remove(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, hostname)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    find(&flaps, &app, &hostname)?;
    flaps.rib.delete_certificate(&app, &hostname)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_custom(
    State(flaps): State<Arc<Flaps>>,
    Extension(caller): Extension<Caller>,
    Path((app, hostname)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    owned_app(&flaps, &caller, &app)?;
    let row = find(&flaps, &app, &hostname)?;
    flaps.rib.delete_certificate(&app, &hostname)?;
    let mut answer = detail(&row);
    answer["configured"] = false.into();
    answer["certificates"] = json!([]);
    Ok(Json(answer))
}

async fn no_acme() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "ACME certificates are not available in Hangar: upload a certificate with POST .../certificates/custom",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_dns_names_outside_localhost() {
        for good in ["www.example.com", "a.b", "x-1.example.org"] {
            assert!(valid_hostname(good), "{good}");
        }
        for bad in [
            "",
            "localhost",
            "app.localhost",
            "Example.com",
            "-a.com",
            "a..b",
            "*.example.com",
            "example",
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }
}

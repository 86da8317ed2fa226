//! `/v1/apps/{app}/certificates`: custom certificates. An uploaded
//! certificate and key (PEM) for a hostname make the proxy serve that
//! certificate for the hostname (by SNI) and route the hostname to the app.
//! The key is sealed at rest like a secret. ACME is not offered (501).
//!
//! A hostname belongs to one app at most, and some belong to none: names
//! under the platform's own domains (`localhost`, `flycast`, `internal`
//! and `flaps.platform_domains`) and IP addresses. A certificate must chain
//! to the configured roots (Mozilla's by default), unless the config
//! allows self-signed ones, as dev's does.

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
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
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

/// Domains no app may claim a name in, whatever the config says.
const RESERVED_DOMAINS: [&str; 3] = ["localhost", "flycast", "internal"];

/// Whether `name` is a hostname the proxy can serve: a DNS name of at
/// least two labels whose last is not a number (so no IP address).
pub(crate) fn valid_hostname(name: &str) -> bool {
    hangar_api::names::dns_name(name)
        && name.contains('.')
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
}

/// Why no app may claim `name`, if none may: it is, or is under, one of
/// the platform's domains.
fn reserved(name: &str, platform: &[String]) -> Option<String> {
    RESERVED_DOMAINS
        .iter()
        .copied()
        .chain(platform.iter().map(String::as_str))
        .find(|domain| {
            name == *domain
                || name
                    .strip_suffix(domain)
                    .is_some_and(|rest| rest.ends_with('.'))
        })
        .map(|domain| {
            format!("hostname: {name:?} is under {domain:?}, which the platform keeps for itself")
        })
}

/// The CA certificates in the PEM file at `path`, as trust roots.
pub(crate) fn load_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{}: no usable CA certificate in it",
            path.display()
        ));
    }
    Ok(roots)
}

/// The roots custom certificates must chain to.
fn trust_roots(flaps: &Flaps) -> Result<rustls::RootCertStore, ApiError> {
    match &flaps.cfg.certificate_roots {
        Some(path) => load_roots(path).map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the certificate roots cannot be read: {e}"),
            )
        }),
        None => Ok(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }),
    }
}

/// Checks that `chain` is a server certificate for `hostname` that chains
/// to `roots` and is valid now.
fn check_trust(
    roots: rustls::RootCertStore,
    hostname: &str,
    chain: &[CertificateDer<'static>],
) -> Result<(), ApiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| ApiError::bad_request(format!("fullchain: cannot be verified: {e}")))?;
    let name = ServerName::try_from(hostname.to_string())
        .map_err(|e| ApiError::bad_request(format!("hostname: {e}")))?;
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map(drop)
        .map_err(|e| {
            ApiError::bad_request(format!(
                "fullchain: not trusted for {hostname:?}: {e} (it must chain to the configured certificate roots)"
            ))
        })
}

/// Checks that the chain and key parse, belong together, and that the
/// certificate is valid for `hostname` (its names; its trust chain is
/// [`check_trust`]'s).
fn check_pair(
    hostname: &str,
    fullchain: &str,
    private_key: &str,
) -> Result<Vec<CertificateDer<'static>>, ApiError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(fullchain.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::bad_request(format!("fullchain: not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(ApiError::bad_request("fullchain: no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(private_key.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("private_key: not a PEM private key: {e}")))?;
    let name = ServerName::try_from(hostname)
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
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|_| ApiError::bad_request("private_key: does not match the certificate"))?;
    Ok(chain)
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
    let owner = owned_app(&flaps, &caller, &app)?;
    let req: UploadRequest = json_body(body)?;
    let hostname = req
        .hostname
        .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
        .ok_or_else(|| ApiError::bad_request("hostname: required"))?;
    if !valid_hostname(&hostname) {
        return Err(ApiError::bad_request(format!(
            "hostname: {hostname:?} is not a DNS name the proxy can serve"
        )));
    }
    if let Some(why) = reserved(&hostname, &flaps.cfg.platform_domains) {
        return Err(ApiError::bad_request(why));
    }
    let fullchain = req
        .fullchain
        .ok_or_else(|| ApiError::bad_request("fullchain: required"))?;
    let private_key = req
        .private_key
        .ok_or_else(|| ApiError::bad_request("private_key: required"))?;
    let chain = check_pair(&hostname, &fullchain, &private_key)?;
    let renewal = flaps
        .rib
        .certificates_of_app(&app)?
        .iter()
        .any(|c| c.hostname == hostname);
    if !renewal {
        crate::quotas::check(
            &flaps,
            &owner.org_slug,
            crate::quotas::Counted::Certificates,
            1,
        )?;
    }
    if !flaps.cfg.allow_self_signed_certificates {
        check_trust(trust_roots(&flaps)?, &hostname, &chain)?;
    }
    let row = CertificateRow {
        sealed_key: flaps
            .secrets
            .seal(CERTIFICATE_KEYS, &hostname, private_key.as_bytes()),
        hostname: hostname.clone(),
        app,
        fullchain,
        created_at: hangar_api::time::now_ms(),
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
    fn hostnames_are_dns_names_outside_the_platforms_domains() {
        let platform = ["apps.example.net".to_string()];
        let claimable = |name: &str| valid_hostname(name) && reserved(name, &platform).is_none();
        for good in [
            "www.example.com",
            "a.b",
            "x-1.example.org",
            "example.net",
            "notflycast.com",
            "flycast.example.com",
            "1.2.3.example.com",
        ] {
            assert!(claimable(good), "{good}");
        }
        for bad in [
            "",
            "localhost",
            "app.localhost",
            "victim.flycast",
            "flycast",
            "a.b.flycast",
            "db.internal",
            "top1.nearest.of.app.internal",
            "x.apps.example.net",
            "apps.example.net",
            "127.0.0.1",
            "10.0.0.1",
            "1.2.3",
            "Example.com",
            "-a.com",
            "a..b",
            "*.example.com",
            "example",
            "::1",
            "[::1]",
        ] {
            assert!(!claimable(bad), "{bad}");
        }
    }
}

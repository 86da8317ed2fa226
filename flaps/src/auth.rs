//! Tokens and authentication.
//!
//! A token is 32 random bytes, hex encoded with the prefix `hgr_`; the RIB
//! keeps only its SHA-256, with the org it belongs to. Requests carry it as
//! `Authorization: Bearer <token>` or `Authorization: FlyV1 <token>`; the
//! middleware resolves it to a [`Caller`] or answers 401.

use crate::Flaps;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use hangar_api::auth::bearer;
use hangar_catalog::{Rib, files};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// Who is calling: the org their token belongs to.
#[derive(Debug, Clone)]
pub struct Caller {
    pub org: String,
    /// A short, stable, non-secret id of the token (its hash's prefix).
    pub token_id: String,
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("hgr_{}", hex::encode(bytes))
}

/// Creates a token for `org` and records its hash.
pub fn issue_token(rib: &Rib, org: &str, name: &str) -> Result<String, hangar_catalog::RibError> {
    let token = new_token();
    rib.add_token(&hash_token(&token), org, name)?;
    Ok(token)
}

/// The dev token kept in `path`: read back if present (and registered again,
/// in case the RIB was reset), otherwise created and written with mode 0600.
pub fn dev_token(rib: &Rib, org: &str, path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    rib.ensure_org(org, org)?;
    if let Ok(existing) = std::fs::read_to_string(path) {
        let token = existing.trim().to_string();
        if !token.is_empty() {
            rib.add_token(&hash_token(&token), org, "dev")?;
            return Ok(token);
        }
    }
    let token = issue_token(rib, org, "dev")?;
    files::write_atomically(path, format!("{token}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

/// Middleware: resolves the caller's token to a [`Caller`], or answers 401.
pub async fn require_token(
    State(flaps): State<Arc<Flaps>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let unauthorized = |msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, msg);
    let header = req.headers().get(AUTHORIZATION).ok_or_else(|| {
        unauthorized("missing Authorization header: send \"Authorization: Bearer <token>\"")
    })?;
    let token = header.to_str().ok().and_then(bearer).ok_or_else(|| {
        unauthorized(
            "malformed Authorization header: expected \"Bearer <token>\" or \"FlyV1 <token>\"",
        )
    })?;
    let hash = hash_token(token);
    let org = flaps
        .rib
        .token_org(&hash)?
        .ok_or_else(|| unauthorized("invalid token"))?;
    let token_id = format!("tok_{}", &hash[..16]);
    req.extensions_mut().insert(Caller { org, token_id });
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("hgr_"));
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), a);
    }
}

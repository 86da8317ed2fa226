//! [`ApiError`]: every failure of the API becomes a response here, as
//! `{"error": "..."}` with Fly's status codes. Internal causes are logged,
//! not shown.

use axum::Json;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hangar_api::ErrorBody;
use hangar_catalog::RibError;
use hangar_host_client::HostError;

/// A failed API call.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with a status and a one-line message.
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(msg),
        }
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, msg)
    }
    /// Adds Fly's machine-readable `status` code.
    pub fn with_code(mut self, code: &str) -> Self {
        self.body.status = Some(code.to_string());
        self
    }
}

impl From<RibError> for ApiError {
    fn from(e: RibError) -> Self {
        tracing::error!(error = %e, "flaps: rib failure");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the server log",
        )
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Unreachable { .. } => {
                tracing::warn!(error = %e, "flaps: host call failed");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            HostError::Status { status, body, .. } => Self {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                body,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// Middleware: an error answered by the framework itself (a path parameter
/// that is not UTF-8, a method the route lacks, a query that does not
/// parse) becomes `{"error": "..."}` like every other error.
pub async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if resp.status().as_u16() < 400 || is_json {
        return resp;
    }
    let status = resp.status();
    // Framework messages are one line; anything longer is cut.
    let bytes = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    ApiError::new(status, message).into_response()
}

/// The answer for paths the API does not have.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

/// Decodes a JSON request body whatever its Content-Type (curl's `-d` sends
/// form encoding; Fly accepts it). An empty body decodes as `{}` when `T`
/// allows it.
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = non_blank(body)?;
    parse_json(bytes.as_deref().unwrap_or(b"{}"))
}

/// The body's bytes, or `None` when it is empty or only whitespace.
pub fn non_blank(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Option<axum::body::Bytes>, ApiError> {
    let bytes =
        body.map_err(|r| ApiError::new(r.status(), format!("request body: {}", r.body_text())))?;
    Ok((!bytes.iter().all(u8::is_ascii_whitespace)).then_some(bytes))
}

/// Decodes JSON, answering 400 with the parser's reason.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

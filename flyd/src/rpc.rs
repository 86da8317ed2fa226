//! The host RPC server: flyd's HTTP API for its own machines, as described
//! in [`hangar_api::host`]. Answers and errors use the public API's shapes,
//! so flaps relays them unchanged.

use crate::flyd::{Flyd, FlydError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hangar_api::ErrorBody;
use hangar_api::duration::GoDuration;
use hangar_api::host::HostCreateRequest;
use hangar_api::machine::{MachineState, OkResponse, StopRequest};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Longest `wait` accepted.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// A failure as the API answers it.
pub struct RpcError(u16, String);

impl From<FlydError> for RpcError {
    fn from(e: FlydError) -> Self {
        if e.status() >= 500 {
            tracing::error!(error = %e, "flyd operation failed");
        }
        Self(e.status(), e.to_string())
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody::new(self.1))).into_response()
    }
}

fn bad_json(rejection: JsonRejection) -> RpcError {
    RpcError(
        400,
        format!("invalid request body: {}", rejection.body_text()),
    )
}

/// The router for flyd's RPC API.
pub fn router(flyd: Arc<Flyd>) -> Router {
    Router::new()
        .route("/v1/machines", post(create).get(list))
        .route("/v1/machines/{id}", get(show).delete(destroy))
        .route("/v1/machines/{id}/start", post(start))
        .route("/v1/machines/{id}/stop", post(stop))
        .route("/v1/machines/{id}/wait", get(wait))
        .with_state(flyd)
}

type Result<T> = std::result::Result<T, RpcError>;

async fn create(
    State(flyd): State<Arc<Flyd>>,
    body: std::result::Result<Json<HostCreateRequest>, JsonRejection>,
) -> Result<impl IntoResponse> {
    let Json(req) = body.map_err(bad_json)?;
    Ok(Json(flyd.create(req).await?))
}

#[derive(Deserialize)]
struct ListQuery {
    app: String,
    #[serde(default)]
    include_deleted: bool,
}

async fn list(
    State(flyd): State<Arc<Flyd>>,
    Query(q): Query<ListQuery>,
) -> Result<impl IntoResponse> {
    Ok(Json(flyd.list(&q.app, q.include_deleted)?))
}

async fn show(State(flyd): State<Arc<Flyd>>, Path(id): Path<String>) -> Result<impl IntoResponse> {
    Ok(Json(flyd.get(&id)?))
}

async fn start(State(flyd): State<Arc<Flyd>>, Path(id): Path<String>) -> Result<impl IntoResponse> {
    Ok(Json(flyd.start(&id).await?))
}

async fn stop(
    State(flyd): State<Arc<Flyd>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse> {
    // Clients send no body, an empty one, or a StopRequest.
    let req: StopRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StopRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| RpcError(400, format!("invalid request body: {e}")))?
    };
    flyd.stop(&id, req).await?;
    Ok(Json(OkResponse { ok: true }))
}

#[derive(Deserialize)]
struct DestroyQuery {
    #[serde(default)]
    force: bool,
}

async fn destroy(
    State(flyd): State<Arc<Flyd>>,
    Path(id): Path<String>,
    Query(q): Query<DestroyQuery>,
) -> Result<impl IntoResponse> {
    flyd.destroy(&id, q.force).await?;
    Ok(Json(OkResponse { ok: true }))
}

#[derive(Deserialize)]
struct WaitQuery {
    state: Option<String>,
    timeout: Option<String>,
}

/// Parses `wait`'s `timeout`: seconds, or a Go duration.
fn wait_timeout(text: Option<&str>) -> Result<Duration> {
    let Some(text) = text else {
        return Ok(Duration::from_secs(60));
    };
    let d = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            GoDuration::parse(text)
                .map_err(|e| RpcError(400, format!("timeout: {e}")))?
                .0
        }
    };
    if d.is_zero() || d > MAX_WAIT {
        return Err(RpcError(
            400,
            format!("timeout: must be between 1s and {}s", MAX_WAIT.as_secs()),
        ));
    }
    Ok(d)
}

/// Parses `wait`'s `state`: one or more states, comma separated; default started.
fn wait_states(text: Option<&str>) -> Result<Vec<MachineState>> {
    let text = text.unwrap_or("started");
    text.split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|e: String| RpcError(400, format!("state: {e}")))
        })
        .collect()
}

async fn wait(
    State(flyd): State<Arc<Flyd>>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<impl IntoResponse> {
    let timeout = wait_timeout(q.timeout.as_deref())?;
    let states = wait_states(q.state.as_deref())?;
    Ok(Json(flyd.wait(&id, &states, timeout).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_parameters_parse() {
        assert_eq!(wait_timeout(None).ok(), Some(Duration::from_secs(60)));
        assert_eq!(wait_timeout(Some("5")).ok(), Some(Duration::from_secs(5)));
        assert_eq!(
            wait_timeout(Some("1500ms")).ok(),
            Some(Duration::from_millis(1500))
        );
        assert!(wait_timeout(Some("0")).is_err());
        assert!(wait_timeout(Some("1h")).is_err());
        assert_eq!(
            wait_states(Some("stopped,destroyed")).ok(),
            Some(vec![MachineState::Stopped, MachineState::Destroyed])
        );
        assert!(wait_states(Some("asleep")).is_err());
    }
}

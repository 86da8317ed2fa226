//! The host RPC server: flyd's HTTP API for its own machines, as described
//! in [`hangar_api::host`]. Answers and errors use the public API's shapes,
//! so flaps relays them unchanged. Bodies are read as JSON whatever their
//! Content-Type, and an empty body is an empty request.
//!
//! Every call must carry the cluster credential, and a machine is found
//! only under its own app's path: a caller that authorized one app cannot
//! act on another's machine by naming its id.

use crate::flyd::{Flyd, FlydError};
use crate::ops::WaitFor;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hangar_api::ErrorBody;
use hangar_api::duration::GoDuration;
use hangar_api::host::{HostCreateRequest, LEASE_NONCE_HEADER};
use hangar_api::list::ListQuery;
use hangar_api::machine::{
    CreateLeaseRequest, CreateMachineRequest, ExecRequest, MachineState, MetadataValue, OkResponse,
    SignalRequest, StopRequest, UpdateMachineRequest, UpdateMetadataRequest,
};
use hangar_catalog::ClusterKey;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

/// Longest `wait` accepted.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Events returned when `limit` is not given, and at most.
const DEFAULT_EVENTS: usize = 20;
const MAX_EVENTS: usize = 50;

/// A failure as the API answers it.
pub struct RpcError(u16, ErrorBody);

impl From<FlydError> for RpcError {
    fn from(e: FlydError) -> Self {
        if e.status() >= 500 && e.code().is_none() {
            tracing::error!(error = %e, "flyd operation failed");
        }
        let body = ErrorBody {
            error: e.to_string(),
            status: e.code().map(str::to_string),
        };
        Self(e.status(), body)
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.1)).into_response()
    }
}

fn error(status: u16, msg: impl Into<String>) -> RpcError {
    RpcError(status, ErrorBody::new(msg))
}

fn bad_request(msg: impl Into<String>) -> RpcError {
    error(400, msg)
}

type Result<T> = std::result::Result<T, RpcError>;
type FlydState = State<Arc<Flyd>>;

/// The router for flyd's RPC API, answering only callers that present
/// `cluster`'s credential.
pub fn router(flyd: Arc<Flyd>, cluster: Arc<ClusterKey>) -> Router {
    Router::new()
        .route(
            "/v1/apps/{app}/machines",
            post(create).get(list).delete(purge),
        )
        .route(
            "/v1/apps/{app}/machines/{id}",
            get(show).post(update).put(update).delete(destroy),
        )
        .route("/v1/apps/{app}/machines/{id}/start", post(start))
        .route("/v1/apps/{app}/machines/{id}/stop", post(stop))
        .route("/v1/apps/{app}/machines/{id}/suspend", post(suspend))
        .route("/v1/apps/{app}/machines/{id}/restart", post(restart))
        .route("/v1/apps/{app}/machines/{id}/cordon", post(cordon))
        .route("/v1/apps/{app}/machines/{id}/uncordon", post(uncordon))
        .route("/v1/apps/{app}/machines/{id}/wait", get(wait))
        .route("/v1/apps/{app}/machines/{id}/events", get(events))
        .route("/v1/apps/{app}/machines/{id}/versions", get(versions))
        .route(
            "/v1/apps/{app}/machines/{id}/lease",
            get(lease_get).post(lease_acquire).delete(lease_release),
        )
        .route(
            "/v1/apps/{app}/machines/{id}/metadata",
            get(metadata).put(metadata_replace).patch(metadata_merge),
        )
        .route(
            "/v1/apps/{app}/machines/{id}/metadata/{key}",
            get(metadata_key).post(metadata_set).delete(metadata_delete),
        )
        .route("/v1/apps/{app}/machines/{id}/signal", post(signal))
        .route("/v1/apps/{app}/machines/{id}/exec", post(exec))
        .route("/v1/apps/{app}/machines/{id}/ps", get(ps))
        .route(
            "/v1/apps/{app}/machines/{id}/memory",
            get(memory).put(memory),
        )
        .route("/v1/apps/{app}/machines/{id}/memory/reclaim", post(memory))
        .route("/v1/images", get(images_list).delete(images_remove))
        .route("/v1/images/pull", post(images_pull))
        .route("/v1/images/import", post(images_import))
        .route("/v1/images/prune", post(images_prune))
        .fallback(not_found)
        .with_state(flyd)
        // Outermost, so that even an unknown path answers 401 to a stranger.
        .layer(axum::middleware::from_fn_with_state(cluster, authenticate))
}

/// Refuses (401) a call without the cluster credential.
async fn authenticate(
    State(cluster): State<Arc<ClusterKey>>,
    req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if cluster.admits_bearer(presented) {
        return next.run(req).await;
    }
    tracing::warn!(path = %req.uri().path(), "flyd: refused a call without the cluster credential");
    error(
        401,
        "flyd answers only its cluster: missing or wrong credential",
    )
    .into_response()
}

/// The path parameters that name a machine.
#[derive(Deserialize)]
struct MachineParams {
    app: String,
    id: String,
    key: Option<String>,
}

/// The machine a call names, found under its own app: another app's
/// machine answers 404 as a missing one does.
struct Target(String);

/// The same, with the metadata key after it.
struct TargetKey(String, String);

async fn machine_params(parts: &mut Parts, flyd: &Arc<Flyd>) -> Result<MachineParams> {
    let Path(p) = Path::<MachineParams>::from_request_parts(parts, flyd)
        .await
        .map_err(|e| bad_request(e.body_text()))?;
    if flyd.record(&p.id)?.app != p.app {
        return Err(FlydError::NotFound(p.id).into());
    }
    Ok(p)
}

impl FromRequestParts<Arc<Flyd>> for Target {
    type Rejection = RpcError;

    async fn from_request_parts(parts: &mut Parts, flyd: &Arc<Flyd>) -> Result<Self> {
        Ok(Self(machine_params(parts, flyd).await?.id))
    }
}

impl FromRequestParts<Arc<Flyd>> for TargetKey {
    type Rejection = RpcError;

    async fn from_request_parts(parts: &mut Parts, flyd: &Arc<Flyd>) -> Result<Self> {
        let p = machine_params(parts, flyd).await?;
        let key = p.key.ok_or_else(|| bad_request("missing metadata key"))?;
        Ok(Self(p.id, key))
    }
}

async fn not_found(method: Method, uri: Uri) -> RpcError {
    error(404, format!("no such endpoint: {method} {}", uri.path()))
}

/// Decodes a JSON body; an empty body is `T::default()`.
fn body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("invalid request body: {e}")))
}

/// The caller's lease nonce, if it sent one.
fn nonce(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(LEASE_NONCE_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// A boolean query flag: absent or `false`/`0` is false; `true`/`1` or a
/// bare flag is true.
fn flag(name: &str, value: Option<&str>) -> Result<bool> {
    match value {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(bad_request(format!(
            "{name}: expected true or false, got {other:?}"
        ))),
    }
}

/// A duration query parameter: seconds, or a Go duration.
fn duration(name: &str, text: &str) -> Result<Duration> {
    match text.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => GoDuration::parse(text)
            .map(|d| d.0)
            .map_err(|e| bad_request(format!("{name}: {e}"))),
    }
}

async fn create(
    State(flyd): FlydState,
    Path(app): Path<String>,
    bytes: Bytes,
) -> Result<impl IntoResponse> {
    let machine: CreateMachineRequest = serde_json::from_slice(&bytes)
        .map_err(|e| bad_request(format!("invalid request body: {e}")))?;
    Ok(Json(flyd.create(HostCreateRequest { app, machine }).await?))
}

/// One page of the app's machines, filtered and ordered by id: what the
/// query asks (flaps always asks for a bounded page).
async fn list(
    State(flyd): FlydState,
    Path(app): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<impl IntoResponse> {
    let q = ListQuery::parse(pairs).map_err(bad_request)?;
    let (page, _) = q.page(flyd.list(&app, q.include_deleted)?);
    Ok(Json(page))
}

/// Host only (flaps, when it deletes the app): forgets the app's
/// destroyed machines.
async fn purge(State(flyd): FlydState, Path(app): Path<String>) -> Result<impl IntoResponse> {
    Ok(Json(serde_json::json!({ "purged": flyd.purge_app(&app)? })))
}

async fn show(State(flyd): FlydState, Target(id): Target) -> Result<impl IntoResponse> {
    Ok(Json(flyd.get(&id)?))
}

async fn update(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<impl IntoResponse> {
    let req: UpdateMachineRequest = body(&bytes)?;
    Ok(Json(flyd.update(&id, req, nonce(&headers)).await?))
}

async fn start(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    Ok(Json(flyd.start(&id, nonce(&headers)).await?))
}

const OK: Json<OkResponse> = Json(OkResponse { ok: true });

async fn stop(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<impl IntoResponse> {
    let req: StopRequest = body(&bytes)?;
    flyd.stop(&id, req, nonce(&headers)).await?;
    Ok(OK)
}

async fn suspend(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    flyd.suspend(&id, nonce(&headers)).await?;
    Ok(OK)
}

#[derive(Deserialize)]
struct RestartQuery {
    signal: Option<String>,
    timeout: Option<String>,
}

async fn restart(
    State(flyd): FlydState,
    Target(id): Target,
    Query(q): Query<RestartQuery>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    let timeout = q
        .timeout
        .as_deref()
        .map(|t| duration("timeout", t))
        .transpose()?;
    let req = StopRequest {
        signal: q.signal,
        timeout: timeout.map(GoDuration),
    };
    flyd.restart(&id, req, nonce(&headers)).await?;
    Ok(OK)
}

async fn cordon(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    flyd.cordon(&id, true, nonce(&headers)).await?;
    Ok(OK)
}

async fn uncordon(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    flyd.cordon(&id, false, nonce(&headers)).await?;
    Ok(OK)
}

#[derive(Deserialize)]
struct DestroyQuery {
    force: Option<String>,
    /// Some clients send `kill=true` for the same thing.
    kill: Option<String>,
}

async fn destroy(
    State(flyd): FlydState,
    Target(id): Target,
    Query(q): Query<DestroyQuery>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    let force = flag("force", q.force.as_deref())? || flag("kill", q.kill.as_deref())?;
    flyd.destroy(&id, force, nonce(&headers)).await?;
    Ok(OK)
}

#[derive(Deserialize)]
struct WaitQuery {
    state: Option<String>,
    timeout: Option<String>,
    version: Option<String>,
    instance_id: Option<String>,
    from_event_id: Option<String>,
}

/// Parses `wait`'s `timeout`: seconds, or a Go duration; default 60 s.
fn wait_timeout(text: Option<&str>) -> Result<Duration> {
    let d = match text {
        None => return Ok(Duration::from_secs(60)),
        Some(t) => duration("timeout", t)?,
    };
    if d.is_zero() || d > MAX_WAIT {
        return Err(bad_request(format!(
            "timeout: must be between 1s and {}s",
            MAX_WAIT.as_secs()
        )));
    }
    Ok(d)
}

/// Parses `wait`'s `state`: one or more states, comma separated; default started.
fn wait_states(text: Option<&str>) -> Result<Vec<MachineState>> {
    text.unwrap_or("started")
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|e: String| bad_request(format!("state: {e}")))
        })
        .collect()
}

async fn wait(
    State(flyd): FlydState,
    Target(id): Target,
    Query(q): Query<WaitQuery>,
) -> Result<impl IntoResponse> {
    let timeout = wait_timeout(q.timeout.as_deref())?;
    let want = WaitFor {
        states: wait_states(q.state.as_deref())?,
        version: q.version.or(q.instance_id).filter(|v| !v.is_empty()),
        from_event_id: q.from_event_id.filter(|v| !v.is_empty()),
    };
    Ok(Json(flyd.wait(&id, &want, timeout).await?))
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn events(
    State(flyd): FlydState,
    Target(id): Target,
    Query(q): Query<EventsQuery>,
) -> Result<impl IntoResponse> {
    let limit = q.limit.unwrap_or(DEFAULT_EVENTS).clamp(1, MAX_EVENTS);
    Ok(Json(flyd.events(&id, limit)?))
}

async fn versions(State(flyd): FlydState, Target(id): Target) -> Result<impl IntoResponse> {
    Ok(Json(flyd.versions(&id)?))
}

/// Lease answers are wrapped as Fly wraps them: `{"status","data"}`.
fn lease_answer(data: serde_json::Value) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "success", "data": data }))
}

async fn lease_get(State(flyd): FlydState, Target(id): Target) -> Result<impl IntoResponse> {
    let lease = flyd.lease_get(&id)?;
    Ok(lease_answer(
        serde_json::to_value(lease).expect("serializes"),
    ))
}

async fn lease_acquire(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<impl IntoResponse> {
    let req: CreateLeaseRequest = body(&bytes)?;
    let lease = flyd.lease_acquire(&id, nonce(&headers), req).await?;
    Ok((
        StatusCode::CREATED,
        lease_answer(serde_json::to_value(lease).expect("serializes")),
    ))
}

async fn lease_release(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    flyd.lease_release(&id, nonce(&headers)).await?;
    Ok(lease_answer(serde_json::json!({})))
}

async fn metadata(State(flyd): FlydState, Target(id): Target) -> Result<impl IntoResponse> {
    Ok(Json(flyd.metadata(&id)?))
}

async fn metadata_key(
    State(flyd): FlydState,
    TargetKey(id, key): TargetKey,
) -> Result<impl IntoResponse> {
    let value = flyd
        .metadata(&id)?
        .remove(&key)
        .ok_or_else(|| error(404, format!("metadata key {key:?} not found")))?;
    Ok(Json(MetadataValue { value }))
}

async fn metadata_replace(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<StatusCode> {
    let req: UpdateMetadataRequest = body(&bytes)?;
    flyd.metadata_update(&id, nonce(&headers), |m| {
        *m = req.metadata;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metadata_merge(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<StatusCode> {
    let req: UpdateMetadataRequest = body(&bytes)?;
    flyd.metadata_update(&id, nonce(&headers), |m| {
        m.extend(req.metadata);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metadata_set(
    State(flyd): FlydState,
    TargetKey(id, key): TargetKey,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<StatusCode> {
    let req: MetadataValue = body(&bytes)?;
    flyd.metadata_update(&id, nonce(&headers), |m| {
        m.insert(key, req.value);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn metadata_delete(
    State(flyd): FlydState,
    TargetKey(id, key): TargetKey,
    headers: HeaderMap,
) -> Result<StatusCode> {
    flyd.metadata_update(&id, nonce(&headers), |m| {
        m.remove(&key)
            .map(drop)
            .ok_or_else(|| FlydError::NoSuch(format!("metadata key {key:?} not found")))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn signal(
    State(flyd): FlydState,
    Target(id): Target,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<impl IntoResponse> {
    let req: SignalRequest = body(&bytes)?;
    if req.signal.is_empty() {
        return Err(bad_request("signal: required"));
    }
    flyd.signal(&id, &req.signal, nonce(&headers)).await?;
    Ok(OK)
}

async fn exec(
    State(flyd): FlydState,
    Target(id): Target,
    bytes: Bytes,
) -> Result<impl IntoResponse> {
    let req: ExecRequest = body(&bytes)?;
    Ok(Json(flyd.exec(&id, req).await?))
}

async fn ps(State(flyd): FlydState, Target(id): Target) -> Result<impl IntoResponse> {
    Ok(Json(flyd.ps(&id).await?))
}

async fn memory(State(flyd): FlydState, Target(id): Target) -> Result<RpcError> {
    flyd.get(&id)?;
    Ok(error(
        501,
        "memory endpoints are not supported: Hangar runs machines as host processes, without a balloon device",
    ))
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

    #[test]
    fn flags_parse() {
        assert!(!flag("force", None).ok().unwrap());
        assert!(flag("force", Some("true")).ok().unwrap());
        assert!(flag("force", Some("")).ok().unwrap());
        assert!(flag("force", Some("maybe")).is_err());
    }
}

// ---- images (this host's; `hangar images`) ----

async fn images_list(State(flyd): FlydState) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "images": flyd.image_list() }))
}

#[derive(Default, Deserialize)]
struct ImageParam {
    #[serde(default)]
    image: String,
}

async fn images_pull(State(flyd): FlydState, bytes: Bytes) -> Result<impl IntoResponse> {
    let req: ImageParam = body(&bytes)?;
    if req.image.is_empty() {
        return Err(bad_request("image: required"));
    }
    Ok(Json(flyd.image_pull(&req.image).await?))
}

async fn images_remove(
    State(flyd): FlydState,
    Query(q): Query<ImageParam>,
) -> Result<impl IntoResponse> {
    if q.image.is_empty() {
        return Err(bad_request("image: required (?image=<name or digest>)"));
    }
    Ok(Json(flyd.image_remove(&q.image).await?))
}

async fn images_prune(State(flyd): FlydState) -> Result<impl IntoResponse> {
    Ok(Json(
        serde_json::json!({ "removed": flyd.image_prune().await? }),
    ))
}

/// The body is the archive: streamed to a file in the store's staging
/// directory (images can be larger than memory), imported, removed.
async fn images_import(State(flyd): FlydState, req: Request) -> Result<impl IntoResponse> {
    use tokio::io::AsyncWriteExt;
    let path = flyd
        .image_staging()
        .join(format!("upload-{}", ulid::Ulid::new()));
    let staged = async {
        use http_body_util::BodyExt;
        let mut file = tokio::fs::File::from_std(crate::images::private_file(&path)?);
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(std::io::Error::other)?.into_data() {
                file.write_all(&data).await?;
            }
        }
        file.flush().await
    }
    .await;
    let result = match staged {
        Ok(()) => flyd.image_import(&path).await,
        Err(e) => Err(crate::images::ImageError::from_io("receiving the archive", e).into()),
    };
    let _ = tokio::fs::remove_file(&path).await;
    Ok(Json(serde_json::json!({ "images": result? })))
}

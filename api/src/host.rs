//! flyd's host RPC: the HTTP API each flyd serves for its own machines, and
//! [`HostClient`], the client flaps (and later the proxy) uses to call it.
//!
//! Paths mirror the public API without the app prefix, because a machine id
//! is unique on its host: `POST /v1/machines`, `GET /v1/machines?app=`,
//! `GET|DELETE /v1/machines/{id}`, `POST /v1/machines/{id}/{start,stop}`,
//! `GET /v1/machines/{id}/wait`. Answers and errors use the public shapes,
//! so a gateway relays them unchanged.

use crate::error::ErrorBody;
use crate::machine::{CreateMachineRequest, Machine};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `POST /v1/machines` on a host: flaps has validated and placed the machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostCreateRequest {
    pub app: String,
    #[serde(flatten)]
    pub machine: CreateMachineRequest,
}

/// The header that carries a machine lease's nonce, as in Fly's API.
pub const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";

/// One call to a host: `method path` with an optional JSON body.
#[derive(Debug, Clone)]
pub struct HostCall<'a> {
    pub method: reqwest::Method,
    /// Path and query.
    pub path: &'a str,
    pub body: Option<&'a serde_json::Value>,
    /// Overrides the client's timeout (long `wait` calls).
    pub timeout: Option<Duration>,
    /// The caller's lease nonce, passed on as [`LEASE_NONCE_HEADER`].
    pub lease_nonce: Option<&'a str>,
}

impl<'a> HostCall<'a> {
    /// A call without body, timeout override or lease nonce.
    pub fn new(method: reqwest::Method, path: &'a str) -> Self {
        Self {
            method,
            path,
            body: None,
            timeout: None,
            lease_nonce: None,
        }
    }
}

/// A failed call to a host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The host could not be reached or did not answer in time.
    #[error("host {addr} unreachable: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    /// The host answered with an error status.
    #[error("host {addr} answered {status}: {}", body.error)]
    Status {
        addr: String,
        status: u16,
        body: ErrorBody,
    },
}

/// A host's answer: status and JSON body, relayed as they are.
#[derive(Debug, Clone)]
pub struct HostReply {
    pub status: u16,
    pub body: serde_json::Value,
}

/// HTTP client for one or many flyd hosts (connections are pooled per host).
#[derive(Debug, Clone)]
pub struct HostClient {
    http: reqwest::Client,
}

impl HostClient {
    /// `timeout` bounds each call that is not a `wait`; waits carry their own.
    pub fn new(timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .expect("reqwest client with default TLS config builds");
        Self { http }
    }

    /// Makes `call` on the host at `addr` and returns its answer, whatever
    /// the status.
    pub async fn call(&self, addr: &str, call: HostCall<'_>) -> Result<HostReply, HostError> {
        let url = format!("http://{addr}{}", call.path);
        let mut req = self.http.request(call.method, url);
        if let Some(body) = call.body {
            req = req.json(body);
        }
        if let Some(t) = call.timeout {
            req = req.timeout(t);
        }
        if let Some(nonce) = call.lease_nonce {
            req = req.header(LEASE_NONCE_HEADER, nonce);
        }
        let unreachable = |source| HostError::Unreachable {
            addr: addr.to_string(),
            source,
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::json!({ "error": String::from_utf8_lossy(&bytes).trim().to_string() })
            })
        };
        Ok(HostReply { status, body })
    }

    /// Lists the machines of `app` on the host at `addr`, destroyed ones
    /// too when `include_deleted`.
    pub async fn list(
        &self,
        addr: &str,
        app: &str,
        include_deleted: bool,
    ) -> Result<Vec<Machine>, HostError> {
        let path = format!("/v1/machines?app={app}&include_deleted={include_deleted}");
        let reply = self
            .call(addr, HostCall::new(reqwest::Method::GET, &path))
            .await?;
        if reply.status != 200 {
            let body = serde_json::from_value(reply.body)
                .unwrap_or_else(|_| ErrorBody::new("unreadable error body"));
            return Err(HostError::Status {
                addr: addr.to_string(),
                status: reply.status,
                body,
            });
        }
        serde_json::from_value(reply.body).map_err(|e| HostError::Status {
            addr: addr.to_string(),
            status: 502,
            body: ErrorBody::new(format!("unreadable machine list: {e}")),
        })
    }
}

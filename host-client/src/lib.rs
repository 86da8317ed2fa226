//! [`HostClient`]: how flaps and the proxy call flyd's host API (the paths
//! and shapes are in `hangar_api::host`).
//!
//! Every call carries the cluster credential (`Authorization: Bearer`):
//! a host answers no one else.

use arc_swap::ArcSwap;
use hangar_api::ErrorBody;
use hangar_api::host::{LEASE_NONCE_HEADER, machines_path};
use hangar_api::list::ListQuery;
use hangar_api::machine::Machine;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// HTTP client for one or many flyd hosts (connections are pooled per
/// host). A host's address is `ip:port`, or `unix:<path>` for a flyd on a
/// unix socket.
#[derive(Clone)]
pub struct HostClient {
    http: reqwest::Client,
    /// One client per unix socket (a reqwest client speaks to one); copied
    /// on the rare write, so a call never waits for another.
    unix: Arc<ArcSwap<HashMap<PathBuf, reqwest::Client>>>,
    timeout: Duration,
    /// The cluster credential every call carries.
    credential: Arc<str>,
}

impl std::fmt::Debug for HostClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.debug_struct("HostClient").finish_non_exhaustive()
    }
}

impl HostClient {
    /// `timeout` bounds each call that is not a `wait`; waits carry their
    /// own. `credential` is the cluster's, which hosts check on every call.
    pub fn new(timeout: Duration, credential: &str) -> Self {
        Self {
            http: Self::client(timeout, None),
            unix: Arc::default(),
            timeout,
            credential: credential.into(),
        }
    }

    fn client(timeout: Duration, socket: Option<&Path>) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2));
        if let Some(path) = socket {
            builder = builder.unix_socket(path);
        }
        builder
            .build()
            .expect("reqwest client with default TLS config builds")
    }

    /// The client for `addr`, and the URL of `path` there.
    fn route(&self, addr: &str, path: &str) -> (reqwest::Client, String) {
        let Some(socket) = addr.strip_prefix("unix:") else {
            return (self.http.clone(), format!("http://{addr}{path}"));
        };
        let socket = PathBuf::from(socket);
        let url = format!("http://flyd{path}");
        if let Some(client) = self.unix.load().get(&socket) {
            return (client.clone(), url);
        }
        let client = Self::client(self.timeout, Some(&socket));
        self.unix.rcu(|clients| {
            let mut clients = HashMap::clone(clients);
            clients
                .entry(socket.clone())
                .or_insert_with(|| client.clone());
            clients
        });
        (client, url)
    }

    /// Makes `call` on the host at `addr` and returns its answer, whatever
    /// the status.
    pub async fn call(&self, addr: &str, call: HostCall<'_>) -> Result<HostReply, HostError> {
        let (client, url) = self.route(addr, call.path);
        let mut req = client
            .request(call.method, url)
            .bearer_auth(&self.credential);
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

    /// One page of the machines of `app` on the host at `addr`: at most
    /// `limit` that `q`'s filters keep, after `cursor`, ordered by id.
    pub async fn list(
        &self,
        addr: &str,
        app: &str,
        q: &ListQuery,
        (cursor, limit): (Option<&str>, usize),
    ) -> Result<Vec<Machine>, HostError> {
        let path = format!("{}?{}", machines_path(app), q.host_query(cursor, limit));
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

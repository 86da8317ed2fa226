//! flyd's host API: what the HTTP API each flyd serves for its own machines
//! takes beyond the public shapes, and where its paths are. Its client is
//! the `hangar-host-client` crate.
//!
//! Paths are the public API's own (`POST /v1/apps/{app}/machines`,
//! `GET /v1/apps/{app}/machines/{id}/wait`, ...): the host answers 404 for
//! a machine that is not the named app's, so a caller that authorized the
//! app cannot reach another app's machine through a wrong id. Answers and
//! errors use the public shapes, so a gateway relays them unchanged.
//!
//! Every call carries the cluster credential (`Authorization: Bearer`):
//! a host answers no one else.

use crate::machine::CreateMachineRequest;
use serde::{Deserialize, Serialize};

/// A machine creation as the host runs it: flaps has validated and placed
/// the machine (the app comes from the call's path).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostCreateRequest {
    pub app: String,
    #[serde(flatten)]
    pub machine: CreateMachineRequest,
}

/// The header that carries a machine lease's nonce, as in Fly's API.
pub const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";

/// The host path of machine `id` of `app` followed by `rest` (empty, or
/// `/start`, `/metadata/{key}`, ... already encoded), each name
/// percent-encoded so that neither can name another path.
pub fn machine_path(app: &str, id: &str, rest: &str) -> String {
    format!("{}/{}{rest}", machines_path(app), segment(id))
}

/// The host path of `app`'s machines.
pub fn machines_path(app: &str) -> String {
    format!("/v1/apps/{}/machines", segment(app))
}

/// `text` as one path segment: every byte outside RFC 3986's unreserved set
/// percent-encoded. `.` and `..` are never valid segments here and come
/// out encoded too, so no segment can climb out of its place.
pub fn segment(text: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');
    utf8_percent_encode(text, SEGMENT).to_string()
}

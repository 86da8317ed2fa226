//! Header rewriting at the proxy hop: hop-by-hop headers out, proxy headers
//! in (`Fly-*`, `X-Forwarded-*`, `Via`).

use crate::h1::io::{Handover, OnUpgrade};
use crate::routing::peers::FLY_FORWARDED_REGION;
use http::header::{
    CONNECTION, COOKIE, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE, VIA,
};
use http::header::{Entry, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY};

/// Headers that describe one connection, not the message, so they never
/// cross the proxy (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

pub(crate) const FLY_CLIENT_IP: HeaderName = HeaderName::from_static("fly-client-ip");
pub(crate) const FLY_FORWARDED_PORT: HeaderName = HeaderName::from_static("fly-forwarded-port");
pub(crate) const FLY_REGION: HeaderName = HeaderName::from_static("fly-region");
pub(crate) const FLY_REQUEST_ID: HeaderName = HeaderName::from_static("fly-request-id");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub(crate) const X_FORWARDED_SSL: HeaderName = HeaderName::from_static("x-forwarded-ssl");

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the few names there are is
    // cheaper than hashing all seven to find nothing.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Whether `name` is among the headers. One pass over the few names a
/// message has is cheaper than hashing a name that is not there, as most
/// of those the proxy looks for on every message are not (`fly-replay`,
/// ...).
pub(crate) fn has(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.keys().any(|n| n == name)
}

/// An upgrade the client asked for: HTTP/1.1 `Connection: upgrade` and
/// `Upgrade: websocket` (say), or h2's extended CONNECT with `:protocol`
/// (RFC 8441). The protocol, and the client's side of the connection once
/// hyper hands it over.
pub(crate) struct Upgrade {
    pub protocol: HeaderValue,
    pub client: OnUpgrade,
    /// Extended CONNECT: the client is answered `200`, not `101`.
    pub h2: bool,
}

impl Upgrade {
    /// Takes the upgrade out of a request that asks for one. An h2
    /// extended CONNECT becomes the HTTP/1.1 `GET` with `Upgrade` the
    /// machine understands; for WebSocket it gets the `Sec-WebSocket-Key`
    /// HTTP/1.1 requires (h2 has none).
    pub(crate) fn take<B>(req: &mut http::Request<B>) -> Option<Self> {
        if req.version() == http::Version::HTTP_2 {
            return Self::extended_connect(req);
        }
        if req.version() != http::Version::HTTP_11 || !has(req.headers(), &UPGRADE) {
            return None;
        }
        let asked = req
            .headers()
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        let protocol = req.headers().get(UPGRADE)?.clone();
        // The HTTP/1 server offers the connection to requests that ask.
        let handover = req.extensions_mut().remove::<Handover>()?;
        asked.then(|| Self {
            protocol,
            client: OnUpgrade::H1(handover),
            h2: false,
        })
    }

    fn extended_connect<B>(req: &mut http::Request<B>) -> Option<Self> {
        if req.method() != http::Method::CONNECT {
            return None;
        }
        let protocol = req.extensions().get::<hyper::ext::Protocol>()?;
        let protocol = HeaderValue::from_str(protocol.as_str()).ok()?;
        *req.method_mut() = http::Method::GET;
        if protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
            use base64::Engine;
            let key: [u8; 16] = rand::random();
            let key = base64::engine::general_purpose::STANDARD.encode(key);
            let key = HeaderValue::from_str(&key).ok()?;
            req.headers_mut().entry(SEC_WEBSOCKET_KEY).or_insert(key);
        }
        Some(Self {
            protocol,
            client: OnUpgrade::Hyper(hyper::upgrade::on(req)),
            h2: true,
        })
    }

    /// Puts the upgrade back on the request to the machine, whose
    /// hop-by-hop headers are gone by now.
    pub(crate) fn ask(&self, headers: &mut HeaderMap) {
        Self::answer(headers, self.protocol.clone());
    }

    /// The client's answer once the machine switched protocols: `101` with
    /// the machine's headers over HTTP/1.1; `200` over h2, which has no
    /// `Upgrade` and no WebSocket key to accept.
    pub(crate) fn switched(&self, headers: &mut HeaderMap) -> http::StatusCode {
        if self.h2 {
            headers.remove(SEC_WEBSOCKET_ACCEPT);
            return http::StatusCode::OK;
        }
        Self::answer(headers, self.protocol.clone());
        http::StatusCode::SWITCHING_PROTOCOLS
    }

    /// `Connection: upgrade` and `Upgrade: <protocol>`.
    pub(crate) fn answer(headers: &mut HeaderMap, protocol: HeaderValue) {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol);
    }
}

/// Joins split `cookie` headers into one: h2 clients may send one header
/// per cookie, but an HTTP/1.1 server expects a single line
/// (RFC 9113 section 8.2.3).
pub(crate) fn join_cookies(headers: &mut HeaderMap) -> Result<(), InvalidHeaderValue> {
    if !has(headers, &COOKIE) || headers.get_all(COOKIE).iter().nth(1).is_none() {
        return Ok(());
    }
    let joined = join(headers.get_all(COOKIE).iter(), b"; ");
    headers.insert(COOKIE, HeaderValue::from_bytes(&joined)?);
    Ok(())
}

/// What the proxy tells the machine about the request it forwards. The
/// values are made once (per connection, per proxy) and shared.
///
/// The headers go into the request's map ([`add_forwarded`]) only for
/// hyper's client (h2 to the machine, upgrades, streamed bodies); the
/// pooled HTTP/1.1 client writes them as it writes the head
/// ([`crate::forwarding::client::encode_request`]), which saves a hash and an
/// insert per header on every request.
#[derive(Debug)]
pub(crate) struct Forwarded<'a> {
    /// The client's address, as text.
    pub client_ip: &'a HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The port the client connected to.
    pub port: &'a HeaderValue,
    pub region: &'a HeaderValue,
    pub request_id: &'a HeaderValue,
    /// This hop's `Via` entry, such as `1.1 hangar`.
    pub via: &'static str,
    /// The region whose proxy sent the request here, when one did: its
    /// view of the client stands, and the machine learns where the
    /// request came in (`Fly-Forwarded-Region`).
    pub from_region: Option<&'a HeaderValue>,
}

impl Forwarded<'_> {
    /// Names whose values a client could forge: this hop's replace them.
    const SET: [HeaderName; 7] = [
        FLY_CLIENT_IP,
        X_FORWARDED_PROTO,
        X_FORWARDED_SSL,
        X_FORWARDED_PORT,
        FLY_FORWARDED_PORT,
        FLY_REGION,
        FLY_REQUEST_ID,
    ];

    /// Calls `f` with each header this hop sets, replacing the client's.
    pub(crate) fn each_set(&self, mut f: impl FnMut(HeaderName, &HeaderValue)) {
        if let Some(region) = self.from_region {
            return f(FLY_FORWARDED_REGION, region);
        }
        let proto = HeaderValue::from_static(self.proto);
        let ssl = HeaderValue::from_static(if self.proto == "https" { "on" } else { "off" });
        // In the order of [`Self::SET`].
        let values = [
            self.client_ip,
            &proto,
            &ssl,
            self.port,
            self.port,
            self.region,
            self.request_id,
        ];
        for (name, value) in Self::SET.into_iter().zip(values) {
            f(name, value);
        }
    }

    /// Calls `f` with each list header this hop appends an entry to, and
    /// the entry.
    pub(crate) fn each_appended(&self, mut f: impl FnMut(HeaderName, &HeaderValue)) {
        if self.from_region.is_none() {
            f(X_FORWARDED_FOR, self.client_ip);
        }
        f(VIA, &HeaderValue::from_static(self.via));
    }

    /// Whether this hop sets `name` (a client's own is dropped).
    pub(crate) fn sets(&self, name: &HeaderName) -> bool {
        match self.from_region {
            Some(_) => name == FLY_FORWARDED_REGION,
            None => Self::SET.contains(name),
        }
    }

    /// Whether this hop appends to `name`.
    pub(crate) fn appends(&self, name: &HeaderName) -> bool {
        name == VIA || self.from_region.is_none() && name == X_FORWARDED_FOR
    }
}

/// Sets the proxy headers on a request going to a machine. Values a client
/// could forge (`Fly-Client-IP`, `X-Forwarded-Proto`, ...) are replaced;
/// the list-valued `X-Forwarded-For` and `Via` are appended to.
pub(crate) fn add_forwarded(
    headers: &mut HeaderMap,
    f: &Forwarded<'_>,
) -> Result<(), InvalidHeaderValue> {
    f.each_set(|name, value| {
        headers.insert(name, value.clone());
    });
    let mut added = Ok(());
    f.each_appended(|name, value| {
        if added.is_ok() {
            added = append_to_list(headers, name, value);
        }
    });
    added
}

/// Applies a port's configured response headers
/// (`http_options.response.headers`): a string sets the header, a list of
/// strings sets one line each, `false` removes it. Names or values that are
/// not valid HTTP are skipped (flaps accepts the config as Fly does).
pub(crate) fn apply_configured(
    headers: &mut HeaderMap,
    set: &serde_json::Map<String, serde_json::Value>,
) {
    use serde_json::Value;
    for (name, value) in set {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        let values: Vec<&str> = match value {
            Value::Bool(false) => {
                headers.remove(&name);
                continue;
            }
            Value::String(one) => vec![one],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        headers.remove(&name);
        for v in values {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.append(name.clone(), v);
            }
        }
    }
}

/// Adds `value` to a comma-separated list header, merging repeated headers
/// into one line.
pub(crate) fn append_to_list(
    headers: &mut HeaderMap,
    name: HeaderName,
    value: &HeaderValue,
) -> Result<(), InvalidHeaderValue> {
    match headers.entry(name) {
        Entry::Vacant(entry) => {
            entry.insert(value.clone());
        }
        Entry::Occupied(mut entry) => {
            let merged = join(entry.iter().chain([value]), b", ");
            entry.insert(HeaderValue::from_bytes(&merged)?);
        }
    }
    Ok(())
}

fn join<'a>(values: impl Iterator<Item = &'a HeaderValue>, separator: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for value in values {
        if !out.is_empty() {
            out.extend_from_slice(separator);
        }
        out.extend_from_slice(value.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("proxy-connection", "keep-alive"),
            ("x-secret", "1"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn forwarded_headers_replace_forgeable_values_and_append_lists() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("fly-client-ip", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("via", "1.1 cdn"),
        ]);
        let id = HeaderValue::from_static("01J0-dev");
        add_forwarded(
            &mut h,
            &Forwarded {
                client_ip: &HeaderValue::from_static("127.0.0.1"),
                proto: "http",
                port: &HeaderValue::from(8080),
                region: &HeaderValue::from_static("dev"),
                request_id: &id,
                via: "1.1 hangar",
                from_region: None,
            },
        )
        .unwrap();
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["fly-client-ip"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-port"], "8080");
        assert_eq!(h["fly-forwarded-port"], "8080");
        assert_eq!(h["fly-region"], "dev");
        assert_eq!(h["fly-request-id"], "01J0-dev");
        assert_eq!(h["via"], "1.1 cdn, 1.1 hangar");
    }

    #[test]
    fn an_h2_extended_connect_becomes_an_http1_upgrade() {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .version(http::Version::HTTP_2)
            .uri("http://ws.localhost/chat")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let upgrade = Upgrade::take(&mut req).expect("an upgrade");
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(upgrade.protocol, "websocket");
        assert_eq!(
            req.headers()[SEC_WEBSOCKET_KEY].len(),
            24,
            "16 bytes, base64"
        );
        let mut answer = map(&[("sec-websocket-accept", "x"), ("x-kept", "1")]);
        assert_eq!(upgrade.switched(&mut answer), http::StatusCode::OK);
        assert_eq!(answer, map(&[("x-kept", "1")]));

        let mut plain_connect = http::Request::builder()
            .method(http::Method::CONNECT)
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(Upgrade::take(&mut plain_connect).is_none(), "no :protocol");
    }

    #[test]
    fn split_cookies_are_joined_for_http1() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut h).unwrap();
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
    }

    #[test]
    fn configured_response_headers_set_replace_and_remove() {
        let mut h = map(&[("server", "app"), ("x-powered-by", "php"), ("x-a", "old")]);
        let set = serde_json::json!({
            "x-a": "new",
            "x-list": ["1", "2"],
            "x-powered-by": false,
            "bad name": "skipped",
            "x-number": 7,
        });
        apply_configured(&mut h, set.as_object().unwrap());
        assert_eq!(h["x-a"], "new");
        let list: Vec<_> = h.get_all("x-list").iter().collect();
        assert_eq!(list, ["1", "2"]);
        assert!(h.get("x-powered-by").is_none());
        assert!(h.get("x-number").is_none());
        assert_eq!(h["server"], "app");
    }
}

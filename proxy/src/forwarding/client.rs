//! The machine side of HTTP/1.1: request heads out ([`encode_request`]),
//! response heads in ([`parse_response`]), for the pooled connections of
//! [`crate::forwarding::upstream`].

use crate::forwarding::body::UpBody;
use crate::forwarding::headers::Forwarded;
use crate::h1::body::Decoder;
use crate::h1::head;
use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode, Version};
use std::io::Write as _;
use std::mem::MaybeUninit;

/// Largest response head accepted from a machine.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Writes `req`'s head into `out`, with this hop's headers (`forwarded`:
/// a client's copies of the ones it sets are dropped, the lists it appends
/// to are merged into one line each) and the body when it is small;
/// returns the body when it is not (to be written after, in place). The
/// body must be read whole (`UpBody::Buffered`): its length is the one
/// sent. The URI is origin-form already.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    req: &Request<UpBody>,
    forwarded: &Forwarded<'_>,
) -> Option<Bytes> {
    let body = match req.body() {
        UpBody::Buffered(body) => body.clone(),
        UpBody::Streaming { .. } => None,
    };
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut declared = false;
    let mut lists = false;
    for (name, value) in req.headers() {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            declared = true;
            continue;
        }
        if forwarded.appends(name) {
            lists = true;
            continue;
        }
        if !forwarded.sets(name) {
            head::line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    forwarded.each_set(|name, value| head::line(out, name.as_str().as_bytes(), value.as_bytes()));
    forwarded.each_appended(|name, entry| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        if lists {
            for value in req.headers().get_all(&name) {
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(entry.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
    let len = body.as_ref().map_or(0, Bytes::len);
    // A body, a declared empty one, or a method whose requests have one.
    let with_body = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    if len > 0 || declared || with_body {
        let _ = write!(out, "content-length: {len}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    match body {
        Some(body) if body.len() <= 16 * 1024 => {
            out.extend_from_slice(&body);
            None
        }
        body => body,
    }
}

/// A machine's response head: the response (its body to come), how its
/// body ends, and whether the connection can carry another request after.
pub(crate) struct ResponseHead {
    pub response: Response<()>,
    /// `None`: no body at all.
    pub body: Option<Decoder>,
    pub reusable: bool,
}

/// Parses a response head from the front of `buf`, taking it out of `buf`
/// when whole; `Ok(None)` while more bytes are needed. `head_request`: the
/// request was `HEAD`, so the response has no body whatever it says.
pub(crate) fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, &'static str> {
    let mut slots = [const { MaybeUninit::uninit() }; head::MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err("the machine's response head is too large");
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("the machine's response head is malformed"),
    };
    let status = StatusCode::from_u16(res.code.unwrap_or_default())
        .map_err(|_| "the machine's response status is invalid")?;
    let version = head::version(res.version);
    let fields = head::Fields::of(buf, res.headers);
    let head = buf.split_to(len).freeze();
    // Room for the headers the proxy adds on the way to the client.
    let (headers, present) = fields
        .map(&head, 4)
        .map_err(|_| "the machine sent a malformed header")?;
    let connection = |token: &str| head::connection_has(&headers, present, token);
    let close = connection("close") || version == Version::HTTP_10 && !connection("keep-alive");
    let body = if head::bodiless(status, head_request) {
        None
    } else if present.has(&header::TRANSFER_ENCODING) {
        Some(if head::ends_chunked(&headers) {
            Decoder::chunked()
        } else {
            Decoder::UntilClose
        })
    } else if present.has(&header::CONTENT_LENGTH) {
        let n = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or("the machine sent a malformed content-length")?;
        Some(Decoder::Length(n))
    } else {
        Some(Decoder::UntilClose)
    };
    let reusable = !close && !matches!(body, Some(Decoder::UntilClose));
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Some(ResponseHead {
        response,
        body,
        reusable,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    /// This hop's headers for tests: through a peer when `from_region`.
    fn forwarded<'a>(values: &'a [HeaderValue; 5], from_region: bool) -> Forwarded<'a> {
        let [client_ip, port, region, request_id, peer] = values;
        Forwarded {
            client_ip,
            proto: "https",
            port,
            region,
            request_id,
            via: "2 hangar",
            from_region: from_region.then_some(peer),
        }
    }

    const VALUES: [HeaderValue; 5] = [
        HeaderValue::from_static("127.0.0.1"),
        HeaderValue::from_static("443"),
        HeaderValue::from_static("dev"),
        HeaderValue::from_static("01J0-dev"),
        HeaderValue::from_static("ams"),
    ];

    #[test]
    fn requests_carry_their_whole_body_and_its_length() {
        let values = VALUES;
        let mut req = Request::new(UpBody::Buffered(Some(Bytes::from_static(b"hello"))));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/a?b=1".parse().unwrap();
        req.headers_mut()
            .insert("host", HeaderValue::from_static("x"));
        req.headers_mut()
            .insert("content-length", HeaderValue::from_static("999"));
        let mut out = Vec::new();
        assert!(encode_request(&mut out, &req, &forwarded(&values, true)).is_none());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nhost: x\r\nfly-forwarded-region: ams\r\n\
             via: 2 hangar\r\ncontent-length: 5\r\n\r\nhello"
        );
        let get = Request::new(UpBody::Buffered(None));
        let mut out = Vec::new();
        encode_request(&mut out, &get, &forwarded(&values, true));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nfly-forwarded-region: ams\r\nvia: 2 hangar\r\n\r\n"
        );
    }

    /// The head written with this hop's headers says what the request's
    /// map says once they are added to it (as for hyper's client): the
    /// client's copies of the values the proxy sets are gone, the lists it
    /// appends to are one line each, in order.
    #[test]
    fn proxy_headers_are_written_as_the_map_would_have_them() {
        let values = VALUES;
        let clients: [&[(&str, &str)]; 4] = [
            &[("host", "app.localhost")],
            &[
                ("host", "app.localhost"),
                ("x-forwarded-for", "10.0.0.1"),
                ("fly-client-ip", "6.6.6.6"),
                ("accept", "*/*"),
                ("x-forwarded-for", "10.0.0.2"),
                ("x-forwarded-proto", "http"),
                ("via", "1.1 cdn"),
            ],
            &[
                ("fly-region", "forged"),
                ("fly-request-id", "forged"),
                ("via", "1.0 a"),
            ],
            &[
                ("x-forwarded-ssl", "on"),
                ("x-forwarded-port", "1"),
                ("fly-forwarded-port", "1"),
            ],
        ];
        for client in clients {
            for from_region in [false, true] {
                let fwd = forwarded(&values, from_region);
                let mut req = Request::new(UpBody::Buffered(None));
                for (name, value) in client {
                    req.headers_mut().append(
                        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        HeaderValue::from_static(value),
                    );
                }
                let mut expected = req.headers().clone();
                crate::forwarding::headers::add_forwarded(&mut expected, &fwd).unwrap();
                let mut expected: Vec<(String, String)> = expected
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                    .collect();
                expected.sort();

                let mut out = Vec::new();
                encode_request(&mut out, &req, &fwd);
                let mut slots = [httparse::EMPTY_HEADER; 32];
                let mut parsed = httparse::Request::new(&mut slots);
                assert!(parsed.parse(&out).unwrap().is_complete());
                let mut written: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                written.sort();
                assert_eq!(
                    written, expected,
                    "{client:?}, through a peer: {from_region}"
                );
            }
        }
    }

    #[test]
    fn response_framing_decides_reuse() {
        let parse = |raw: &str, head| {
            let mut buf = BytesMut::from(raw.as_bytes());
            parse_response(&mut buf, head).unwrap().unwrap()
        };
        let r = parse("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false);
        assert!(r.reusable && matches!(r.body, Some(Decoder::Length(3))));
        let r = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        );
        assert!(r.reusable && matches!(r.body, Some(Decoder::Chunked(_))));
        let r = parse("HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(!r.reusable && matches!(r.body, Some(Decoder::UntilClose)));
        let r = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n",
            false,
        );
        assert!(!r.reusable);
        let r = parse("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true);
        assert!(r.reusable && r.body.is_none());
        let r = parse("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert!(r.reusable && r.body.is_none());
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        assert!(parse_response(&mut partial, false).unwrap().is_none());
    }
}

//! The machine side of HTTP/1.1: request heads out ([`encode_request`]),
//! response heads in ([`parse_response`]), for the pooled connections of
//! [`crate::upstream`].

use super::body::Decoder;
use super::head;
use crate::body::UpBody;
use bytes::{Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode, Version};
use std::io::Write as _;
use std::mem::MaybeUninit;

/// Largest response head accepted from a machine.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Writes `req`'s head into `out`, with its body when it is small, and
/// returns the body when it is not (to be written after, in place). The
/// body must be read whole (`UpBody::Buffered`): its length is the one
/// sent. The URI is origin-form already.
pub(crate) fn encode_request(out: &mut Vec<u8>, req: &Request<UpBody>) -> Option<Bytes> {
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
    for (name, value) in req.headers() {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            declared = true;
            continue;
        }
        head::line(out, name.as_str().as_bytes(), value.as_bytes());
    }
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
    let connection = |token: &str| {
        present.has(&header::CONNECTION) && head::has_token(&headers, header::CONNECTION, token)
    };
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

    #[test]
    fn requests_carry_their_whole_body_and_its_length() {
        let mut req = Request::new(UpBody::Buffered(Some(Bytes::from_static(b"hello"))));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/a?b=1".parse().unwrap();
        req.headers_mut()
            .insert("host", HeaderValue::from_static("x"));
        req.headers_mut()
            .insert("content-length", HeaderValue::from_static("999"));
        let mut out = Vec::new();
        assert!(encode_request(&mut out, &req).is_none());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
        );
        let get = Request::new(UpBody::Buffered(None));
        let mut out = Vec::new();
        encode_request(&mut out, &get);
        assert_eq!(String::from_utf8(out).unwrap(), "GET / HTTP/1.1\r\n\r\n");
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

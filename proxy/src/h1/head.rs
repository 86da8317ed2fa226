//! Request heads in ([`parse`], with httparse, header values sharing the
//! bytes read) and response heads out ([`encode`]), with the framing rules
//! of RFC 9112: how long a request body is, whether the connection stays
//! open, how a response body is delimited.

use super::body::Framing;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::time::{SystemTime, UNIX_EPOCH};

/// Most header fields in a head, as hyper allows.
pub(crate) const MAX_HEADERS: usize = 100;

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The body's framing; `None`: no body.
    pub body: Option<Framing>,
    /// The client lets the connection stay open after the response.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// `Connection: upgrade` with an `Upgrade` header.
    pub upgrade: bool,
}

/// Why a request head was refused; each is answered before closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Over the size limit or the header count: `431`.
    TooLarge,
    /// Not HTTP/1.x as RFC 9112 writes it: `400`, with the reason.
    Malformed(&'static str),
}

impl HeadError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge => "request head too large",
            Self::Malformed(why) => why,
        }
    }
}

/// Parses a request head from the front of `buf`, taking it out of `buf`
/// when whole; `Ok(None)` while more bytes are needed.
pub(crate) fn parse(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, HeadError> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::Version) => {
            return Err(HeadError::Malformed("unsupported HTTP version"));
        }
        Err(_) => return Err(HeadError::Malformed("malformed request head")),
    };
    let version = version(req.version);
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Malformed("malformed method"))?;
    let path = span(buf, req.path.unwrap_or_default().as_bytes());
    let fields = Fields::of(buf, req.headers);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path))
        .map_err(|_| HeadError::Malformed("malformed request target"))?;
    // Room for the headers the proxy adds on the way to the machine.
    let (headers, present) = fields.map(&head, 12).map_err(HeadError::Malformed)?;
    let body = framing(&headers, present, version)?;
    let connection = |token: &str| connection_has(&headers, present, token);
    let keep_alive = match version {
        Version::HTTP_10 => connection("keep-alive"),
        _ => !connection("close"),
    };
    let expect_continue = version == Version::HTTP_11
        && present.has(&header::EXPECT)
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade =
        version == Version::HTTP_11 && present.has(&header::UPGRADE) && connection("upgrade");
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        body,
        keep_alive,
        expect_continue,
        upgrade,
    }))
}

/// The request body's framing (RFC 9112 section 6.3). A request with both
/// `Transfer-Encoding` and `Content-Length`, or with lengths that differ,
/// is refused: proxies that disagree on where a body ends are how requests
/// get smuggled.
fn framing(
    headers: &HeaderMap,
    present: Present,
    version: Version,
) -> Result<Option<Framing>, HeadError> {
    if present.has(&header::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(HeadError::Malformed(
                "transfer-encoding in an HTTP/1.0 request",
            ));
        }
        if present.has(&header::CONTENT_LENGTH) {
            return Err(HeadError::Malformed(
                "both transfer-encoding and content-length",
            ));
        }
        return match ends_chunked(headers) {
            true => Ok(Some(Framing::Chunked)),
            false => Err(HeadError::Malformed(
                "transfer-encoding does not end in chunked",
            )),
        };
    }
    if !present.has(&header::CONTENT_LENGTH) {
        return Ok(None);
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_length(part.trim_ascii())
                .ok_or(HeadError::Malformed("malformed content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Malformed("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    Ok(length.filter(|&n| n > 0).map(Framing::Length))
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The HTTP version httparse read.
pub(crate) fn version(minor: Option<u8>) -> Version {
    match minor {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    }
}

/// Where a part of a head lies in the buffer it was parsed from.
type Span = std::ops::Range<usize>;

fn span(buf: &[u8], part: &[u8]) -> Span {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// Where a head's header fields lie in the buffer httparse read, so they
/// can share its bytes once it is split off (httparse borrows it until
/// then).
/// (Inline up to a typical head's count: a fixed array of [`MAX_HEADERS`]
/// would be kilobytes to initialise for every head, a vector one more
/// allocation.)
pub(crate) struct Fields(SmallVec<[(Span, Span); 24]>);

impl Fields {
    pub(crate) fn of(buf: &[u8], fields: &[httparse::Header<'_>]) -> Self {
        Self(
            fields
                .iter()
                .map(|field| (span(buf, field.name.as_bytes()), span(buf, field.value)))
                .collect(),
        )
    }

    /// The fields as a header map whose values share `head`'s bytes, with
    /// room for `extra` more, and which framing headers it has.
    pub(crate) fn map(
        &self,
        head: &Bytes,
        extra: usize,
    ) -> Result<(HeaderMap, Present), &'static str> {
        let mut headers = HeaderMap::with_capacity(self.0.len() + extra);
        let mut present = Present::default();
        for (name, value) in &self.0 {
            let name =
                HeaderName::from_bytes(&head[name.clone()]).map_err(|_| "malformed header name")?;
            let value = HeaderValue::from_maybe_shared(head.slice(value.clone()))
                .map_err(|_| "malformed header value")?;
            present.note(&name);
            headers.append(name, value);
        }
        Ok((headers, present))
    }
}

/// Which of the headers that frame a message or its connection a head has,
/// noted while its map is built: most heads have few of them, and looking
/// up each one that is absent costs a hash.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Present(u8);

impl Present {
    const NAMES: [HeaderName; 5] = [
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::EXPECT,
        header::UPGRADE,
    ];

    fn note(&mut self, name: &HeaderName) {
        if let Some(i) = Self::NAMES.iter().position(|n| n == name) {
            self.0 |= 1 << i;
        }
    }

    /// Whether the head has `name`; a name not in [`Self::NAMES`] may be
    /// there (it is not noted), so it counts as present.
    pub(crate) fn has(self, name: &HeaderName) -> bool {
        Self::NAMES
            .iter()
            .position(|n| n == name)
            .is_none_or(|i| self.0 & (1 << i) != 0)
    }
}

/// Whether the last transfer coding is `chunked` (false without any).
pub(crate) fn ends_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

/// Whether a response has no body whatever its headers say (RFC 9112
/// section 6.3): to `HEAD`, `1xx`, `204`, `304`.
pub(crate) fn bodiless(status: StatusCode, head_request: bool) -> bool {
    head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// Whether the head's `Connection` header lists `token` (looked up only
/// when the head has one).
pub(crate) fn connection_has(headers: &HeaderMap, present: Present, token: &str) -> bool {
    present.has(&header::CONNECTION)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delimit {
    /// No body is sent (`HEAD`, `1xx`, `204`, `304`).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes a response head into `dst`: the status line, the response's
/// headers (framing and connection headers are the server's: replaced),
/// `Date` when missing, and the framing. `exact` is the body's length when
/// known; `keep_alive` says whether the connection stays open, and turns
/// false when the body can only end with the connection.
pub(crate) fn encode(
    dst: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    exact: Option<u64>,
    head_request: bool,
    client: Version,
    keep_alive: &mut bool,
) -> Delimit {
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    dst.extend_from_slice(b"\r\n");
    let mut declared = None;
    let mut dated = false;
    for (name, value) in headers {
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            match value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                Some(n) if declared.is_none() => declared = Some(n),
                _ => continue,
            }
        }
        dated |= name == header::DATE;
        line(dst, name.as_str().as_bytes(), value.as_bytes());
    }
    if !dated {
        date(|d| line(dst, b"date", d));
    }
    let delimit = if bodiless(status, head_request) {
        Delimit::None
    } else if let Some(n) = declared {
        Delimit::Length(n)
    } else if let Some(n) = exact {
        let _ = write!(dst, "content-length: {n}\r\n");
        Delimit::Length(n)
    } else if client == Version::HTTP_11 {
        line(dst, b"transfer-encoding", b"chunked");
        Delimit::Chunked
    } else {
        *keep_alive = false;
        Delimit::Close
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if !*keep_alive {
            line(dst, b"connection", b"close");
        } else if client == Version::HTTP_10 {
            line(dst, b"connection", b"keep-alive");
        }
    } else {
        line(dst, b"connection", b"upgrade");
    }
    dst.extend_from_slice(b"\r\n");
    delimit
}

/// One header field line.
pub(crate) fn line(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// The `Date` header's value for now, formatted once a second per thread.
fn date(with: impl FnOnce(&[u8])) {
    thread_local! {
        static NOW: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    NOW.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now).into_bytes();
        }
        with(text);
    });
}

/// A response the server writes itself (a refused head, a timeout), whole.
pub(crate) fn local(status: StatusCode, code: &str, text: &str) -> Bytes {
    let mut out = Vec::with_capacity(160 + text.len());
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::SERVER, HeaderValue::from_static("hangar"));
    if let Ok(code) = HeaderValue::from_str(code) {
        headers.insert(crate::error::FLY_PROXY_ERROR, code);
    }
    let mut keep_alive = false;
    let body = format!("{text}\n");
    encode(
        &mut out,
        status,
        &headers,
        Some(body.len() as u64),
        false,
        Version::HTTP_11,
        &mut keep_alive,
    );
    out.extend_from_slice(body.as_bytes());
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> Result<Option<Head>, HeadError> {
        parse(&mut BytesMut::from(raw.as_bytes()), 8192)
    }

    #[test]
    fn a_whole_head_is_taken_and_what_follows_left() {
        let mut buf =
            BytesMut::from(&b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nrest"[..]);
        let head = parse(&mut buf, 8192).unwrap().unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri, "/a?b=1");
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert!(head.keep_alive && !head.upgrade && head.body.is_none());
        assert_eq!(&buf[..], b"rest");
    }

    #[test]
    fn partial_heads_wait_and_large_ones_are_refused() {
        assert!(parsed("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(parsed(&big).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn body_framing_follows_rfc_9112() {
        let framing = |extra: &str| {
            parsed(&format!("POST / HTTP/1.1\r\nHost: x\r\n{extra}\r\n")).map(|h| h.unwrap().body)
        };
        assert_eq!(
            framing("Content-Length: 5\r\n"),
            Ok(Some(Framing::Length(5)))
        );
        assert_eq!(framing("Content-Length: 0\r\n"), Ok(None));
        assert_eq!(
            framing("Content-Length: 5, 5\r\n"),
            Ok(Some(Framing::Length(5)))
        );
        assert_eq!(
            framing("Transfer-Encoding: gzip, chunked\r\n"),
            Ok(Some(Framing::Chunked))
        );
        for bad in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip\r\n",
        ] {
            assert!(
                matches!(framing(bad), Err(HeadError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn connection_reuse_and_upgrades_follow_the_version() {
        let head = |raw: &str| parsed(raw).unwrap().unwrap();
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(
            head("GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").upgrade
        );
        assert!(!head("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").upgrade);
    }

    #[test]
    fn response_heads_carry_the_framing_the_body_needs() {
        let encoded = |status, exact, head, version| {
            let mut out = Vec::new();
            let mut keep = true;
            let delimit = encode(
                &mut out,
                status,
                &HeaderMap::new(),
                exact,
                head,
                version,
                &mut keep,
            );
            (String::from_utf8(out).unwrap(), delimit, keep)
        };
        let (text, delimit, keep) = encoded(StatusCode::OK, Some(3), false, Version::HTTP_11);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("content-length: 3\r\n"));
        assert!(text.contains("date: ") && text.ends_with("\r\n\r\n"));
        assert_eq!((delimit, keep), (Delimit::Length(3), true));
        let (text, delimit, _) = encoded(StatusCode::OK, None, false, Version::HTTP_11);
        assert!(text.contains("transfer-encoding: chunked\r\n"));
        assert_eq!(delimit, Delimit::Chunked);
        let (text, delimit, keep) = encoded(StatusCode::OK, None, false, Version::HTTP_10);
        assert!(text.contains("connection: close\r\n"));
        assert_eq!((delimit, keep), (Delimit::Close, false));
        let (_, delimit, _) = encoded(StatusCode::OK, Some(3), true, Version::HTTP_11);
        assert_eq!(delimit, Delimit::None);
    }
}

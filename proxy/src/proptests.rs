//! Property tests of what the proxy parses from clients and machines: the
//! HTTP/1 request head, chunked bodies, the Host header and `fly-replay`.
//! Whatever arrives, each answers without panicking; what each accepts
//! means what it was given. They run with the unit tests, so in CI.

use crate::h1::body::{Decoder, Framing, Step};
use crate::h1::head;
use crate::routing::host::{parse_flycast, parse_host};
use crate::routing::replay::Replay;
use bytes::BytesMut;
use http::HeaderValue;
use proptest::collection::vec;
use proptest::prelude::*;

/// A chunked encoding of `body` in chunks of `sizes` (cycled), with a
/// chunk extension on some chunks and a trailer.
fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    for (i, size) in sizes.iter().cycle().enumerate() {
        if rest.is_empty() {
            break;
        }
        let (chunk, later) = rest.split_at((*size).clamp(1, rest.len()));
        let ext = if i % 3 == 1 { ";name=value" } else { "" };
        out.extend_from_slice(format!("{:x}{ext}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
        rest = later;
    }
    out.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
    out
}

/// Runs the decoder over `wire` fed in pieces of `feeds` bytes (cycled):
/// the body it gave and whether it ended.
fn decode(mut decoder: Decoder, wire: &[u8], feeds: &[usize]) -> Result<(Vec<u8>, bool), ()> {
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut rest = wire;
    let mut feeds = feeds.iter().cycle();
    loop {
        match decoder.decode(&mut buf).map_err(drop)? {
            Step::Data(data) => body.extend_from_slice(&data),
            Step::Done => return Ok((body, true)),
            Step::NeedMore if rest.is_empty() => return Ok((body, false)),
            Step::NeedMore => {
                let n = (*feeds.next().expect("cycled")).clamp(1, rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_are_a_head_an_error_or_a_wait(bytes in vec(any::<u8>(), 0..1024)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = head::parse(&mut buf, 8192);
    }

    #[test]
    fn a_well_formed_head_reads_back(
        method in "GET|POST|PUT|DELETE|PATCH|OPTIONS",
        path in "/[a-zA-Z0-9/._~%-]{0,40}",
        fields in vec(("x-[a-z0-9-]{1,12}", "[ -~&&[^ ]][ -~]{0,20}[ -~&&[^ ]]"), 0..10),
        length in proptest::option::of(0u64..1_000_000),
    ) {
        let mut text = format!("{method} {path} HTTP/1.1\r\nHost: app.localhost\r\n");
        for (name, value) in &fields {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(n) = length {
            text.push_str(&format!("Content-Length: {n}\r\n"));
        }
        text.push_str("\r\nafter");
        let mut buf = BytesMut::from(text.as_bytes());
        let head = head::parse(&mut buf, 1 << 16).unwrap().unwrap();
        prop_assert_eq!(head.method.as_str(), method.as_str());
        prop_assert_eq!(head.uri.path(), path.as_str());
        for (name, value) in &fields {
            let got: Vec<&HeaderValue> = head.headers.get_all(name.as_str()).iter().collect();
            prop_assert!(got.iter().any(|v| v.as_bytes() == value.as_bytes()), "{name}: {got:?}");
        }
        let expected = length.filter(|n| *n > 0);
        let framed = match head.body {
            Some(Framing::Length(n)) => Some(n),
            _ => None,
        };
        prop_assert_eq!(framed, expected);
        prop_assert_eq!(&buf[..], b"after", "the body's bytes stay in the buffer");
    }

    #[test]
    fn a_chunked_body_decodes_to_itself_however_it_arrives(
        body in vec(any::<u8>(), 0..4096),
        sizes in vec(1usize..600, 1..8),
        feeds in vec(1usize..300, 1..8),
    ) {
        let wire = chunked(&body, &sizes);
        let (got, ended) = decode(Decoder::chunked(), &wire, &feeds).unwrap();
        prop_assert!(ended);
        prop_assert_eq!(got, body);
    }

    #[test]
    fn any_bytes_are_a_chunked_body_an_error_or_a_wait(
        wire in vec(any::<u8>(), 0..1024),
        feeds in vec(1usize..64, 1..4),
    ) {
        let _ = decode(Decoder::chunked(), &wire, &feeds);
    }

    #[test]
    fn a_chunk_size_past_u64_is_refused(digits in "[1-9a-f][0-9a-f]{16,24}") {
        let wire = format!("{digits}\r\n");
        prop_assert!(decode(Decoder::chunked(), wire.as_bytes(), &[64]).is_err());
    }

    #[test]
    fn any_host_is_an_app_or_an_error(raw in "\\PC{0,80}") {
        let _ = parse_host(&raw);
        let _ = parse_flycast(&raw);
    }

    #[test]
    fn an_apps_host_names_it_in_any_case_and_with_any_port(
        app in "[a-z0-9]([a-z0-9-]{0,29}[a-z0-9])?",
        upper in any::<bool>(),
        port in proptest::option::of(any::<u16>()),
        dot in any::<bool>(),
    ) {
        let mut host = format!("{app}.localhost{}", if dot { "." } else { "" });
        if upper {
            host = host.to_uppercase();
        }
        if let Some(p) = port {
            host.push_str(&format!(":{p}"));
        }
        prop_assert_eq!(parse_host(&host).unwrap(), app.clone());
        let flycast = host.replace("localhost", "flycast").replace("LOCALHOST", "FLYCAST");
        prop_assert_eq!(parse_flycast(&flycast), Some((app, port.unwrap_or(80))));
    }

    #[test]
    fn any_fly_replay_is_a_replay_or_an_error(raw in "[ -~]{0,120}") {
        if let Ok(value) = HeaderValue::from_str(&raw) {
            let _ = Replay::parse(&value);
        }
    }

    #[test]
    fn a_fly_replay_says_what_it_was_given(
        app in proptest::option::of("[a-z][a-z0-9-]{0,20}"),
        instance in proptest::option::of("[0-9a-f]{14}"),
        regions in proptest::option::of(vec("[a-z]{3}", 1..4)),
        state in proptest::option::of("[a-zA-Z0-9_]{1,20}"),
    ) {
        let mut fields = Vec::new();
        if let Some(a) = &app {
            fields.push(format!("app={a}"));
        }
        if let Some(i) = &instance {
            fields.push(format!("instance={i}"));
        }
        if let Some(r) = &regions {
            fields.push(format!("region=\"{}\"", r.join(",")));
        }
        if let Some(s) = &state {
            fields.push(format!("state={s}"));
        }
        prop_assume!(!fields.is_empty());
        let replay = Replay::parse(&HeaderValue::from_str(&fields.join(";")).unwrap()).unwrap();
        prop_assert_eq!(replay.app, app);
        prop_assert_eq!(replay.state, state);
        prop_assert_eq!(replay.instance, instance);
        if let Some(r) = regions {
            prop_assert_eq!(replay.regions, r);
        }
    }
}

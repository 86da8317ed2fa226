//! The app a request's host names: an app's custom hostname (one with a
//! certificate) first, then `<app>.flycast[:port]`, then `<app>.localhost`.
//! Names are compared as the catalog spells them: lower case, without a
//! port or a trailing dot.

use crate::error::{HostError, PathError};
use compact_str::CompactString;
use hangar_api::AppName;
use hangar_catalog::Fib;
use http::Request;
use http::header::{HOST, HeaderValue};

/// The host a request is for, and the app it names.
#[derive(Debug)]
pub(crate) struct Host {
    pub app: CompactString,
    /// What the machine gets as Host in place of the client's `Host`
    /// header: the URI's authority (h2, an absolute-form target), or an
    /// empty one when there is none. `None`: the client's header, as is.
    pub replace: Option<HeaderValue>,
    /// `<app>.flycast[:port]`: the port (80 by default).
    pub flycast: Option<u16>,
}

/// Reads the host from the URI authority (h2, or an HTTP/1 absolute-form
/// target, which takes precedence over `Host` per RFC 9112 section 3.2.2),
/// else from the `Host` header.
pub(crate) fn host<B>(fib: &Fib, req: &Request<B>) -> Result<Host, PathError> {
    let (replace, parsed) = match req.uri().authority() {
        Some(authority) => {
            let raw = HeaderValue::from_str(authority.as_str())
                .map_err(|_| PathError::BadHost(HostError::NotText))?;
            (Some(raw), app_of_host(fib, authority.as_str()))
        }
        None => {
            let raw = req
                .headers()
                .get(HOST)
                .ok_or(PathError::BadHost(HostError::Missing))?;
            let text = raw
                .to_str()
                .map_err(|_| PathError::BadHost(HostError::NotText))?;
            (None, app_of_host(fib, text))
        }
    };
    let (app, flycast) = parsed.map_err(PathError::BadHost)?;
    Ok(Host {
        app,
        replace,
        flycast,
    })
}

/// The app a Host names, with the port of `<app>.flycast[:port]`: an
/// app's custom hostname (one with an uploaded certificate) first, then
/// `<app>.flycast`, then `<app>.localhost`.
fn app_of_host(fib: &Fib, raw: &str) -> Result<(CompactString, Option<u16>), HostError> {
    let name = host_name(raw)?;
    if let Some(custom) = fib.snapshot().hostname(&name) {
        return Ok((custom.app.as_str().into(), None));
    }
    if let Some((app, port)) = flycast(raw, &name) {
        return Ok((app.into(), Some(port)));
    }
    localhost_app(raw, &name).map(|app| (app.into(), None))
}

/// A Host's name as the catalog spells names: without its port or a
/// trailing dot (the fully qualified spelling of the same name), in lower
/// case; inline, without an allocation, up to 24 bytes.
fn host_name(raw: &str) -> Result<CompactString, HostError> {
    if raw.is_empty() {
        return Err(HostError::Missing);
    }
    let mut name = CompactString::from(strip_port(raw)?);
    name.as_mut_str().make_ascii_lowercase();
    if name.ends_with('.') {
        name.pop();
    }
    Ok(name)
}

/// Parses a Host value (`hello.localhost`, `Hello.LocalHost:8080`,
/// `hello.localhost.`) into the app name it routes to.
#[cfg(test)]
pub(crate) fn parse_host(raw: &str) -> Result<String, HostError> {
    localhost_app(raw, &host_name(raw)?).map(str::to_string)
}

/// The app of `<app>.localhost`, `name` being `raw`'s [`host_name`].
fn localhost_app<'a>(raw: &str, name: &'a str) -> Result<&'a str, HostError> {
    let app = name
        .strip_suffix(".localhost")
        .ok_or_else(|| HostError::NotAnApp(raw.to_string()))?;
    if AppName::valid(app) {
        Ok(app)
    } else {
        Err(HostError::BadAppName(app.to_string()))
    }
}

/// `<app>.flycast[:port]` → the app and the port (80 when none): the name
/// an app's private services go by. Anything else is `None`.
#[cfg(test)]
pub(crate) fn parse_flycast(raw: &str) -> Option<(String, u16)> {
    let name = host_name(raw).ok()?;
    flycast(raw, &name).map(|(app, port)| (app.to_string(), port))
}

/// The app and port of `<app>.flycast[:port]`, `name` being `raw`'s
/// [`host_name`].
fn flycast<'a>(raw: &str, name: &'a str) -> Option<(&'a str, u16)> {
    let app = name
        .strip_suffix(".flycast")
        .filter(|app| AppName::valid(app))?;
    let port = match raw.rsplit_once(':') {
        Some((_, port)) if !port.is_empty() => port.parse().ok()?,
        _ => 80,
    };
    Some((app, port))
}

/// `name[:port]` → `name`. The port may be empty (RFC 3986 allows it) but
/// otherwise must be a number. An IPv6 literal is well-formed but no app.
pub(crate) fn strip_port(raw: &str) -> Result<&str, HostError> {
    if raw.starts_with('[') {
        return Err(HostError::NotAnApp(raw.to_string()));
    }
    let (name, port) = match raw.split_once(':') {
        Some((name, port)) => (name, port),
        None => (raw, ""),
    };
    // `u16::from_str` alone would accept a leading `+`.
    let port_ok = port.is_empty()
        || (port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok());
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if port_ok && name_ok {
        Ok(name)
    } else {
        Err(HostError::Malformed(raw.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_hosts_name_their_app() {
        for (raw, app) in [
            ("hello.localhost", "hello"),
            ("hello.localhost:8080", "hello"),
            ("Hello.LocalHost:8443", "hello"),
            ("hello.localhost.", "hello"),
            ("hello.localhost:", "hello"),
            ("my-app-2.localhost", "my-app-2"),
            (&format!("{}.localhost", "a".repeat(63)), &"a".repeat(63)),
        ] {
            assert_eq!(parse_host(raw).as_deref(), Ok(app), "{raw}");
        }
    }

    #[test]
    fn malformed_hosts_are_rejected_with_a_reason() {
        use HostError::*;
        let cases: &[(&str, HostError)] = &[
            ("", Missing),
            (
                "hello.localhost:80:80",
                Malformed("hello.localhost:80:80".into()),
            ),
            (
                "hello.localhost:http",
                Malformed("hello.localhost:http".into()),
            ),
            (
                "hello.localhost:99999",
                Malformed("hello.localhost:99999".into()),
            ),
            (
                "hello.localhost:+80",
                Malformed("hello.localhost:+80".into()),
            ),
            (":8080", Malformed(":8080".into())),
            ("hel lo.localhost", Malformed("hel lo.localhost".into())),
            ("hello.localhost/x", Malformed("hello.localhost/x".into())),
            (
                "user@hello.localhost",
                Malformed("user@hello.localhost".into()),
            ),
            ("localhost", NotAnApp("localhost".into())),
            ("localhost:8080", NotAnApp("localhost:8080".into())),
            ("hello.example.com", NotAnApp("hello.example.com".into())),
            ("127.0.0.1:8080", NotAnApp("127.0.0.1:8080".into())),
            ("[::1]:8080", NotAnApp("[::1]:8080".into())),
            (".localhost", BadAppName("".into())),
            ("a.b.localhost", BadAppName("a.b".into())),
            ("my_app.localhost", BadAppName("my_app".into())),
            // flaps never makes such a name, so none routes.
            ("-foo.localhost", BadAppName("-foo".into())),
            ("foo-.localhost", BadAppName("foo-".into())),
            (
                &format!("{}.localhost", "a".repeat(64)),
                BadAppName("a".repeat(64)),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_host(raw).as_ref(), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn flycast_names_name_their_app_and_port() {
        assert_eq!(parse_flycast("hello.flycast"), Some(("hello".into(), 80)));
        assert_eq!(
            parse_flycast("Hello.Flycast.:8080"),
            Some(("hello".into(), 8080))
        );
        assert_eq!(parse_flycast("hello.flycast:"), Some(("hello".into(), 80)));
        for other in [
            "hello.localhost",
            "a.b.flycast",
            ".flycast",
            "hello.flycast:x",
            "flycast",
        ] {
            assert_eq!(parse_flycast(other), None, "{other}");
        }
    }

    #[test]
    fn host_errors_read_as_one_line() {
        let e = parse_host("evil\u{7f}.localhost").unwrap_err();
        assert!(!e.to_string().contains('\n'));
        assert_eq!(
            parse_host("example.com").unwrap_err().to_string(),
            r#"Host "example.com" is not <app>.localhost or <app>.flycast"#
        );
    }
}

//! `fly-replay`: a machine answers a request with a `fly-replay` response
//! header instead of a response, and the proxy sends the same request
//! (buffered, see [`crate::forwarding::body`]) elsewhere: another region, machine or
//! app. The client only ever sees the last machine's response.
//!
//! ```text
//! fly-replay: region="sjc,any";app=worker;state=from-ams;timeout=2s;fallback=prefer_self
//! ```
//!
//! | field | meaning |
//! |---|---|
//! | `region` | the first of these regions (comma-separated, quoted) where the target app has machines; `any` matches every region |
//! | `instance` | that machine only (started if stopped) |
//! | `prefer_instance` | that machine when it can take the request, else as usual |
//! | `app` | another app of the same org (default: the same one); another org's app is unknown to it |
//! | `elsewhere` | `true`: not the machine that asked for the replay |
//! | `state` | passed on in `fly-replay-src` |
//! | `timeout` | how long finding and reaching the target may take (`800ms`, `2s`) |
//! | `fallback` | when the target cannot be reached: `force_self` sends the request back to the machine that asked, `prefer_self` to it or else any machine of its app, with `fly-replay-failed` |
//!
//! The replayed request carries `fly-replay-src:
//! instance=<id>;region=<region>;t=<µs since the epoch>;state=<state>`. A
//! request is replayed at most [`MAX_REPLAYS`] times; one that has fallen
//! back is not replayed again.

use http::HeaderValue;
use http::header::HeaderName;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The response header a machine asks for a replay with.
pub(crate) const FLY_REPLAY: HeaderName = HeaderName::from_static("fly-replay");
/// On a replayed request: who asked for the replay.
pub(crate) const FLY_REPLAY_SRC: HeaderName = HeaderName::from_static("fly-replay-src");
/// On a request that fell back to the machine that asked: why the replay
/// failed.
pub(crate) const FLY_REPLAY_FAILED: HeaderName = HeaderName::from_static("fly-replay-failed");

/// Replays of one request, at most (as Fly).
pub(crate) const MAX_REPLAYS: usize = 10;

/// One `fly-replay` header, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Replay {
    pub app: Option<String>,
    /// In order of preference; `any` matches every region.
    pub regions: Vec<String>,
    pub instance: Option<String>,
    pub prefer_instance: Option<String>,
    pub elsewhere: bool,
    pub state: Option<String>,
    pub timeout: Option<Duration>,
    pub fallback: Option<Fallback>,
}

/// Where a request goes when its replay target cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// Back to the machine that asked for the replay, or fail.
    ForceSelf,
    /// Back to that machine when it can take it, else any of its app's.
    PreferSelf,
}

impl Replay {
    /// Parses `field=value;field="quoted value";...`. Every field must be
    /// known and well-formed: a machine that asks for something the proxy
    /// cannot do gets told so rather than a guess.
    pub(crate) fn parse(header: &HeaderValue) -> Result<Self, String> {
        let text = header
            .to_str()
            .map_err(|_| "the header is not visible ASCII".to_string())?;
        let mut replay = Self::default();
        for field in split_fields(text)? {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("field {field:?} is not name=value"))?;
            let value = unquote(value.trim());
            let nonempty = || {
                (!value.is_empty())
                    .then(|| value.to_string())
                    .ok_or_else(|| format!("{key} is empty"))
            };
            match key.trim().to_ascii_lowercase().as_str() {
                "app" => replay.app = Some(nonempty()?),
                "region" => {
                    replay.regions = value
                        .split(',')
                        .map(|r| r.trim().to_ascii_lowercase())
                        .filter(|r| !r.is_empty())
                        .collect();
                    if replay.regions.is_empty() {
                        return Err("region is empty".into());
                    }
                }
                "instance" => replay.instance = Some(nonempty()?),
                "prefer_instance" => replay.prefer_instance = Some(nonempty()?),
                "state" => replay.state = Some(value.to_string()),
                "elsewhere" => {
                    replay.elsewhere = match value.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("elsewhere={value:?} is not true or false")),
                    }
                }
                "timeout" => {
                    let after = humantime::parse_duration(value)
                        .map_err(|e| format!("timeout={value:?}: {e}"))?;
                    replay.timeout = Some(after);
                }
                "fallback" => {
                    replay.fallback = Some(match value {
                        "force_self" => Fallback::ForceSelf,
                        "prefer_self" => Fallback::PreferSelf,
                        _ => {
                            return Err(format!(
                                "fallback={value:?} is not force_self or prefer_self"
                            ));
                        }
                    })
                }
                other => return Err(format!("unknown field {other:?}")),
            }
        }
        Ok(replay)
    }
}

/// Splits on `;` outside double quotes.
fn split_fields(text: &str) -> Result<Vec<&str>, String> {
    let mut fields = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                fields.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("a quote is not closed".into());
    }
    fields.push(&text[start..]);
    Ok(fields
        .into_iter()
        .filter(|f| !f.trim().is_empty())
        .collect())
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// `fly-replay-src` for a request replayed at the request of `machine`.
pub(crate) fn source(machine: &str, region: &str, state: Option<&str>) -> HeaderValue {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let mut text = format!("instance={machine};region={region};t={micros}");
    if let Some(state) = state {
        text.push_str(";state=");
        text.push_str(state);
    }
    header_text(&text)
}

/// `fly-replay-failed` for a request that fell back: the code and message
/// of the error the replay ended with.
pub(crate) fn failed(code: &str, message: &str) -> HeaderValue {
    let reason = message.replace('\\', "\\\\").replace('"', "\\\"");
    header_text(&format!("code={code};reason=\"{reason}\""))
}

/// A header value from text that may hold bytes a header cannot (they
/// came from machines and error messages): those become `?`.
fn header_text(text: &str) -> HeaderValue {
    let clean: String = text
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&clean).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Replay, String> {
        Replay::parse(&HeaderValue::from_str(text).unwrap())
    }

    #[test]
    fn every_field_parses() {
        let replay = parse(
            r#"region="sjc, AMS,any"; app=worker;instance=m1;prefer_instance=m2;elsewhere=true;state="a;b";timeout=800ms;fallback=prefer_self"#,
        )
        .unwrap();
        assert_eq!(
            replay,
            Replay {
                app: Some("worker".into()),
                regions: vec!["sjc".into(), "ams".into(), "any".into()],
                instance: Some("m1".into()),
                prefer_instance: Some("m2".into()),
                elsewhere: true,
                state: Some("a;b".into()),
                timeout: Some(Duration::from_millis(800)),
                fallback: Some(Fallback::PreferSelf),
            }
        );
        assert_eq!(parse("region=ord").unwrap().regions, ["ord"]);
        assert_eq!(
            parse("timeout=2s;fallback=force_self").unwrap().fallback,
            Some(Fallback::ForceSelf)
        );
    }

    #[test]
    fn malformed_headers_say_what_is_wrong() {
        for (text, error) in [
            ("region", "field \"region\" is not name=value"),
            ("colour=red", "unknown field \"colour\""),
            ("elsewhere=yes", "elsewhere=\"yes\" is not true or false"),
            (
                "fallback=self",
                "fallback=\"self\" is not force_self or prefer_self",
            ),
            ("app=", "app is empty"),
            ("region=\"sjc", "a quote is not closed"),
            ("region=,", "region is empty"),
        ] {
            assert_eq!(parse(text).unwrap_err(), error, "{text}");
        }
        assert!(
            parse("timeout=soon")
                .unwrap_err()
                .starts_with("timeout=\"soon\"")
        );
    }

    #[test]
    fn source_and_failure_headers_are_valid_text() {
        let src = source("m1", "ams", Some("x=1"));
        let src = src.to_str().unwrap();
        assert!(src.starts_with("instance=m1;region=ams;t="), "{src}");
        assert!(src.ends_with(";state=x=1"), "{src}");
        let failed = failed("PR01", "app \"w\" has no started machine\u{7f}");
        assert_eq!(
            failed.to_str().unwrap(),
            r#"code=PR01;reason="app \"w\" has no started machine?""#
        );
    }
}

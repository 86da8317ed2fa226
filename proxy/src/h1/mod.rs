//! HTTP/1.1 on the wire, for both hops: request and response heads
//! ([`head`]: parsed in place with httparse, written in one buffer), body
//! framing and the request body's pump ([`body`]), connections handed over
//! at an upgrade ([`io`]), and the worker's spare read buffers ([`spare`]).
//! The server that uses them for clients is `listening::server`; the
//! client for machines is `forwarding::client`.

pub(crate) mod body;
pub(crate) mod head;
pub(crate) mod io;
pub(crate) mod spare;

use std::time::Duration;

/// The limits a client connection enforces.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Time for a whole request head, from the start of the wait for it.
    pub header_timeout: Duration,
    /// Largest request head accepted.
    pub max_head: usize,
    /// Longest wait for the next bytes of a request body.
    pub body_timeout: Duration,
}

//! Forwarding: getting a request (or a connection's bytes) to the chosen
//! machine and its answer back.
//!
//! - [`upstream`]: keep-alive connections to machines, pooled per worker
//!   and machine, driven by the request that uses them; h2 for
//!   `h2_backend`; hyper's client for streamed bodies and upgrades.
//! - [`client`]: the HTTP/1.1 client those pooled connections speak.
//! - [`body`]: request bodies read whole (so a request can go again) or
//!   streamed, and response bodies that hold the request's lease.
//! - [`headers`]: header rewriting at the hop (Fly's `Fly-*`,
//!   `X-Forwarded-*`, `Via`, hop-by-hop headers, upgrades).
//! - [`tcp`]: raw TCP connections to an app's port: a slot, a machine
//!   (another when one refuses), a PROXY protocol header, the bytes.
//!
//! Imports: scaling (a TCP connection takes its slot like a request),
//! routing, and the crate's base.

pub(crate) mod body;
pub(crate) mod client;
pub(crate) mod headers;
pub(crate) mod tcp;
pub(crate) mod upstream;

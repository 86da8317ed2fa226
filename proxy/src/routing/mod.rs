//! Routing: which app a request is for and which machine takes it.
//!
//! - `host`: the app a Host (or an h2 authority) names.
//! - `steer`: Fly's routing request headers (`fly-force-instance-id`,
//!   `fly-prefer-region`, ...) and the hop a request is on.
//! - [`balance`]: which machine takes a request (limits, nearest region,
//!   two choices on exact in-flight counts) and the lease that counts it.
//! - `sticky`: sessions pinned to a machine by cookie or header.
//! - `replay`: `fly-replay` answers sending a request on to another
//!   region, machine or app.
//! - `peers`: other regions' proxies, for requests this region has no
//!   machine for.
//!
//! Imports: only the crate's base (config, errors). What a lease's end
//! must tell (the scaling room) comes in through [`balance::Released`].

pub mod balance;
pub(crate) mod host;
pub(crate) mod peers;
pub(crate) mod replay;
pub(crate) mod steer;
pub(crate) mod sticky;

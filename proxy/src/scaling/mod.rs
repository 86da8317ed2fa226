//! Scaling: machines started and stopped by demand, and requests waiting
//! for room.
//!
//! - [`queue`]: requests waiting for a slot while an app is at its limits.
//! - [`autostart`]: starting a stopped machine for a request, single flight.
//! - [`autostop`]: stopping idle machines, one per app and region per round.
//! - `slot`: taking a slot for a request or a raw TCP connection: choose,
//!   wait, start, choose again.
//!
//! Imports: routing (which machine, and the lease that counts it), and the
//! crate's base (config, errors, metrics).

pub mod autostart;
pub mod autostop;
pub mod queue;
pub(crate) mod slot;

use crate::routing::balance;
use hangar_catalog::{AppRoutes, RouteMachine};
use std::sync::Arc;

/// What a lease's end tells: the app's waiting requests (one may take the
/// slot) and the machine's idle clock (for autostop).
#[derive(Debug)]
pub(crate) struct Release {
    pub queues: Arc<queue::Queues>,
    pub activity: Arc<autostop::Activity>,
}

impl balance::Released for Release {
    fn released(&self, app: &AppRoutes, machine: &RouteMachine) {
        self.activity.touch(&machine.id);
        self.queues.released(&app.name);
    }
}

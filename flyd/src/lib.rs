//! flyd

//! flaps

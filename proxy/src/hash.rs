//! The hasher of the proxy's own maps.

/// The hasher of the maps a request looks up on its way (upstream pools,
/// machine activity, metric series): their keys come from the catalog and
/// the proxy, not from clients, so a fast keyed hash does, where the
/// default SipHash costs more than the lookup it serves.
pub(crate) type FastHash = foldhash::fast::RandomState;

//! Limits on open client connections: per app (`proxy.max_conns_per_app`),
//! so one app's clients cannot take every connection the proxy can hold,
//! and per client address (`proxy.max_conns_per_ip`), so one client cannot
//! take all of an app's (or the proxy's).
//!
//! A client connection counts against the app of its first request (on the
//! shared listeners) or of the address it came to (an app's own address),
//! and against its client's address from accept, until it closes.

use compact_str::CompactString;
use dashmap::DashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

/// Open client connections per key (an app, a client address).
#[derive(Debug)]
pub(crate) struct OpenConns<K: Eq + Hash> {
    open: DashMap<K, usize>,
    /// 0: no limit.
    limit: usize,
}

/// Connections per app.
pub(crate) type AppConns = OpenConns<CompactString>;
/// Connections per client address.
pub(crate) type ClientConns = OpenConns<IpAddr>;

/// One connection counted against its key; uncounted on drop.
#[derive(Debug)]
pub(crate) struct Counted<K: Eq + Hash> {
    conns: Arc<OpenConns<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> OpenConns<K> {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            open: DashMap::new(),
            limit,
        })
    }

    /// The limit, 0 meaning none.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Counts one more connection for `key`, unless it is at the limit.
    /// (Keys are removed once their count is back to 0, so the map holds
    /// only keys with open connections.)
    pub(crate) fn enter(self: &Arc<Self>, key: K) -> Option<Counted<K>> {
        let mut open = self.open.entry(key.clone()).or_insert(0);
        if self.limit > 0 && *open >= self.limit {
            return None;
        }
        *open += 1;
        Some(Counted {
            conns: self.clone(),
            key,
        })
    }
}

impl<K: Eq + Hash> Drop for Counted<K> {
    fn drop(&mut self) {
        if let Some(mut open) = self.conns.open.get_mut(&self.key) {
            *open -= 1;
        }
        self.conns.open.remove_if(&self.key, |_, n| *n == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_count_per_key_up_to_the_limit() {
        let conns = AppConns::new(2);
        let a = conns.enter("a".into()).unwrap();
        let b = conns.enter("a".into()).unwrap();
        assert!(conns.enter("a".into()).is_none(), "at the limit");
        let other = conns.enter("b".into()).unwrap();
        drop(a);
        let c = conns.enter("a".into()).unwrap();
        drop((b, c, other));
        assert!(conns.open.is_empty(), "nothing left counted");
        let unlimited = ClientConns::new(0);
        let many: Vec<_> = (0..100)
            .map(|_| unlimited.enter([127, 0, 0, 1].into()).unwrap())
            .collect();
        assert_eq!(many.len(), 100);
    }
}

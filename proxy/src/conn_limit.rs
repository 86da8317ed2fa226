//! The per-app limit on client connections (`proxy.max_conns_per_app`), so
//! one app's clients cannot take every connection the proxy can hold.
//!
//! A client connection counts against the app of its first request (on the
//! shared listeners) or of the address it came to (an app's own address),
//! from then until it closes.

use compact_str::CompactString;
use dashmap::DashMap;
use std::sync::Arc;

/// Open client connections per app.
#[derive(Debug)]
pub(crate) struct AppConns {
    open: DashMap<CompactString, usize>,
    /// 0: no limit.
    limit: usize,
}

/// One connection counted against its app; uncounted on drop.
#[derive(Debug)]
pub(crate) struct Counted {
    conns: Arc<AppConns>,
    app: CompactString,
}

impl AppConns {
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

    /// Counts one more connection for `app`, unless it is at the limit.
    pub(crate) fn enter(self: &Arc<Self>, app: &str) -> Option<Counted> {
        let mut open = self.open.entry(CompactString::from(app)).or_insert(0);
        if self.limit > 0 && *open >= self.limit {
            return None;
        }
        *open += 1;
        Some(Counted {
            conns: self.clone(),
            app: app.into(),
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(mut open) = self.conns.open.get_mut(&self.app) {
            *open -= 1;
        }
        self.conns.open.remove_if(&self.app, |_, n| *n == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_count_per_app_up_to_the_limit() {
        let conns = AppConns::new(2);
        let a = conns.enter("a").unwrap();
        let b = conns.enter("a").unwrap();
        assert!(conns.enter("a").is_none(), "at the limit");
        let other = conns.enter("b").unwrap();
        drop(a);
        let c = conns.enter("a").unwrap();
        drop((b, c, other));
        assert!(conns.open.is_empty(), "nothing left counted");
        let unlimited = AppConns::new(0);
        let many: Vec<_> = (0..100).map(|_| unlimited.enter("a").unwrap()).collect();
        assert_eq!(many.len(), 100);
    }
}

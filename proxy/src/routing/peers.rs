//! Other regions' proxies (`[[proxy.peers]]`, closest first).
//!
//! A proxy whose region has no machine for a request (none routable and
//! none it can start: with a regional catalog it only knows its own
//! region's machines, and the others' summaries) sends the request to the
//! closest peer whose region has machines taking requests, else to the
//! closest whose region has machines that can be started (its proxy starts
//! one). With `fly-force-region` naming a peer's region, to that peer. The
//! request carries `fly-forwarded-region: <this region>` and the cluster
//! credential (`hangar-peer-credential`); a proxy never forwards a request
//! that came from a peer, so there are no loops. The receiving proxy
//! trusts that header (and the `Fly-Client-IP`, `X-Forwarded-*`,
//! `Fly-Region` and `Fly-Request-Id` the first proxy set) only with the
//! credential, wherever the request comes from: from anyone else the
//! proxy's own values replace them. The credential never reaches a machine.
//!
//! With a global catalog a proxy knows every region's machines and sends
//! requests to other regions' machines itself.

use crate::config::Peer;
use hangar_catalog::{AppRoutes, ClusterKey};
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use std::sync::Arc;

/// The region of the proxy that forwarded a request.
pub(crate) const FLY_FORWARDED_REGION: HeaderName = HeaderName::from_static("fly-forwarded-region");

/// The cluster credential a peer presents with a request it forwards.
pub(crate) const PEER_CREDENTIAL: HeaderName = HeaderName::from_static("hangar-peer-credential");

/// This proxy's peers, and the credential that proves a request came from
/// one.
#[derive(Debug)]
pub(crate) struct Peers {
    list: Vec<Peer>,
    cluster: Arc<ClusterKey>,
}

impl Peers {
    pub(crate) fn new(list: Vec<Peer>, cluster: Arc<ClusterKey>) -> Self {
        Self { list, cluster }
    }

    /// The peer to send a request for `app` to: `forced`'s when the client
    /// forced a region, else the closest with machines taking requests,
    /// else the closest with machines at all.
    pub(crate) fn choose(&self, app: &AppRoutes, forced: Option<&str>) -> Option<&Peer> {
        if let Some(region) = forced {
            return self.list.iter().find(|p| p.region == region);
        }
        let summary = |p: &&Peer| app.region(&p.region);
        self.list
            .iter()
            .find(|p| summary(p).is_some_and(|r| r.routable > 0))
            .or_else(|| {
                self.list
                    .iter()
                    .find(|p| summary(p).is_some_and(|r| r.started + r.stopped + r.suspended > 0))
            })
    }

    /// Whether a request came through a peer, which presented the
    /// cluster credential: its `fly-forwarded-region` if so. Both headers
    /// are removed, whoever sent them.
    pub(crate) fn forwarded(&self, headers: &mut HeaderMap) -> Option<HeaderValue> {
        if !headers
            .keys()
            .any(|n| n == FLY_FORWARDED_REGION || n == PEER_CREDENTIAL)
        {
            return None;
        }
        let credential = headers.remove(PEER_CREDENTIAL);
        let region = headers.remove(FLY_FORWARDED_REGION)?;
        credential
            .is_some_and(|c| self.cluster.admits(c.as_bytes()))
            .then_some(region)
    }

    /// Marks a request this proxy forwards to a peer: its region and the
    /// cluster credential.
    pub(crate) fn mark(&self, headers: &mut HeaderMap, region: HeaderValue) {
        headers.insert(FLY_FORWARDED_REGION, region);
        if let Ok(mut credential) = HeaderValue::from_str(self.cluster.token()) {
            credential.set_sensitive(true);
            headers.insert(PEER_CREDENTIAL, credential);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_catalog::RegionSummary;

    fn summary(region: &str, routable: u32, stopped: u32) -> RegionSummary {
        RegionSummary {
            region: region.into(),
            started: routable,
            stopped,
            suspended: 0,
            routable,
            capacity: u64::from(routable) * 20,
        }
    }

    fn peers() -> (tempfile::TempDir, Peers) {
        let peer = |region: &str, port| Peer {
            region: region.parse().unwrap(),
            addr: ([127, 0, 0, 1], port).into(),
        };
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterKey::load_or_create(&dir.path().join("cluster.key")).unwrap();
        let list = vec![peer("ord", 1), peer("ams", 2), peer("syd", 3)];
        (dir, Peers::new(list, Arc::new(cluster)))
    }

    #[test]
    fn the_closest_region_taking_requests_wins_then_one_that_can_start() {
        let app = |regions: Vec<RegionSummary>| AppRoutes::empty("hello").with_regions(regions);
        let (_dir, peers) = peers();
        let pick = |app: &AppRoutes, forced| peers.choose(app, forced).map(|p| p.region.clone());
        let up = app(vec![
            summary("ord", 0, 1),
            summary("syd", 2, 0),
            summary("ams", 1, 0),
        ]);
        assert_eq!(pick(&up, None).as_deref(), Some("ams"));
        assert_eq!(pick(&up, Some("syd")).as_deref(), Some("syd"));
        assert_eq!(pick(&up, Some("lhr")), None);
        let down = app(vec![summary("syd", 0, 1), summary("ams", 0, 0)]);
        assert_eq!(pick(&down, None).as_deref(), Some("syd"));
        assert_eq!(pick(&app(vec![]), None), None);
    }

    #[test]
    fn only_a_peer_with_the_credential_may_say_it_forwarded() {
        let (_dir, peers) = peers();
        let ord = HeaderValue::from_static("ord");
        let mut marked = HeaderMap::new();
        peers.mark(&mut marked, ord.clone());
        assert_eq!(peers.forwarded(&mut marked), Some(ord.clone()));
        assert!(marked.is_empty(), "both removed: {marked:?}");

        let mut forged = HeaderMap::new();
        forged.insert(FLY_FORWARDED_REGION, ord.clone());
        assert_eq!(peers.forwarded(&mut forged), None);
        forged.insert(FLY_FORWARDED_REGION, ord.clone());
        forged.insert(PEER_CREDENTIAL, HeaderValue::from_static("guess"));
        assert_eq!(peers.forwarded(&mut forged), None);
        assert!(forged.is_empty(), "removed: {forged:?}");
        // A credential alone is removed too: it never reaches a machine.
        peers.mark(&mut forged, ord);
        forged.remove(FLY_FORWARDED_REGION);
        assert_eq!(peers.forwarded(&mut forged), None);
        assert!(forged.is_empty(), "removed: {forged:?}");
    }
}

//! Other regions' proxies (`[[proxy.peers]]`, closest first).
//!
//! A proxy whose region has no machine for a request (none routable and
//! none it can start: with a regional catalog it only knows its own
//! region's machines, and the others' summaries) sends the request to the
//! closest peer whose region has machines taking requests, else to the
//! closest whose region has machines that can be started (its proxy starts
//! one). With `fly-force-region` naming a peer's region, to that peer. The
//! request carries `fly-forwarded-region: <this region>`; a proxy never
//! forwards a request that came from a peer, so there are no loops. The
//! receiving proxy trusts that header (and the `Fly-Client-IP`,
//! `X-Forwarded-*`, `Fly-Region` and `Fly-Request-Id` the first proxy set)
//! only from a peer's address; from anyone else it is removed.
//!
//! With a global catalog a proxy knows every region's machines and sends
//! requests to other regions' machines itself.

use crate::config::Peer;
use hangar_catalog::AppRoutes;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use std::net::IpAddr;

/// The region of the proxy that forwarded a request.
pub(crate) const FLY_FORWARDED_REGION: HeaderName = HeaderName::from_static("fly-forwarded-region");

/// This proxy's peers.
#[derive(Debug)]
pub(crate) struct Peers {
    list: Vec<Peer>,
}

impl Peers {
    pub(crate) fn new(list: Vec<Peer>) -> Self {
        Self { list }
    }

    /// The peers, closest first (the order of `proxy.peers`): also the
    /// order in which this proxy prefers other regions' machines.
    pub(crate) fn order(&self) -> &[Peer] {
        &self.list
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

    /// Whether a request from `from` came through a peer: its
    /// `fly-forwarded-region` if so. A header from anyone else is removed.
    pub(crate) fn forwarded(&self, from: IpAddr, headers: &mut HeaderMap) -> Option<HeaderValue> {
        if !crate::headers::has(headers, &FLY_FORWARDED_REGION) {
            return None;
        }
        let region = headers.remove(FLY_FORWARDED_REGION)?;
        let ip = from.to_canonical();
        self.list
            .iter()
            .any(|p| p.addr.ip() == ip)
            .then_some(region)
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

    fn peers() -> Peers {
        let peer = |region: &str, port| Peer {
            region: region.into(),
            addr: ([127, 0, 0, 1], port).into(),
        };
        Peers::new(vec![peer("ord", 1), peer("ams", 2), peer("syd", 3)])
    }

    #[test]
    fn the_closest_region_taking_requests_wins_then_one_that_can_start() {
        let app = |regions: Vec<RegionSummary>| AppRoutes {
            regions: regions.into(),
            ..AppRoutes::empty("hello")
        };
        let peers = peers();
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
    fn only_a_peer_may_say_it_forwarded() {
        let peers = peers();
        let mut headers = HeaderMap::new();
        headers.insert(FLY_FORWARDED_REGION, HeaderValue::from_static("ord"));
        let mut forged = headers.clone();
        assert_eq!(
            peers.forwarded([127, 0, 0, 1].into(), &mut headers),
            Some(HeaderValue::from_static("ord"))
        );
        assert_eq!(peers.forwarded([10, 0, 0, 1].into(), &mut forged), None);
        assert!(forged.is_empty(), "removed");
    }
}

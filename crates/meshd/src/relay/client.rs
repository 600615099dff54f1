//! The relayed node's side of an allocation, pure: which requests to send to which relay and when, which
//! grants to take, and the endpoint each relayed peer gets (the relay's address at the granted port).
//!
//! A node asks its relay for each peer the plan relays ([`crate::plan::relays`]), again every
//! [`RETRY`] until an answer comes, then refreshes at a third of the granted lifetime while the peer is
//! still relayed through that relay; a refusal is retried after [`REFUSED_RETRY`]. A peer that goes
//! direct (or moves to another relay) is forgotten at once: no more refreshes, and the relay lets the
//! allocation expire. A grant counts only as the answer to a request still outstanding: from the address
//! the request went to, echoing it as the target, from the relay it was sent to, for the pair asked.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hybridnet_config::PublicKey;

use crate::probe::{Alloc, AllocResult};

/// A request without an answer is sent again after this long.
pub const RETRY: Duration = Duration::from_secs(1);
/// A refused request is sent again after this long.
pub const REFUSED_RETRY: Duration = Duration::from_secs(5);

/// A request to send: to the relay `relay` at its probe address `to`, for the pair with `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub peer: PublicKey,
    pub relay: PublicKey,
    pub to: SocketAddr,
    pub nonce: u64,
}

#[derive(Clone, Debug)]
struct Held {
    relay: PublicKey,
    to: SocketAddr,
    /// The relay's address at the granted port, while granted.
    endpoint: Option<SocketAddr>,
    expires: Option<Instant>,
    next: Instant,
    refused: Option<AllocResult>,
}

/// The allocations this node holds (or asks for) on relays, per relayed peer.
#[derive(Debug, Default)]
pub struct Client {
    held: BTreeMap<PublicKey, Held>,
    outstanding: HashMap<u64, (Request, Instant)>,
}

/// A relayed peer's allocation as `meshd status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub peer: PublicKey,
    pub relay: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub expires_in: Option<Duration>,
    pub refused: Option<AllocResult>,
}

impl Client {
    /// `wanted`: each relayed peer, its relay and the relay's probe address. Returns the requests due now
    /// and whether a relayed endpoint went away (a peer no longer relayed, an allocation expired).
    pub fn poll(
        &mut self,
        now: Instant,
        wanted: &BTreeMap<PublicKey, (PublicKey, SocketAddr)>,
        mut nonce: impl FnMut() -> u64,
    ) -> (Vec<Request>, bool) {
        let mut changed = false;
        self.held.retain(|peer, h| {
            let keep = wanted.get(peer) == Some(&(h.relay, h.to));
            changed |= !keep && h.endpoint.is_some();
            keep
        });
        let mut due = Vec::new();
        for (peer, (relay, to)) in wanted {
            let h = self.held.entry(*peer).or_insert(Held {
                relay: *relay,
                to: *to,
                endpoint: None,
                expires: None,
                next: now,
                refused: None,
            });
            if h.expires.is_some_and(|e| e <= now) {
                h.expires = None;
                changed |= h.endpoint.take().is_some();
            }
            if now >= h.next {
                let request = Request {
                    peer: *peer,
                    relay: *relay,
                    to: *to,
                    nonce: nonce(),
                };
                self.outstanding.insert(request.nonce, (request, now));
                h.next = now + RETRY;
                due.push(request);
            }
        }
        // An answer later than this is too late (the request was sent again meanwhile).
        self.outstanding
            .retain(|_, (_, sent)| now.saturating_duration_since(*sent) < REFUSED_RETRY);
        (due, changed)
    }

    /// A relay's answer (MAC checked): `relay` sent it from `from`, answering `nonce`, echoing `target`.
    /// Returns whether a relayed endpoint changed; `None` when it answers no outstanding request of ours.
    pub fn on_answer(
        &mut self,
        now: Instant,
        relay: PublicKey,
        from: SocketAddr,
        nonce: u64,
        target: Option<SocketAddr>,
        alloc: &Alloc,
    ) -> Option<bool> {
        let (request, _) = self.outstanding.get(&nonce)?;
        if request.relay != relay
            || request.to != from
            || target != Some(request.to)
            || alloc.other != request.peer
        {
            return None;
        }
        let (request, _) = self.outstanding.remove(&nonce)?;
        let h = self.held.get_mut(&request.peer)?;
        if h.relay != request.relay || h.to != request.to {
            return None;
        }
        let before = h.endpoint;
        if alloc.result == AllocResult::Granted && alloc.port != 0 {
            let lifetime = Duration::from_secs(u64::from(alloc.lifetime_s));
            h.endpoint = Some(SocketAddr::new(request.to.ip(), alloc.port));
            h.expires = Some(now + lifetime);
            h.next = now + (lifetime / 3).max(RETRY);
            h.refused = None;
        } else {
            h.endpoint = None;
            h.expires = None;
            h.next = now + REFUSED_RETRY;
            h.refused = Some(alloc.result);
        }
        Some(h.endpoint != before)
    }

    /// Each relayed peer with a grant: its relay and the endpoint to use (the relay's address, the
    /// granted port).
    pub fn endpoints(&self) -> BTreeMap<PublicKey, (PublicKey, SocketAddr)> {
        self.held
            .iter()
            .filter_map(|(peer, h)| h.endpoint.map(|e| (*peer, (h.relay, e))))
            .collect()
    }

    /// Every relayed peer's allocation, granted or not.
    pub fn views(&self, now: Instant) -> Vec<View> {
        self.held
            .iter()
            .map(|(peer, h)| View {
                peer: *peer,
                relay: h.relay,
                endpoint: h.endpoint,
                expires_in: h.expires.map(|e| e.saturating_duration_since(now)),
                refused: h.refused,
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;

    fn key(i: u8) -> PublicKey {
        PrivateKey([i; 32]).public()
    }

    fn granted(other: PublicKey, port: u16) -> Alloc {
        Alloc {
            other,
            result: AllocResult::Granted,
            port,
            lifetime_s: 60,
        }
    }

    #[test]
    fn asks_until_granted_refreshes_while_relayed_and_stops_when_direct() {
        let (b, r, r2) = (key(2), key(3), key(4));
        let to: SocketAddr = "198.51.100.1:51821".parse().unwrap();
        let to2: SocketAddr = "198.51.100.2:51821".parse().unwrap();
        let mut c = Client::default();
        let mut n = 0u64;
        let mut nonce = || {
            n += 1;
            n
        };
        let t = Instant::now();
        let wanted = BTreeMap::from([(b, (r, to))]);
        let (due, changed) = c.poll(t, &wanted, &mut nonce);
        assert_eq!(due.len(), 1);
        assert!(!changed);
        let first = due[0];
        // Not again before RETRY; again after it (no answer).
        assert!(c.poll(t + RETRY / 2, &wanted, &mut nonce).0.is_empty());
        let (due, _) = c.poll(t + RETRY, &wanted, &mut nonce);
        assert_eq!(due.len(), 1);
        let second = due[0];
        // Answers that do not match the request are ignored: wrong relay, wrong source, wrong target,
        // wrong pair, unknown nonce.
        let at = t + RETRY;
        assert_eq!(
            c.on_answer(at, r2, to, second.nonce, Some(to), &granted(b, 9)),
            None
        );
        assert_eq!(
            c.on_answer(at, r, to2, second.nonce, Some(to), &granted(b, 9)),
            None
        );
        assert_eq!(
            c.on_answer(at, r, to, second.nonce, Some(to2), &granted(b, 9)),
            None
        );
        assert_eq!(
            c.on_answer(at, r, to, second.nonce, Some(to), &granted(key(5), 9)),
            None
        );
        assert_eq!(c.on_answer(at, r, to, 999, Some(to), &granted(b, 9)), None);
        assert!(c.endpoints().is_empty());
        // The first request's (late) answer still counts, once.
        assert_eq!(
            c.on_answer(at, r, to, first.nonce, Some(to), &granted(b, 40001)),
            Some(true)
        );
        assert_eq!(
            c.on_answer(at, r, to, first.nonce, Some(to), &granted(b, 40001)),
            None
        );
        let ep: SocketAddr = "198.51.100.1:40001".parse().unwrap();
        assert_eq!(c.endpoints(), BTreeMap::from([(b, (r, ep))]));
        // Refreshed at a third of the lifetime, not before.
        assert!(
            c.poll(at + Duration::from_secs(19), &wanted, &mut nonce)
                .0
                .is_empty()
        );
        let (due, changed) = c.poll(at + Duration::from_secs(20), &wanted, &mut nonce);
        assert_eq!((due.len(), changed), (1, false));
        // No answer to any refresh: the grant expires with its lifetime, the endpoint goes.
        let (_, changed) = c.poll(at + Duration::from_secs(60), &wanted, &mut nonce);
        assert!(changed);
        assert!(c.endpoints().is_empty());
        // Granted again, then the peer goes direct: forgotten at once, nothing more is sent.
        let later = at + Duration::from_secs(61);
        let (due, _) = c.poll(later, &wanted, &mut nonce);
        assert_eq!(due.len(), 1);
        assert_eq!(
            c.on_answer(later, r, to, due[0].nonce, Some(to), &granted(b, 40002)),
            Some(true)
        );
        let (due, changed) = c.poll(
            later + Duration::from_secs(30),
            &BTreeMap::new(),
            &mut nonce,
        );
        assert!(due.is_empty() && changed);
        assert!(c.endpoints().is_empty() && c.views(later).is_empty());
    }

    #[test]
    fn a_refusal_is_retried_later_and_a_new_relay_starts_over() {
        let (b, r, r2) = (key(2), key(3), key(4));
        let to: SocketAddr = "198.51.100.1:51821".parse().unwrap();
        let to2: SocketAddr = "198.51.100.2:51821".parse().unwrap();
        let mut c = Client::default();
        let mut n = 0u64;
        let mut nonce = || {
            n += 1;
            n
        };
        let t = Instant::now();
        let wanted = BTreeMap::from([(b, (r, to))]);
        let (due, _) = c.poll(t, &wanted, &mut nonce);
        let no = Alloc {
            other: b,
            result: AllocResult::NotRelay,
            port: 0,
            lifetime_s: 0,
        };
        assert_eq!(
            c.on_answer(t, r, to, due[0].nonce, Some(to), &no),
            Some(false)
        );
        assert_eq!(c.views(t)[0].refused, Some(AllocResult::NotRelay));
        assert!(c.poll(t + RETRY, &wanted, &mut nonce).0.is_empty());
        assert_eq!(c.poll(t + REFUSED_RETRY, &wanted, &mut nonce).0.len(), 1);
        // Granted by r, then the plan picks r2: r's endpoint goes, r2 is asked at once.
        let at = t + REFUSED_RETRY;
        let (due, _) = c.poll(at + RETRY, &wanted, &mut nonce);
        assert_eq!(
            c.on_answer(at, r, to, due[0].nonce, Some(to), &granted(b, 7)),
            Some(true)
        );
        let moved = BTreeMap::from([(b, (r2, to2))]);
        let (due, changed) = c.poll(at + RETRY, &moved, &mut nonce);
        assert!(changed);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].relay, due[0].to), (r2, to2));
        assert!(c.endpoints().is_empty());
    }
}

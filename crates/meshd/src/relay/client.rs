//! The relayed node's side of an allocation, pure: which requests to send to which relay and when, which
//! grants to take, and the endpoint each relayed peer gets (the relay's address at the granted port).
//!
//! A node asks its relay for each peer the plan relays ([`crate::plan::relays`]), again every
//! [`RETRY`] until an answer comes, then refreshes at a third of the granted lifetime while the peer is
//! still relayed through that relay; a refusal is retried after [`REFUSED_RETRY`]. A peer that goes
//! direct (or moves to another relay) is forgotten at once: no more refreshes, and the relay lets the
//! allocation expire. A grant counts only as the answer to a request still outstanding: from the address
//! the request went to, echoing it as the target, from the relay it was sent to, for the pair asked.
//!
//! **The relayed path is probed end to end, through the relay.** Once granted, the node pings its peer
//! every [`PATH_EVERY`] at the granted relay port, from its probe socket: the relay forwards probe-shaped
//! datagrams to the other party's probe socket ([`crate::relay`]), whose responder answers as to any
//! ping; the pong comes back through the relay, MAC'd with the pair's key (the relay cannot forge one).
//! A pong counts only for a ping still outstanding, from the relay port it went to, echoing it as the
//! target. The path is alive after one pong and dead after [`PATH_DEAD_AFTER`] pings in a row without one
//! within [`PATH_TIMEOUT`] (about 2-2.5 s after the relay stops forwarding). A dead path's peer has no
//! relayed endpoint ([`Client::endpoints`]): it is down (its routes go under `allowDownPeerBypass`). A
//! relay whose path *was alive* and died is excluded for the pair ([`Client::excluded`]) for at least
//! [`FAILED_HOLD`], and after that for as long as the pair is relayed alive through another relay: both
//! parties see the path die within a probe interval of each other, so both move to the next relay of the
//! ranking (or report the peer down when there is none) and stay there; a path that never answered
//! (the other party not there yet) excludes nothing and keeps being probed.
//!
//! **The probes are not enough: WireGuard must get through too.** A relay can tell the probes from the
//! WireGuard datagrams by their size, forward the first and drop the second: the path looks alive and
//! carries nothing. So an alive relayed path must also carry the pair's WireGuard handshakes, which only
//! the two parties can complete: a first one within [`FIRST_HANDSHAKE_WITHIN`] of the path coming alive
//! (unless an earlier session, established directly or through another relay, is still valid), and none
//! older than [`HANDSHAKE_STALE`] after that (an idle session is renewed within 205 s, a busy one
//! within 2 minutes; a session is unusable after 3). And a session already running when the relay starts
//! dropping is not left to run out: every peer sends persistent keepalives (25 s), so WireGuard receiving
//! nothing from the peer for [`RECEIVE_SILENT`] while the probes answer means its datagrams do not get
//! through. A path that fails either is
//! [`PathState::NoHandshake`]: its peer is down, and the relay is excluded for the pair for
//! [`NO_HANDSHAKE_HOLD`] (it answers probes, so it would be taken again at once). The verdict does not
//! say who dropped the handshakes: a peer whose WireGuard does not know us fails it too, and is down
//! either way.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hybridnet_config::PublicKey;

use crate::probe::{Alloc, AllocResult};

/// A request without an answer is sent again after this long.
pub const RETRY: Duration = Duration::from_secs(1);
/// A refused request is sent again after this long.
pub const REFUSED_RETRY: Duration = Duration::from_secs(5);
/// A granted relayed path is pinged this often.
pub const PATH_EVERY: Duration = Duration::from_millis(500);
/// A ping of the relayed path without a pong this long is missed.
pub const PATH_TIMEOUT: Duration = Duration::from_secs(1);
/// This many missed pings in a row: the relayed path is dead.
pub const PATH_DEAD_AFTER: u32 = 3;
/// A relay whose relayed path died is excluded for the pair at least this long.
pub const FAILED_HOLD: Duration = Duration::from_secs(30);
/// An alive relayed path with no WireGuard handshake this long after it came alive (and no earlier
/// session still valid) carries nothing: WireGuard initiates at once (the endpoint change sends a
/// datagram through the tunnel) and retries every 5 s.
pub const FIRST_HANDSHAKE_WITHIN: Duration = Duration::from_secs(30);
/// A WireGuard session whose last handshake is older than this is not being renewed: a session is
/// rejected after 180 s (`REJECT_AFTER_TIME`). The kernel renews one after 120 s on its initiator's
/// next send, keepalives included (`keep_key_fresh` in `send.c`): at most 145 s with persistent
/// keepalives (25 s). boringtun renews only on data (`update_timers` in `noise/timers.rs` skips
/// keepalives), so an idle session expires at 180 s and the next keepalive starts a new one: at most
/// 205 s. The rest is margin for the handshake's own retries (5 s each).
pub const HANDSHAKE_STALE: Duration = Duration::from_secs(240);
/// An alive relayed path over which WireGuard has received nothing from the peer for this long (counted
/// from when it came alive, or from the last receipt if later) carries nothing. Every peer sends
/// persistent keepalives every 25 s, so a working session is heard at least that often (both backends
/// count a received keepalive: the kernel does, boringtun with our patch, vendor/boringtun); the longest
/// silence is boringtun's idle renewal: the session expires at 180 s, and the next keepalive tick (at
/// most 25 s later) starts a new one, so up to 50 s between the last keepalive of the old session and the
/// first datagram of the new. The rest is margin for a lost handshake's retry (5 s) and the readings.
pub const RECEIVE_SILENT: Duration = Duration::from_secs(75);
/// A relay whose path answered probes but carried no handshake is excluded for the pair this long.
pub const NO_HANDSHAKE_HOLD: Duration = Duration::from_secs(300);

/// What the probes of a relayed path say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathState {
    /// No pong yet.
    Unknown,
    Alive,
    /// The probes went unanswered.
    Dead,
    /// The probes answer but no WireGuard handshake gets through (see the module's docs).
    NoHandshake,
}

impl PathState {
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Unknown => "unknown",
            PathState::Alive => "alive",
            PathState::Dead => "dead",
            PathState::NoHandshake => "no-handshake",
        }
    }

    /// The path carries nothing: the peer has no relayed endpoint.
    pub fn is_dead(self) -> bool {
        matches!(self, PathState::Dead | PathState::NoHandshake)
    }
}

/// A ping of a relayed path to send: to `peer`, at the relay port `to` (its target).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathPing {
    pub peer: PublicKey,
    pub to: SocketAddr,
    pub nonce: u64,
}

/// The probes of one granted relayed path.
#[derive(Clone, Debug)]
struct PathProbe {
    state: PathState,
    /// Pings without a pong yet, oldest first.
    outstanding: VecDeque<(u64, Instant)>,
    missed: u32,
    next: Instant,
    rtt: Option<Duration>,
    /// When it last came alive (the handshake deadlines count from there); `Some` once it has been
    /// alive, when a death excludes the relay for the pair.
    alive_since: Option<Instant>,
}

impl PathProbe {
    fn new(now: Instant) -> PathProbe {
        PathProbe {
            state: PathState::Unknown,
            outstanding: VecDeque::new(),
            missed: 0,
            next: now,
            rtt: None,
            alive_since: None,
        }
    }
}

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
    /// The relayed path's probes (while granted).
    path: PathProbe,
}

/// The allocations this node holds (or asks for) on relays, per relayed peer.
#[derive(Debug, Default)]
pub struct Client {
    held: BTreeMap<PublicKey, Held>,
    outstanding: HashMap<u64, (Request, Instant)>,
    /// (peer, relay) whose relayed path died: until when it is excluded at least, and how it died
    /// ([`PathState::Dead`] or [`PathState::NoHandshake`]).
    failed: BTreeMap<(PublicKey, PublicKey), (Instant, PathState)>,
}

/// A relayed path that failed ([`Client::probe_paths`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    pub peer: PublicKey,
    pub relay: PublicKey,
    /// [`PathState::Dead`] or [`PathState::NoHandshake`].
    pub reason: PathState,
    /// Which rule failed it, for the log.
    pub why: &'static str,
}

/// What WireGuard says of a peer (read from the device's counters): when it last completed a handshake
/// (if it has a session) and when it last received anything from it (`None`: unknown, no readings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heard {
    pub last_handshake: Option<Instant>,
    pub last_received: Option<Instant>,
}

/// Why an alive relayed path carries no WireGuard, if it does not (see the module docs): the first of
/// the deadlines that `now` has passed.
fn carries_nothing(since: Instant, heard: Heard, now: Instant) -> Option<&'static str> {
    let first = since + FIRST_HANDSHAKE_WITHIN;
    match heard.last_handshake {
        None if now >= first => return Some("no WireGuard handshake since the path came alive"),
        Some(at) if now >= first.max(at + HANDSHAKE_STALE) => {
            return Some("the last WireGuard handshake is too old (not renewed through the relay)");
        }
        _ => {}
    }
    let received = heard.last_received?;
    (now >= since.max(received) + RECEIVE_SILENT)
        .then_some("WireGuard has received nothing from the peer through the relay")
}

/// A relay passed over for a peer, as `meshd status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exclusion {
    pub peer: PublicKey,
    pub relay: PublicKey,
    /// How its relayed path died.
    pub reason: PathState,
    /// How long the hold lasts still (zero: held only while the pair is relayed alive elsewhere).
    pub left: Duration,
}

/// A relayed peer's allocation as `meshd status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub peer: PublicKey,
    pub relay: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub expires_in: Option<Duration>,
    pub refused: Option<AllocResult>,
    /// What the probes through the relay say.
    pub path: PathState,
    pub rtt: Option<Duration>,
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
                path: PathProbe::new(now),
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
            let endpoint = SocketAddr::new(request.to.ip(), alloc.port);
            if h.endpoint != Some(endpoint) {
                h.path = PathProbe::new(now);
            }
            h.endpoint = Some(endpoint);
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

    /// Each relayed peer with a grant whose relayed path is not dead: its relay and the endpoint to use
    /// (the relay's address, the granted port).
    pub fn endpoints(&self) -> BTreeMap<PublicKey, (PublicKey, SocketAddr)> {
        self.held
            .iter()
            .filter(|(_, h)| !h.path.state.is_dead())
            .filter_map(|(peer, h)| h.endpoint.map(|e| (*peer, (h.relay, e))))
            .collect()
    }

    /// Whether `peer` is relayed (or asked for), or its relayed path died lately: its liveness is the
    /// relayed path's, not the WireGuard traffic that came through a relay.
    pub fn involved(&self, peer: &PublicKey) -> bool {
        self.held.contains_key(peer) || self.failed.keys().any(|(p, _)| p == peer)
    }

    /// The relayed path's state for `peer` (`None`: not granted).
    pub fn path_state(&self, peer: &PublicKey) -> Option<PathState> {
        let h = self.held.get(peer)?;
        h.endpoint.map(|_| h.path.state)
    }

    /// The relays excluded per peer: their relayed path died less than [`FAILED_HOLD`] ago (carried no
    /// handshake less than [`NO_HANDSHAKE_HOLD`] ago), or since then the pair has been relayed alive
    /// through another relay (it stays there).
    pub fn excluded(&self, now: Instant) -> BTreeMap<PublicKey, BTreeSet<PublicKey>> {
        let mut out: BTreeMap<PublicKey, BTreeSet<PublicKey>> = BTreeMap::new();
        for x in self.exclusions(now) {
            out.entry(x.peer).or_default().insert(x.relay);
        }
        out
    }

    /// The relays excluded per peer ([`Client::excluded`]), with why and for how long.
    pub fn exclusions(&self, now: Instant) -> Vec<Exclusion> {
        self.failed
            .iter()
            .filter(|((peer, relay), (until, _))| now < *until || self.elsewhere(peer, relay))
            .map(|((peer, relay), (until, reason))| Exclusion {
                peer: *peer,
                relay: *relay,
                reason: *reason,
                left: until.saturating_duration_since(now),
            })
            .collect()
    }

    /// Whether `peer` is relayed alive through a relay other than `relay`.
    fn elsewhere(&self, peer: &PublicKey, relay: &PublicKey) -> bool {
        self.held
            .get(peer)
            .is_some_and(|h| h.relay != *relay && h.path.state == PathState::Alive)
    }

    /// The pings of relayed paths due now, and the paths that failed now (each once, as it fails: its
    /// peer's endpoint and state change with it). Missed pings are counted here, and WireGuard's
    /// deadlines checked against what `heard` says of each peer.
    pub fn probe_paths(
        &mut self,
        now: Instant,
        heard: impl Fn(&PublicKey) -> Heard,
        mut nonce: impl FnMut() -> u64,
    ) -> (Vec<PathPing>, Vec<Failed>) {
        let mut failed = Vec::new();
        let mut due = Vec::new();
        for (peer, h) in &mut self.held {
            let Some(to) = h.endpoint else {
                continue;
            };
            let p = &mut h.path;
            while p
                .outstanding
                .front()
                .is_some_and(|(_, sent)| now.saturating_duration_since(*sent) >= PATH_TIMEOUT)
            {
                p.outstanding.pop_front();
                p.missed += 1;
            }
            if p.missed >= PATH_DEAD_AFTER && !p.state.is_dead() {
                p.state = PathState::Dead;
                failed.push(Failed {
                    peer: *peer,
                    relay: h.relay,
                    reason: PathState::Dead,
                    why: "no pongs through the relay",
                });
                if p.alive_since.is_some() {
                    self.failed
                        .insert((*peer, h.relay), (now + FAILED_HOLD, PathState::Dead));
                }
            }
            if let (PathState::Alive, Some(since)) = (p.state, p.alive_since)
                && let Some(why) = carries_nothing(since, heard(peer), now)
            {
                p.state = PathState::NoHandshake;
                failed.push(Failed {
                    peer: *peer,
                    relay: h.relay,
                    reason: PathState::NoHandshake,
                    why,
                });
                self.failed.insert(
                    (*peer, h.relay),
                    (now + NO_HANDSHAKE_HOLD, PathState::NoHandshake),
                );
            }
            if now >= p.next {
                let n = nonce();
                p.outstanding.push_back((n, now));
                // Bounded: pings older than the timeout are gone above.
                p.next = now + PATH_EVERY;
                due.push(PathPing {
                    peer: *peer,
                    to,
                    nonce: n,
                });
            }
        }
        // Exclusions no longer in force are forgotten.
        let over: Vec<_> = self
            .failed
            .iter()
            .filter(|((peer, relay), (until, _))| now >= *until && !self.elsewhere(peer, relay))
            .map(|(k, _)| *k)
            .collect();
        for k in over {
            self.failed.remove(&k);
        }
        (due, failed)
    }

    /// A pong (MAC checked) from `peer`, answering `nonce`, that came from `from` echoing `target`.
    /// `None` when it answers no ping of a relayed path; else whether the path's state changed.
    pub fn on_pong(
        &mut self,
        at: Instant,
        peer: PublicKey,
        from: SocketAddr,
        nonce: u64,
        target: Option<SocketAddr>,
    ) -> Option<bool> {
        let h = self.held.get_mut(&peer)?;
        let to = h.endpoint?;
        let p = &mut h.path;
        let i = p.outstanding.iter().position(|(n, _)| *n == nonce)?;
        if from != to || target != Some(to) {
            return None;
        }
        let (_, sent) = p.outstanding.remove(i)?;
        p.rtt = Some(at.saturating_duration_since(sent));
        p.missed = 0;
        if p.state == PathState::NoHandshake {
            // Its probes answer; its WireGuard did not: it stays down until the pair leaves it.
            return Some(false);
        }
        let changed = p.state != PathState::Alive;
        if changed {
            p.alive_since = Some(at);
        }
        p.state = PathState::Alive;
        Some(changed)
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
                path: h.path.state,
                rtt: h.path.rtt,
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

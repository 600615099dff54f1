//! Relay allocations for end-to-end encrypted relaying (issue 13 item 3), the pure core: what a relay
//! node grants and what it forwards. [`crate::forwarder`] runs it on sockets (requests arrive over the
//! probe protocol, [`crate::responder`]); [`client`] is the relayed node's side.
//!
//! The design, TURN-like (RFC 8656) without TURN's wire format: two nodes `A` and `B` that no direct
//! path joins each ask the relay `R`, over the authenticated probe protocol, for an allocation for the
//! pair. `R` gives each side a port of its own (`A` sends to `R:pa`, `B` to `R:pb`), and forwards a
//! datagram that arrives on one side's port to the other side's address, out of the other side's port,
//! so both keep their WireGuard session with each other (endpoint `R:pa` on `A`, `R:pb` on `B`) and `R`
//! only ever sees ciphertext. The table enforces:
//! - **Consent of both parties.** A pair forwards only once both have asked (each request is
//!   authenticated with the requester's key): a relay asked by `A` to forward to a third party `C` that
//!   never asked forwards nothing, and neither does it to a key it does not know.
//! - **Only the parties.** A side's datagrams are taken only from the IP address its request came from
//!   (a symmetric NAT keeps the address and changes the port): the first datagram from there fixes the
//!   port; another port of that address is taken only with a WireGuard handshake initiation (a NAT
//!   rebinding); anything else is dropped. Only datagrams shaped like WireGuard messages pass, and the
//!   parties' probes of the relayed path (version-3 pings and pongs, MAC'd end to end with the pair's
//!   key, which the relay does not have): a probe-shaped datagram is forwarded to the other side's probe
//!   socket (its address learnt the same way, from the side's own probes; another port only with a ping),
//!   so each party probes the relayed path end to end, through the relay, and sees it die when the relay
//!   stops forwarding.
//! - **A lifetime.** An allocation lasts [`LIFETIME`] after the last request of each side (both refresh
//!   it while they need it); an expired one forwards nothing and is removed.
//! - **A budget.** Each allocation has a byte and a packet rate (token buckets, [`BYTES_PER_SEC`],
//!   [`PACKETS_PER_SEC`]), and each requester at most [`MAX_PER_NODE`] allocations, so one node cannot
//!   make the relay carry unbounded traffic or hold unbounded ports.

pub mod client;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hybridnet_config::PublicKey;

use crate::bucket::Bucket;

/// An allocation expires this long after a side's last request.
pub const LIFETIME: Duration = Duration::from_secs(60);
/// Forwarded bytes per second per allocation (both directions), with one second's burst.
pub const BYTES_PER_SEC: f64 = 50e6;
/// Forwarded datagrams per second per allocation, with one second's burst.
pub const PACKETS_PER_SEC: f64 = 50_000.0;
/// Allocations one node may hold on a relay.
pub const MAX_PER_NODE: usize = 64;

/// A pair of nodes, in key order (the same allocation whoever asks first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pair(pub PublicKey, pub PublicKey);

impl Pair {
    pub fn new(a: PublicKey, b: PublicKey) -> Pair {
        if a.0 <= b.0 { Pair(a, b) } else { Pair(b, a) }
    }

    /// 0 for the first key, 1 for the second.
    fn side(&self, key: &PublicKey) -> Option<usize> {
        if *key == self.0 {
            Some(0)
        } else if *key == self.1 {
            Some(1)
        } else {
            None
        }
    }
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A node asked to be relayed to itself.
    SelfPair,
    /// The other party is no node this relay knows.
    UnknownParty,
    /// The requester holds [`MAX_PER_NODE`] allocations already.
    TooMany,
    /// No relay port could be opened.
    NoPorts,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::SelfPair => "self",
            Refused::UnknownParty => "unknown-party",
            Refused::TooMany => "too-many",
            Refused::NoPorts => "no-ports",
        }
    }
}

/// Why a datagram is not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// No allocation on that port.
    NoAllocation,
    /// The allocation expired.
    Expired,
    /// The other party has not asked (yet): no consent, nothing forwarded.
    NoConsent,
    /// Not from the address the side's request came from.
    Stranger,
    /// Not shaped like a WireGuard message (nor like a probe of the relayed path).
    NotWireGuard,
    /// The other side has sent nothing yet: its address (port) is unknown.
    OtherSideUnknown,
    /// Over the allocation's byte or packet budget.
    OverBudget,
}

impl Dropped {
    /// Every reason, for series that exist from the start.
    pub const ALL: [Dropped; 7] = [
        Dropped::NoAllocation,
        Dropped::Expired,
        Dropped::NoConsent,
        Dropped::Stranger,
        Dropped::NotWireGuard,
        Dropped::OtherSideUnknown,
        Dropped::OverBudget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::NoAllocation => "no-allocation",
            Dropped::Expired => "expired",
            Dropped::NoConsent => "no-consent",
            Dropped::Stranger => "stranger",
            Dropped::NotWireGuard => "not-wireguard",
            Dropped::OtherSideUnknown => "other-side-unknown",
            Dropped::OverBudget => "over-budget",
        }
    }
}

/// A grant: the relay port of the requesting side (the forwarder binds one UDP port per side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub port: u16,
    pub expires: Instant,
}

#[derive(Clone, Debug)]
struct Side {
    port: u16,
    /// Where its request came from; `None` until it asked.
    ip: Option<IpAddr>,
    /// The address its WireGuard datagrams come from (fixed by the first one).
    addr: Option<SocketAddr>,
    /// The address its probes of the relayed path come from (its probe socket: another NAT mapping).
    probe_addr: Option<SocketAddr>,
    expires: Instant,
}

#[derive(Clone, Debug)]
struct Allocation {
    sides: [Side; 2],
    bytes: Bucket,
    packets: Bucket,
}

/// Where to send a forwarded datagram: out of `from_port` (the other side's relay port) to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub from_port: u16,
    pub to: SocketAddr,
}

/// The relay's allocations.
#[derive(Debug, Default)]
pub struct Allocations {
    pairs: BTreeMap<Pair, Allocation>,
    /// Relay port → (pair, side).
    ports: BTreeMap<u16, (Pair, usize)>,
}

impl Allocations {
    /// `requester` (authenticated; its request came from `from`) asks to be relayed to `other`. `known`
    /// says whether a key is a node of the mesh; `ports` gives fresh relay ports (two for a new pair; `None`
    /// when it cannot open one: the request is refused, nothing is kept).
    pub fn request(
        &mut self,
        now: Instant,
        requester: PublicKey,
        from: IpAddr,
        other: PublicKey,
        known: impl Fn(&PublicKey) -> bool,
        mut ports: impl FnMut() -> Option<u16>,
    ) -> Result<Grant, Refused> {
        if requester == other {
            return Err(Refused::SelfPair);
        }
        if !known(&other) {
            return Err(Refused::UnknownParty);
        }
        let pair = Pair::new(requester, other);
        let Some(side) = pair.side(&requester) else {
            return Err(Refused::SelfPair);
        };
        if !self.pairs.contains_key(&pair) {
            let held = self
                .pairs
                .iter()
                .filter(|(p, a)| p.side(&requester).is_some_and(|s| a.sides[s].ip.is_some()))
                .count();
            if held >= MAX_PER_NODE {
                return Err(Refused::TooMany);
            }
            let fresh = |port| Side {
                port,
                ip: None,
                addr: None,
                probe_addr: None,
                expires: now,
            };
            let (Some(pa), Some(pb)) = (ports(), ports()) else {
                return Err(Refused::NoPorts);
            };
            self.ports.insert(pa, (pair, 0));
            self.ports.insert(pb, (pair, 1));
            self.pairs.insert(
                pair,
                Allocation {
                    sides: [fresh(pa), fresh(pb)],
                    bytes: Bucket::full(BYTES_PER_SEC, now),
                    packets: Bucket::full(PACKETS_PER_SEC, now),
                },
            );
        }
        let Some(alloc) = self.pairs.get_mut(&pair) else {
            return Err(Refused::UnknownParty);
        };
        let s = &mut alloc.sides[side];
        if s.ip != Some(from) {
            // A new address (the node moved): its datagrams come from there now.
            s.addr = None;
            s.probe_addr = None;
        }
        s.ip = Some(from);
        s.expires = now + LIFETIME;
        Ok(Grant {
            port: s.port,
            expires: s.expires,
        })
    }

    /// A datagram of `len` bytes arrived on relay port `port` from `src`; `bytes` is its start (enough for
    /// [`is_wireguard`]). Where to forward it, or why not.
    pub fn forward(
        &mut self,
        now: Instant,
        port: u16,
        src: SocketAddr,
        bytes: &[u8],
        len: usize,
    ) -> Result<Forward, Dropped> {
        let &(pair, side) = self.ports.get(&port).ok_or(Dropped::NoAllocation)?;
        let alloc = self.pairs.get_mut(&pair).ok_or(Dropped::NoAllocation)?;
        let other = 1 - side;
        let me = &mut alloc.sides[side];
        if me.ip.is_none() {
            return Err(Dropped::NoConsent);
        }
        if me.expires <= now {
            return Err(Dropped::Expired);
        }
        if me.ip != Some(src.ip()) {
            return Err(Dropped::Stranger);
        }
        let shape = is_wireguard(bytes, len)
            .map(Shape::WireGuard)
            .or_else(|| is_probe(bytes, len).map(|ping| Shape::Probe { ping }))
            .ok_or(Dropped::NotWireGuard)?;
        // The side's address is learnt from its own datagrams (from the address its request came from)
        // even before the other side asked: its first handshake then reaches it as soon as the other
        // side's comes, instead of waiting out WireGuard's 5 s handshake retry. WireGuard datagrams and
        // probes come from two sockets (two NAT mappings): each has its address.
        let (mine, rebind) = match shape {
            Shape::WireGuard(kind) => (&mut me.addr, kind == MessageType::Initiation),
            Shape::Probe { ping } => (&mut me.probe_addr, ping),
        };
        match *mine {
            None => *mine = Some(src),
            Some(a) if a == src => {}
            // The same address, another port: a NAT rebinding, taken only with a new handshake (a ping).
            Some(_) if rebind => *mine = Some(src),
            Some(_) => return Err(Dropped::Stranger),
        }
        if alloc.sides[other].ip.is_none() {
            return Err(Dropped::NoConsent);
        }
        if alloc.sides[other].expires <= now {
            return Err(Dropped::Expired);
        }
        let to = match shape {
            Shape::WireGuard(_) => alloc.sides[other].addr,
            Shape::Probe { .. } => alloc.sides[other].probe_addr,
        }
        .ok_or(Dropped::OtherSideUnknown)?;
        if !alloc.packets.take(PACKETS_PER_SEC, 1.0, now)
            || !alloc.bytes.take(BYTES_PER_SEC, len as f64, now)
        {
            return Err(Dropped::OverBudget);
        }
        Ok(Forward {
            from_port: alloc.sides[other].port,
            to,
        })
    }

    /// Removes allocations whose sides have both expired (or one expired and the other never asked);
    /// returns the relay ports freed.
    pub fn expire(&mut self, now: Instant) -> Vec<u16> {
        let gone: Vec<Pair> = self
            .pairs
            .iter()
            .filter(|(_, a)| a.sides.iter().all(|s| s.ip.is_none() || s.expires <= now))
            .map(|(p, _)| *p)
            .collect();
        let mut freed = Vec::new();
        for pair in gone {
            if let Some(a) = self.pairs.remove(&pair) {
                for s in a.sides {
                    self.ports.remove(&s.port);
                    freed.push(s.port);
                }
            }
        }
        freed
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Each allocation: its pair, the two sides' relay ports and the addresses their datagrams come from.
    pub fn list(&self) -> Vec<(Pair, [u16; 2], [Option<SocketAddr>; 2])> {
        self.pairs
            .iter()
            .map(|(p, a)| {
                (
                    *p,
                    [a.sides[0].port, a.sides[1].port],
                    [a.sides[0].addr, a.sides[1].addr],
                )
            })
            .collect()
    }

    /// Every relay port in use.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.keys().copied()
    }
}

/// WireGuard's four message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
    Initiation,
    Response,
    Cookie,
    Data,
}

/// What a relay port forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    WireGuard(MessageType),
    /// A probe of the relayed path (`ping`: a ping, else a pong).
    Probe {
        ping: bool,
    },
}

/// Whether a datagram is shaped like a version-3 ping (`Some(true)`) or pong (`Some(false)`): the
/// parties' probes of the relayed path, MAC'd with their pair key (the relay checks the shape only).
/// `bytes` is the datagram's start (at least 6 bytes), `len` its size.
pub fn is_probe(bytes: &[u8], len: usize) -> Option<bool> {
    if len != crate::probe::LEN || bytes.len() < 6 || !crate::probe::is_v3_header(bytes) {
        return None;
    }
    match bytes[5] {
        1 => Some(true),
        2 => Some(false),
        _ => None,
    }
}

/// How many leading bytes [`Allocations::forward`] looks at.
pub const HEAD: usize = 6;

/// The message type of a datagram shaped like WireGuard (type byte, three zero bytes, the type's size;
/// data: at least a 16-byte header and a 16-byte tag; not a multiple of 16, since the plaintext's padding
/// is optional and boringtun sends none), else `None`. `bytes` is the datagram's start, `len` its size.
pub fn is_wireguard(bytes: &[u8], len: usize) -> Option<MessageType> {
    if bytes.len() < 4 || bytes[1..4] != [0, 0, 0] {
        return None;
    }
    match (bytes[0], len) {
        (1, 148) => Some(MessageType::Initiation),
        (2, 92) => Some(MessageType::Response),
        (3, 64) => Some(MessageType::Cookie),
        (4, n) if n >= 32 => Some(MessageType::Data),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

//! `topology: location`: which peers are reached natively, directly over WireGuard, or through a gateway.
//! Pure: no sockets, no clock; [`plan`] depends only on the configuration (locations, endpoints, pins),
//! [`layout`] adds what the probes say (peer states, active endpoints).
//!
//! **Locations.** A node without a location is a location of its own. In each location the *gateway
//! candidates* are the nodes pinned `always`, plus the `auto` nodes with a public address (an endpoint, or
//! for this node an underlay address, outside RFC 1918, 100.64/10, fc00::/7 and link-local); a location
//! with no candidate at all makes every node not pinned `never` a candidate (a lone home-lab node is its
//! own gateway). Candidates are ordered `always` first, then by public key: every node computes the same
//! order from the same records, without coordination and without names (our own name is not always the
//! one peers use for us).
//!
//! **Plan** (per peer, from the configuration):
//! - same location, with a private endpoint: *native*: no WireGuard peer; its addresses are routed via its
//!   private address; its private endpoints are probed (the probe protocol works over the underlay);
//! - same location, no private endpoint: *direct* (a WireGuard peer, as in `full`);
//! - another location, both of us candidates: *direct*: candidates mesh with every other location's
//!   candidates, so a standby gateway already has its sessions when it takes over;
//! - otherwise *routed*: through a gateway, never probed.
//!
//! **Layout** (from the plan and liveness): the *active gateway* of a location is its first candidate
//! that is up (this node counts as up in its own location); failing that the first one not known to be
//! down (start-up); a candidate that says (in its pongs) it reaches no other location is passed over
//! while another one does. A candidate's WireGuard peer for a remote active gateway carries, besides that
//! gateway's own addresses, the addresses of that location's routed (non-candidate) nodes; a non-candidate
//! routes every other location's addresses via its own location's active gateway. A gateway dying moves
//! those AllowedIPs to the next candidate in place (one peer update each) and each route by one netlink
//! replace: nothing is renumbered, no other peer is touched.
//!
//! **Relays** ([`relays`]): a direct peer no direct path reaches (two NATed gateways) goes through a
//! relay, end to end; in the layout it is as up as its relayed path (granted, not dead:
//! [`Live::relay_up`]), so a remote gateway reached through a relay holds its location and carries its
//! routed nodes' AllowedIPs on its own WireGuard peer (never on the relay's).
//!
//! Routes via a next hop need the next hop's family: an IPv4 private address carries the IPv4 mesh and
//! allowed addresses; the ULA /128s of native and gateway-routed peers need IPv6 private addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use hybridnet_config::PublicKey;
use ipnet::{IpNet, Ipv6Net};

use crate::peer::PeerState;

/// A node's stance on being a gateway (`meshd.gateway` for this node, a static peer's `gateway`).
pub use hybridnet_config::GatewayPin as Pin;

/// Whether `ip` is an address peers in other locations can reach (not private, CGNAT, ULA or link-local).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (s & 0xfe00) == 0xfc00
                || (s & 0xffc0) == 0xfe80)
                && v6
                    .to_ipv4_mapped()
                    .is_none_or(|v4| is_public(IpAddr::V4(v4)))
        }
    }
}

/// A node as the topology sees it.
#[derive(Clone, Debug)]
pub struct Node {
    pub key: PublicKey,
    pub location: Option<String>,
    pub pin: Pin,
    /// A peer's candidate endpoints; for this node, its announced addresses (port irrelevant).
    pub endpoints: Vec<SocketAddr>,
}

impl Node {
    fn location_key(&self) -> String {
        match &self.location {
            Some(l) => l.clone(),
            None => format!("node:{}", self.key),
        }
    }

    fn public(&self) -> bool {
        self.endpoints.iter().any(|e| is_public(e.ip()))
    }

    fn private_endpoints(&self) -> Vec<SocketAddr> {
        self.endpoints
            .iter()
            .copied()
            .filter(|e| !is_public(e.ip()))
            .collect()
    }
}

/// How a peer is reached, by configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Native,
    Direct,
    Routed,
}

/// The plan for one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPlan {
    pub role: Role,
    /// The endpoints its machine probes.
    pub probe: Vec<SocketAddr>,
    /// Its location (`node:<key>` when it has none).
    pub location: String,
    pub candidate: bool,
}

/// The plan for this node and every peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub location: String,
    /// Whether this node is a gateway candidate (it forwards, and meshes with other locations).
    pub candidate: bool,
    pub peers: BTreeMap<PublicKey, PeerPlan>,
    /// Per location, the gateway candidates in order (this node included).
    pub candidates: BTreeMap<String, Vec<PublicKey>>,
}

/// Computes the plan (see the module docs). `me` is this node, `peers` the others.
pub fn plan(me: &Node, peers: &[Node]) -> Plan {
    let all: Vec<&Node> = std::iter::once(me)
        .chain(peers.iter().filter(|p| p.key != me.key))
        .collect();
    let mut by_location: BTreeMap<String, Vec<&Node>> = BTreeMap::new();
    for n in &all {
        by_location.entry(n.location_key()).or_default().push(n);
    }
    let mut candidates = BTreeMap::new();
    for (loc, nodes) in &by_location {
        let mut c: Vec<&&Node> = nodes
            .iter()
            .filter(|n| n.pin == Pin::Always || (n.pin == Pin::Auto && n.public()))
            .collect();
        if c.is_empty() {
            c = nodes.iter().filter(|n| n.pin != Pin::Never).collect();
        }
        c.sort_by_key(|n| (n.pin != Pin::Always, n.key.0));
        candidates.insert(loc.clone(), c.iter().map(|n| n.key).collect::<Vec<_>>());
    }
    let is_candidate = |n: &Node| {
        candidates
            .get(&n.location_key())
            .is_some_and(|c| c.contains(&n.key))
    };
    let my_loc = me.location_key();
    let me_candidate = is_candidate(me);
    let mut out = BTreeMap::new();
    for p in all.iter().skip(1) {
        let loc = p.location_key();
        let candidate = is_candidate(p);
        let private = p.private_endpoints();
        let (role, probe) = if loc == my_loc {
            if private.is_empty() {
                (Role::Direct, p.endpoints.clone())
            } else {
                (Role::Native, private)
            }
        } else if me_candidate && candidate {
            (Role::Direct, p.endpoints.clone())
        } else {
            (Role::Routed, Vec::new())
        };
        out.insert(
            p.key,
            PeerPlan {
                role,
                probe,
                location: loc,
                candidate,
            },
        );
    }
    Plan {
        location: my_loc,
        candidate: me_candidate,
        peers: out,
        candidates,
    }
}

/// What the probes say about one peer, and its addresses.
#[derive(Clone, Debug)]
pub struct Live<'a> {
    pub state: PeerState,
    pub active: Option<SocketAddr>,
    /// Its mesh /128 and allowed IPs.
    pub allowed: &'a BTreeSet<IpNet>,
    /// A candidate of our location that says it reaches no other location (its pongs' `NO_UPLINK`).
    pub no_uplink: bool,
    /// A direct peer relayed now: its relay ([`relays`]).
    pub relay: Option<PublicKey>,
    /// Its relay granted the allocation and the relayed path is not dead: it is reachable (up).
    pub relay_up: bool,
}

/// How a peer is reached now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// Routed via its private address, no WireGuard.
    Native { via: IpAddr },
    /// Its own WireGuard peer.
    Direct,
    /// Through a gateway (`None`: its location has no gateway alive).
    Gateway { via: Option<PublicKey> },
    /// Through a public relay node, while no direct path works.
    Relayed { via: PublicKey },
}

impl PathKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            PathKind::Native { .. } => "native",
            PathKind::Direct => "direct",
            PathKind::Gateway { .. } => "gateway",
            PathKind::Relayed { .. } => "relayed",
        }
    }
}

/// A route in meshd's table: via the mesh interface, or via a next hop (with a preferred source).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    Mesh,
    Via {
        gateway: IpAddr,
        src: Option<IpAddr>,
    },
}

/// What the device and the routing table should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub paths: BTreeMap<PublicKey, PathKind>,
    /// The WireGuard peers and their AllowedIPs.
    pub wireguard: BTreeMap<PublicKey, BTreeSet<IpNet>>,
    pub routes: BTreeMap<IpNet, Route>,
    /// The active gateway of every location (`None` when none is usable).
    pub gateways: BTreeMap<String, Option<PublicKey>>,
}

/// This node's mesh addresses (preferred sources for routes via a next hop).
#[derive(Clone, Copy, Debug)]
pub struct Sources {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
}

/// Computes the layout (see the module docs). `live` has an entry for every peer in the plan; `prefix`
/// is the mesh /64 (always routed through the mesh interface), `bypass` withdraws down direct peers'
/// routes.
pub fn layout(
    me: &PublicKey,
    plan: &Plan,
    live: &BTreeMap<PublicKey, Live<'_>>,
    prefix: Ipv6Net,
    sources: Sources,
    bypass: bool,
) -> Layout {
    let mut out = Layout::default();
    out.routes.insert(IpNet::V6(prefix), Route::Mesh);
    // A relayed peer is as up as its relayed path (a remote gateway reached through a relay holds its
    // location like any other).
    let state = |k: &PublicKey| {
        if k == me {
            PeerState::Up
        } else {
            live.get(k).map_or(PeerState::Down, |l| {
                if l.relay_up { PeerState::Up } else { l.state }
            })
        }
    };
    for (loc, cands) in &plan.candidates {
        // A remote location's liveness is known only to candidates (non-candidates do not probe it).
        let known = *loc == plan.location || plan.candidate;
        let no_uplink = |k: &PublicKey| k != me && live.get(k).is_some_and(|l| l.no_uplink);
        let active = if known {
            cands
                .iter()
                .find(|k| state(k) == PeerState::Up && !no_uplink(k))
                .or_else(|| cands.iter().find(|k| state(k) == PeerState::Up))
                .or_else(|| cands.iter().find(|k| state(k) != PeerState::Down))
                .copied()
        } else {
            None
        };
        out.gateways.insert(loc.clone(), active);
    }
    let next_hop = |k: &PublicKey| -> Option<IpAddr> {
        let l = live.get(k)?;
        l.active
            .or_else(|| plan.peers.get(k).and_then(|p| p.probe.first().copied()))
            .map(|a| a.ip())
    };
    let via = |routes: &mut BTreeMap<IpNet, Route>, allowed: &BTreeSet<IpNet>, hop: IpAddr| {
        for net in allowed {
            if net.addr().is_ipv4() != hop.is_ipv4() {
                continue;
            }
            let src = if hop.is_ipv4() {
                sources.v4
            } else {
                sources.v6
            };
            routes.insert(*net, Route::Via { gateway: hop, src });
        }
    };
    let mesh_route = |routes: &mut BTreeMap<IpNet, Route>, allowed: &BTreeSet<IpNet>| {
        for net in allowed {
            if !matches!(net, IpNet::V6(n) if prefix.contains(n)) {
                routes.insert(*net, Route::Mesh);
            }
        }
    };
    let empty = BTreeSet::new();
    for (key, p) in &plan.peers {
        let allowed = live.get(key).map_or(&empty, |l| l.allowed);
        match p.role {
            Role::Native => {
                let Some(hop) = next_hop(key) else {
                    out.paths.insert(*key, PathKind::Gateway { via: None });
                    continue;
                };
                via(&mut out.routes, allowed, hop);
                out.paths.insert(*key, PathKind::Native { via: hop });
            }
            Role::Direct => {
                out.wireguard
                    .entry(*key)
                    .or_default()
                    .extend(allowed.iter().copied());
                if !(bypass && state(key) == PeerState::Down) {
                    mesh_route(&mut out.routes, allowed);
                }
                let path = live
                    .get(key)
                    .and_then(|l| l.relay)
                    .map_or(PathKind::Direct, |via| PathKind::Relayed { via });
                out.paths.insert(*key, path);
            }
            Role::Routed => {
                if plan.candidate {
                    // Through the remote location's active gateway, over WireGuard.
                    let g = out.gateways.get(&p.location).copied().flatten();
                    if let Some(g) = g
                        && plan.peers.get(&g).is_some_and(|gp| gp.role == Role::Direct)
                    {
                        out.wireguard
                            .entry(g)
                            .or_default()
                            .extend(allowed.iter().copied());
                    }
                    // `allowDownPeerBypass`: no gateway of its location is up (none, or a relayed one
                    // whose relayed path is down): its routes go, as a down direct peer's do.
                    if !(bypass && g.is_none_or(|g| state(&g) != PeerState::Up)) {
                        mesh_route(&mut out.routes, allowed);
                    }
                    out.paths.insert(*key, PathKind::Gateway { via: g });
                } else {
                    // Natively to our own location's active gateway.
                    let g = out.gateways.get(&plan.location).copied().flatten();
                    let native =
                        |g: &PublicKey| plan.peers.get(g).is_some_and(|gp| gp.role == Role::Native);
                    if let Some(hop) = g.filter(native).and_then(|g| next_hop(&g)) {
                        via(&mut out.routes, allowed, hop);
                    }
                    out.paths.insert(*key, PathKind::Gateway { via: g });
                }
            }
        }
    }
    out
}

/// What this node's NAT does, from where public peers saw its probes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    /// No public peer has answered yet.
    Unknown,
    /// A public peer saw one of our own addresses: no NAT.
    None,
    /// Seen at a public address with our probe port: the NAT keeps source ports (endpoint-independent
    /// in practice); our WireGuard port is then reachable at the same address, after hole punching.
    Preserving,
    /// One mapping, another port: the WireGuard port's mapping is unknown (not announced).
    Changing,
    /// Different ports for different peers: a new mapping per destination (port-randomising).
    Symmetric,
}

impl NatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NatKind::Unknown => "unknown",
            NatKind::None => "none",
            NatKind::Preserving => "port-preserving",
            NatKind::Changing => "port-changing",
            NatKind::Symmetric => "symmetric",
        }
    }
}

/// [`nat`]'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatView {
    pub kind: NatKind,
    /// Our public (reflexive) addresses as seen by public peers (not our own addresses).
    pub reflexive: Vec<IpAddr>,
}

/// Classifies our NAT from `seen` (where public peers saw our probes come from), our own addresses and
/// our probe port (pure).
pub fn nat(own: &[IpAddr], probe_port: u16, seen: &[SocketAddr]) -> NatView {
    let seen: Vec<&SocketAddr> = seen.iter().filter(|a| is_public(a.ip())).collect();
    let mut reflexive: Vec<IpAddr> = Vec::new();
    for a in &seen {
        if !own.contains(&a.ip()) && !reflexive.contains(&a.ip()) {
            reflexive.push(a.ip());
        }
    }
    let kind = if seen.is_empty() {
        NatKind::Unknown
    } else if seen.iter().any(|a| own.contains(&a.ip())) {
        NatKind::None
    } else if seen.iter().all(|a| a.port() == probe_port) {
        NatKind::Preserving
    } else if seen.iter().all(|a| *a == seen[0]) {
        NatKind::Changing
    } else {
        NatKind::Symmetric
    };
    if kind == NatKind::None {
        reflexive.clear();
    }
    NatView { kind, reflexive }
}

/// One peer as the relay decision sees it.
#[derive(Clone, Copy, Debug)]
pub struct RelayView {
    pub key: PublicKey,
    /// It may relay: it says it has a public address of its own, we reach it on a public address (seen,
    /// not only claimed), and the relay policy (`meshd.relays`) allows it.
    pub candidate: bool,
    pub state: PeerState,
    /// The secret this node shares with the peer (its probe key): seeds the peer's relay ranking. `None`
    /// for a peer that needs no relay (not down).
    pub pair_secret: Option<[u8; 32]>,
}

/// `topology: full`: which peers are relayed, and through whom. A node with a public address of its own
/// never relays (peers behind NATs reach it). Otherwise every peer that is `Down` (all its direct
/// candidates probed, none answering: a symmetric NAT on both sides, a firewall) goes through a relay
/// candidate that is `Up`: the one ranked first for the pair by [`relay_score`], rendezvous hashing keyed
/// by the pair's shared secret, so both ends of a pair pick the same relay from the same candidates,
/// different pairs spread over the candidates, and no node can grind a key that wins every pair (or even
/// one chosen pair: the score is unpredictable without the pair's secret). The direct candidates keep
/// being probed: once one answers, the peer is `Up` and leaves the relay. `excluded(peer, relay)`: a
/// relay whose relayed path for the pair died lately is passed over (both parties saw it die, so both
/// pass it over; see [`crate::relay::client`]).
///
/// `topology: location` relays the same way, among the peers its plan makes *direct* (a gateway
/// candidate and another location's candidates, the pairs of gateways; a peer of our location without a
/// private endpoint): the caller gives a `pair_secret` only to those.
pub fn relays(
    me_public: bool,
    peers: &[RelayView],
    excluded: impl Fn(&PublicKey, &PublicKey) -> bool,
) -> BTreeMap<PublicKey, PublicKey> {
    let mut out = BTreeMap::new();
    if me_public {
        return out;
    }
    for p in peers {
        let Some(secret) = p.pair_secret.filter(|_| p.state == PeerState::Down) else {
            continue;
        };
        let best = peers
            .iter()
            .filter(|r| {
                r.key != p.key
                    && r.candidate
                    && r.state == PeerState::Up
                    && !excluded(&p.key, &r.key)
            })
            .max_by_key(|r| (relay_score(&secret, &r.key), r.key.0));
        if let Some(relay) = best {
            out.insert(p.key, relay.key);
        }
    }
    out
}

/// The rank of `relay` for the pair that shares `secret` (higher wins).
pub fn relay_score(secret: &[u8; 32], relay: &PublicKey) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"hybridnet-meshd-relay-v1");
    h.update(secret);
    h.update(relay.0);
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

//! The pure core of the controller: [`plan`] turns everything meshd knows ([`Inputs`]: the config, the
//! peers from every source with their liveness, NAT and topology facts) into the [`Desired`] state of
//! every resource meshd owns: the WireGuard device and its peers, the link (name, MTU), the addresses on
//! it, the routes in table [`net::ROUTE_TABLE`], the two rules, the nftables table and the sysctls. No
//! sockets, no clock, no kernel: the appliers in [`crate::apply`] diff each resource against what the
//! kernel reports and apply the minimal change.
//!
//! **Identical prefixes.** A prefix that two peers both claim (a reinstalled node whose old record is still
//! inside the discovery service's TTL, a reused pod CIDR) cannot be on two WireGuard peers: the device moves
//! it to whichever peer was configured last, and a diff that wants it on both would move it back and forth
//! on every resync. The plan gives it to one holder, chosen the same way on every resync and every node:
//! a peer that is up beats one that is not, then the lowest public key. The others lose it, and the
//! conflict is reported ([`Desired::conflicts`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hybridnet_config::{PublicKey, RelayMode};
use ipnet::{IpNet, Ipv6Net};

use crate::identity::PrivateKey;
use crate::net;
use crate::peer::PeerState;
use crate::topology::{self, Layout, PathKind, Route};
use crate::wg::{self, PeerConfig};

pub mod trust;

/// WireGuard persistent keepalive on every peer (keeps NAT mappings; KubeSpan uses 25 s too).
pub const KEEPALIVE: u16 = 25;

/// One peer as the plan sees it.
#[derive(Clone, Debug)]
pub struct PeerInput {
    pub key: PublicKey,
    /// Its mesh /128 and its allowed IPs.
    /// Shared with the peer (planning runs at every change: no copy per peer and pass).
    pub allowed_ips: Arc<BTreeSet<IpNet>>,
    /// It has a public address of its own (a relay candidate).
    pub public: bool,
    /// What its probes say.
    pub probe_state: PeerState,
    /// Its state for routes (`allowDownPeerBypass`): the probes, WireGuard traffic or handshakes.
    pub state: PeerState,
    /// The probes' active endpoint (`topology: location`).
    pub active: Option<SocketAddr>,
    /// The endpoint WireGuard should use (`topology: full`: the probes', or the handshake fallback's).
    pub endpoint: Option<SocketAddr>,
    /// Its pongs say it is a gateway candidate without a path to other locations.
    pub no_uplink: bool,
}

/// Everything the desired state depends on.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// Shared with the mesh (never copied per plan).
    pub private_key: std::sync::Arc<PrivateKey>,
    pub interface: String,
    pub mtu: u32,
    pub listen_port: u16,
    /// KubeSpan-compatible mode: the cluster secret as every peer's preshared key.
    pub preshared_key: Option<[u8; 32]>,
    pub prefix: Ipv6Net,
    pub mesh_addr: Ipv6Addr,
    /// `meshd.addresses`.
    pub addresses: Vec<IpNet>,
    /// `allowDownPeerBypass`.
    pub bypass: bool,
    /// `clampMSS`.
    pub clamp_mss: bool,
    /// This node has a public address of its own (it may relay; it is never relayed).
    pub own_public: bool,
    /// `topology: location`: the plan from the config.
    pub topology: Option<topology::Plan>,
    pub peers: Vec<PeerInput>,
    /// `meshd.relay`.
    pub relay: RelayMode,
    /// `meshd.relays`: the only relays allowed (empty: any candidate).
    pub relays_allowed: Vec<PublicKey>,
    /// Relayed peers whose relay granted an allocation: the relay and the endpoint to use (the relay's
    /// address at the granted port; see [`crate::relay::client`]).
    pub relay_grants: BTreeMap<PublicKey, (PublicKey, SocketAddr)>,
    /// Relays passed over per peer: the relayed path through them died lately (see
    /// [`crate::relay::client::Client::excluded`]).
    pub relay_excluded: BTreeMap<PublicKey, BTreeSet<PublicKey>>,
    /// What discovered peers may claim (see [`trust`]).
    pub trust: trust::Trust,
}

/// One of meshd's two policy rules: `not fwmark FWMARK/FWMARK lookup ROUTE_TABLE` at `RULE_PRIORITY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub v6: bool,
    pub table: u32,
    pub priority: u32,
    pub fwmark: u32,
}

/// Two peers (or more) claiming the same prefix, and who holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub prefix: IpNet,
    pub holder: PublicKey,
    pub losers: Vec<PublicKey>,
}

/// The state of every resource meshd owns.
#[derive(Clone, Debug)]
pub struct Desired {
    pub device: wg::Desired,
    pub interface: String,
    pub mtu: u32,
    pub addresses: BTreeSet<IpNet>,
    pub routes: BTreeMap<IpNet, Route>,
    pub rules: Vec<Rule>,
    /// The interface whose forwarded TCP SYNs get their MSS clamped (`None`: no nftables table).
    pub clamp: Option<String>,
    /// IPv4 and IPv6 forwarding on (a gateway candidate or a public relay); see [`crate::sysctl`].
    pub forwarding: bool,
    /// How each peer is reached.
    pub paths: BTreeMap<PublicKey, PathKind>,
    /// `topology: location`: each location's active gateway.
    pub gateways: BTreeMap<String, Option<PublicKey>>,
    pub conflicts: Vec<Conflict>,
    /// Prefixes of discovered peers refused (see [`trust`]); the rest of their records is used.
    pub refused: Vec<trust::Refused>,
}

/// The two rules, IPv4 and IPv6.
pub fn rules() -> Vec<Rule> {
    [false, true]
        .into_iter()
        .map(|v6| Rule {
            v6,
            table: net::ROUTE_TABLE,
            priority: net::RULE_PRIORITY,
            fwmark: net::FWMARK,
        })
        .collect()
}

/// The desired state. Pure.
pub fn plan(inputs: &Inputs) -> Desired {
    let (screened, refused) = screen(inputs);
    let inputs = screened.as_ref().unwrap_or(inputs);
    let relayed = relays(inputs);
    let layout = layout(inputs, &relayed);
    let Shape {
        wireguard,
        routes,
        paths,
        gateways,
    } = match layout {
        Some(l) => Shape {
            wireguard: {
                // One lookup per WireGuard peer, not a search of every peer for each.
                let active: HashMap<PublicKey, Option<SocketAddr>> =
                    inputs.peers.iter().map(|p| (p.key, p.active)).collect();
                l.wireguard
                    .into_iter()
                    .filter_map(|(key, allowed)| {
                        let active = *active.get(&key)?;
                        let endpoint = granted(inputs, &relayed, &key).or(active);
                        Some((key, (endpoint, Arc::new(allowed))))
                    })
                    .collect()
            },
            routes: l.routes,
            paths: l.paths,
            gateways: l.gateways,
        },
        None => full(inputs, &relayed),
    };
    let (wireguard, conflicts) = resolve_identical(wireguard, &inputs.peers);
    let device = wg::Desired {
        private_key: inputs.private_key.clone(),
        listen_port: inputs.listen_port,
        fwmark: net::FWMARK,
        peers: wireguard
            .into_iter()
            .map(|(key, (endpoint, allowed_ips))| {
                let config = PeerConfig {
                    endpoint,
                    allowed_ips,
                    keepalive: Some(KEEPALIVE),
                    preshared_key: inputs.preshared_key,
                };
                (key, config)
            })
            .collect(),
    };
    let mut addresses: BTreeSet<IpNet> = inputs.addresses.iter().copied().collect();
    addresses.insert(IpNet::V6(Ipv6Net::from(inputs.mesh_addr)));
    let forwarding = match &inputs.topology {
        Some(t) => t.candidate,
        None => inputs.own_public,
    };
    Desired {
        device,
        interface: inputs.interface.clone(),
        mtu: inputs.mtu,
        addresses,
        routes,
        rules: rules(),
        clamp: inputs.clamp_mss.then(|| inputs.interface.clone()),
        forwarding,
        paths,
        gateways,
        conflicts,
        refused,
    }
}

/// The inputs with discovered peers' refused prefixes taken out (`None`: nothing refused but what
/// their sources already refused), and every refusal.
fn screen(inputs: &Inputs) -> (Option<Inputs>, Vec<trust::Refused>) {
    let peers: Vec<(PublicKey, &BTreeSet<IpNet>)> = inputs
        .peers
        .iter()
        .map(|p| (p.key, &*p.allowed_ips))
        .collect();
    let (kept, refused) = trust::screen(&inputs.trust, inputs.prefix, inputs.mesh_addr, &peers);
    if kept.is_empty() {
        return (None, refused);
    }
    let mut screened = inputs.clone();
    for p in &mut screened.peers {
        if let Some(k) = kept.get(&p.key) {
            p.allowed_ips = Arc::new(k.clone());
        }
    }
    (Some(screened), refused)
}

/// Each WireGuard peer's endpoint and allowed IPs (shared with its input unless a prefix was taken away:
/// planning clones no peer's set).
type WireGuardPeers = BTreeMap<PublicKey, (Option<SocketAddr>, Arc<BTreeSet<IpNet>>)>;

/// The topology's part of the plan: WireGuard peers (endpoint, allowed IPs), routes, paths, gateways.
struct Shape {
    wireguard: WireGuardPeers,
    routes: BTreeMap<IpNet, Route>,
    paths: BTreeMap<PublicKey, PathKind>,
    gateways: BTreeMap<String, Option<PublicKey>>,
}

/// `topology: full`: every peer is a WireGuard peer with its own allowed IPs. A relayed peer keeps them
/// (end-to-end encrypted relaying: nothing of it goes onto the relay's WireGuard peer); its endpoint is
/// the relay port its relay granted ([`Inputs::relay_grants`]), and until a grant comes, its own.
fn full(inputs: &Inputs, relays: &BTreeMap<PublicKey, PublicKey>) -> Shape {
    let granted = |key: &PublicKey| granted(inputs, relays, key);
    let wireguard = inputs
        .peers
        .iter()
        .map(|p| {
            let endpoint = granted(&p.key).or(p.endpoint);
            (p.key, (endpoint, Arc::clone(&p.allowed_ips)))
        })
        .collect();
    let routes = crate::mesh::routes_for(
        inputs.prefix,
        inputs.peers.iter().map(|p| {
            // A relayed peer is reachable while its relay granted the allocation: its routes stay.
            let state = if granted(&p.key).is_some() {
                PeerState::Up
            } else {
                p.state
            };
            (state, &*p.allowed_ips)
        }),
        inputs.bypass,
    )
    .into_iter()
    .map(|n| (n, Route::Mesh))
    .collect();
    let paths = inputs
        .peers
        .iter()
        .map(|p| {
            let path = relays
                .get(&p.key)
                .map_or(PathKind::Direct, |r| PathKind::Relayed { via: *r });
            (p.key, path)
        })
        .collect();
    Shape {
        wireguard,
        routes,
        paths,
        gateways: BTreeMap::new(),
    }
}

/// The endpoint of a relayed peer whose relay (the plan's) granted an allocation whose relayed path is not
/// dead ([`Inputs::relay_grants`] holds only those): the relay port. `None`: not reachable through a relay.
fn granted(
    inputs: &Inputs,
    relays: &BTreeMap<PublicKey, PublicKey>,
    key: &PublicKey,
) -> Option<SocketAddr> {
    let relay = relays.get(key)?;
    inputs
        .relay_grants
        .get(key)
        .filter(|(r, _)| r == relay)
        .map(|(_, endpoint)| *endpoint)
}

/// The peers relayed now, and their relays. With `relay: never` none (a peer no direct path reaches is
/// down). A relay candidate says it has a public address of its own *and* we reach it on a public
/// address (its active path is alive there), and is in `meshd.relays` when that list is set; a relay
/// whose relayed path died for the pair lately is passed over ([`Inputs::relay_excluded`]).
///
/// `topology: location`: only the peers the topology makes direct WireGuard peers are relayed (a gateway
/// candidate's peers in other locations' candidates, the pairs of gateways; a peer of our location
/// without a private endpoint): native peers are on our LAN, and routed ones go through a gateway, which
/// is relayed in their stead when it must be. A relayed remote gateway holds its location as long as its
/// relayed path is up (see [`topology::layout`]).
pub fn relays(inputs: &Inputs) -> BTreeMap<PublicKey, PublicKey> {
    if inputs.relay == RelayMode::Never || inputs.own_public {
        return BTreeMap::new();
    }
    let candidate = |p: &PeerInput| {
        p.public
            && p.probe_state == PeerState::Up
            && p.active.is_some_and(|a| topology::is_public(a.ip()))
            && (inputs.relays_allowed.is_empty() || inputs.relays_allowed.contains(&p.key))
    };
    if !inputs.peers.iter().any(candidate) {
        return BTreeMap::new();
    }
    let relayable = |key: &PublicKey| {
        inputs.topology.as_ref().is_none_or(|t| {
            t.peers
                .get(key)
                .is_some_and(|p| p.role == topology::Role::Direct)
        })
    };
    let views: Vec<topology::RelayView> = inputs
        .peers
        .iter()
        .map(|p| topology::RelayView {
            key: p.key,
            candidate: candidate(p),
            state: p.probe_state,
            // One X25519 per down peer, only when there is a candidate to rank.
            pair_secret: (p.probe_state == PeerState::Down && relayable(&p.key))
                .then(|| crate::probe::key(&inputs.private_key.shared(&p.key))),
        })
        .collect();
    topology::relays(inputs.own_public, &views, |peer, relay| {
        inputs
            .relay_excluded
            .get(peer)
            .is_some_and(|r| r.contains(relay))
    })
}

/// `topology: location`: the layout for the current liveness (`None` in `topology: full`); `relays`:
/// [`relays`].
pub fn layout(inputs: &Inputs, relays: &BTreeMap<PublicKey, PublicKey>) -> Option<Layout> {
    let plan = inputs.topology.as_ref()?;
    let live = inputs
        .peers
        .iter()
        .map(|p| {
            let live = topology::Live {
                state: p.probe_state,
                active: p.active,
                allowed: &p.allowed_ips,
                no_uplink: p.no_uplink,
                relay: relays.get(&p.key).copied(),
                relay_up: granted(inputs, relays, &p.key).is_some(),
            };
            (p.key, live)
        })
        .collect();
    let v4 = inputs
        .addresses
        .iter()
        .map(IpNet::addr)
        .find(IpAddr::is_ipv4);
    let sources = topology::Sources {
        v4,
        v6: Some(IpAddr::V6(inputs.mesh_addr)),
    };
    let me = inputs.private_key.public();
    Some(topology::layout(
        &me,
        plan,
        &live,
        inputs.prefix,
        sources,
        inputs.bypass,
    ))
}

/// Gives every prefix that more than one WireGuard peer claims to one of them: up before unknown before
/// down, then the lowest key. Returns the peers without the lost prefixes, and the conflicts.
fn resolve_identical(
    mut peers: WireGuardPeers,
    inputs: &[PeerInput],
) -> (WireGuardPeers, Vec<Conflict>) {
    // One sorted list of (prefix, claimant), not a list per prefix: planning runs at every change, over
    // thousands of peers.
    let mut claims: Vec<(IpNet, PublicKey)> = peers
        .iter()
        .flat_map(|(key, (_, allowed))| allowed.iter().map(move |net| (*net, *key)))
        .collect();
    claims.sort_unstable();
    let mut conflicts = Vec::new();
    // The peers' states, only when some prefix has two claimants (rare: not built for every plan).
    let mut states: Option<HashMap<PublicKey, PeerState>> = None;
    for group in claims.chunk_by(|a, b| a.0 == b.0) {
        if group.len() < 2 {
            continue;
        }
        let states =
            states.get_or_insert_with(|| inputs.iter().map(|p| (p.key, p.state)).collect());
        let rank = |k: &PublicKey| match states.get(k) {
            Some(PeerState::Up) => 0,
            Some(PeerState::Unknown) => 1,
            Some(PeerState::Down) | None => 2,
        };
        let prefix = group[0].0;
        let mut keys: Vec<PublicKey> = group.iter().map(|(_, k)| *k).collect();
        keys.sort_by_key(|k| (rank(k), k.0));
        let holder = keys.remove(0);
        for loser in &keys {
            if let Some((_, allowed)) = peers.get_mut(loser) {
                Arc::make_mut(allowed).remove(&prefix);
            }
        }
        conflicts.push(Conflict {
            prefix,
            holder,
            losers: keys,
        });
    }
    (peers, conflicts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

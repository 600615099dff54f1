//! The trust boundary: a discovered peer's record is hostile input. [`screen`] takes every prefix a
//! peer from a discovery source (the Talos discovery service, the Kubernetes registry, the peer cache)
//! announces and refuses those that would take traffic that is not the peer's to take; the rest of the
//! record is used. Static peers are operator config and stay trusted. Pure.
//!
//! A prefix is refused ([`Reason`]) when it is a default route, shorter than `minPrefixLength`,
//! loopback, link-local or multicast, overlaps this node's underlay addresses or their subnets (or its
//! own mesh addresses), overlaps a cluster service subnet, covers an address meshd or apiprism talks to
//! (the discovery service, the API server endpoints), overlaps a static peer's prefix, or lies in the
//! mesh prefix without being the peer's own mesh address. A peer owns the mesh address derived from its
//! key; in KubeSpan-compatible mode (addresses from MACs, announced) the address it announced, unless an
//! earlier peer (or a static one) holds it: a later claim of a held address is refused, so a hostile
//! record cannot take a live node's mesh address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use hybridnet_config::PublicKey;
use ipnet::{IpNet, Ipv6Net};

/// Why a prefix was refused (the `reason` label of `meshd_prefixes_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// `0.0.0.0/0` or `::/0`.
    DefaultRoute,
    /// Shorter than `meshd.trust.minPrefixLength`.
    TooShort,
    Loopback,
    LinkLocal,
    Multicast,
    /// Overlaps this node's underlay addresses or their subnets, or its own mesh addresses.
    Underlay,
    /// Overlaps a cluster service subnet.
    ServiceSubnet,
    /// Covers the address of a discovery service or API server endpoint.
    Endpoint,
    /// Inside the mesh prefix and not the peer's own mesh address (another node's, or a claim of a
    /// held address).
    MeshAddress,
    /// Overlaps a static peer's prefix.
    StaticPeer,
    /// Kubernetes registry: outside the peer's Node `spec.podCIDRs` (or the cluster pod subnets).
    OutsidePodCidrs,
    /// KubeSpan-compatible mode: the peer's own node address, in this node's underlay, not yet proven
    /// (no probe answered and no handshake there): routed once it is.
    Unproven,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::DefaultRoute => "default-route",
            Reason::TooShort => "too-short",
            Reason::Loopback => "loopback",
            Reason::LinkLocal => "link-local",
            Reason::Multicast => "multicast",
            Reason::Underlay => "underlay",
            Reason::ServiceSubnet => "service-subnet",
            Reason::Endpoint => "endpoint",
            Reason::MeshAddress => "mesh-address",
            Reason::StaticPeer => "static-peer",
            Reason::OutsidePodCidrs => "outside-pod-cidrs",
            Reason::Unproven => "unproven-address",
        }
    }
}

/// What this node protects: the same for every peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `meshd.trust.minPrefixLength`: IPv4 and IPv6.
    pub min_v4: u8,
    pub min_v6: u8,
    /// This node's underlay addresses with their subnets, and its own extra mesh addresses.
    pub underlay: Vec<IpNet>,
    pub service_subnets: Vec<IpNet>,
    /// Discovery service and API server endpoint addresses.
    pub endpoints: Vec<IpAddr>,
}

/// One peer's standing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTrust {
    /// A static peer (operator config): nothing is screened.
    pub trusted: bool,
    /// The mesh address the peer uses (derived from its key, or announced in KubeSpan-compatible mode).
    pub mesh_addr: Ipv6Addr,
    /// Order of first sight on this node (earlier wins a contested mesh address).
    pub seniority: u64,
    /// Prefixes its source already refused (the Kubernetes registry's pod CIDR check).
    pub refused: Vec<(IpNet, Reason)>,
    /// Its node addresses as announced (KubeSpan-compatible mode routes them through the mesh).
    pub addresses: Vec<IpAddr>,
    /// Addresses where it proved to hold its key: an endpoint whose probes it answered (MAC under the
    /// X25519 shared secret), or where a WireGuard handshake with it succeeded.
    pub proven: Vec<IpAddr>,
}

/// The trust inputs of a plan. A peer missing from `peers` is trusted (plans built without trust data).
#[derive(Clone, Debug, Default)]
pub struct Trust {
    pub policy: Policy,
    pub peers: BTreeMap<PublicKey, PeerTrust>,
}

/// A refused prefix, and whose.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refused {
    pub peer: PublicKey,
    pub prefix: IpNet,
    pub reason: Reason,
}

/// Whether two prefixes share an address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

const V4_LOOPBACK: &str = "127.0.0.0/8";
const V4_LINK_LOCAL: &str = "169.254.0.0/16";
const V4_MULTICAST: &str = "224.0.0.0/4";
const V6_LOOPBACK: &str = "::1/128";
const V6_LINK_LOCAL: &str = "fe80::/10";
const V6_MULTICAST: &str = "ff00::/8";

/// The special range `prefix` touches (`within`: only one that holds all of it).
fn special(prefix: &IpNet, within: bool) -> Option<Reason> {
    let table = [
        (V4_LOOPBACK, Reason::Loopback),
        (V6_LOOPBACK, Reason::Loopback),
        (V4_LINK_LOCAL, Reason::LinkLocal),
        (V6_LINK_LOCAL, Reason::LinkLocal),
        (V4_MULTICAST, Reason::Multicast),
        (V6_MULTICAST, Reason::Multicast),
    ];
    table.into_iter().find_map(|(net, reason)| {
        let net: IpNet = net.parse().ok()?;
        let hit = if within {
            net.contains(prefix)
        } else {
            overlaps(&net, prefix)
        };
        hit.then_some(reason)
    })
}

/// Why `prefix` of an untrusted peer owning `owned` (its mesh /128, `None` when it owns none) is
/// refused, if it is. `statics`: the static peers' prefixes; `proven`: the peer's proven addresses,
/// which it may have as host routes even inside this node's underlay subnets (KubeSpan-compatible mode
/// routes node addresses through the mesh).
pub fn check(
    policy: &Policy,
    mesh: Ipv6Net,
    owned: Option<Ipv6Addr>,
    statics: &BTreeSet<IpNet>,
    proven: &[IpAddr],
    announced: &[IpAddr],
    prefix: &IpNet,
) -> Option<Reason> {
    let mesh = IpNet::V6(mesh);
    if owned.is_some_and(|o| *prefix == IpNet::V6(Ipv6Net::from(o))) {
        return None;
    }
    if prefix.prefix_len() == 0 {
        return Some(Reason::DefaultRoute);
    }
    if overlaps(&mesh, prefix) {
        return Some(Reason::MeshAddress);
    }
    if let Some(r) = special(prefix, true) {
        return Some(r);
    }
    let min = match prefix {
        IpNet::V4(_) => policy.min_v4,
        IpNet::V6(_) => policy.min_v6,
    };
    if prefix.prefix_len() < min {
        return Some(Reason::TooShort);
    }
    if let Some(r) = special(prefix, false) {
        return Some(r);
    }
    let host = prefix.prefix_len() == prefix.max_prefix_len();
    let is_host = |u: &IpNet| u.prefix_len() == u.max_prefix_len();
    // This node's own addresses (host entries) are never a peer's; a neighbour's in a subnet may be
    // the peer's own node address (KubeSpan routes those), once it proved to be there.
    if policy
        .underlay
        .iter()
        .any(|u| is_host(u) && overlaps(u, prefix))
    {
        return Some(Reason::Underlay);
    }
    if policy.underlay.iter().any(|u| overlaps(u, prefix)) {
        let mine = host && announced.contains(&prefix.addr());
        return match (mine, proven.contains(&prefix.addr())) {
            (true, true) => rest(policy, statics, prefix),
            (true, false) => Some(Reason::Unproven),
            _ => Some(Reason::Underlay),
        };
    }
    rest(policy, statics, prefix)
}

/// The checks after the underlay's.
fn rest(policy: &Policy, statics: &BTreeSet<IpNet>, prefix: &IpNet) -> Option<Reason> {
    if policy.service_subnets.iter().any(|s| overlaps(s, prefix)) {
        return Some(Reason::ServiceSubnet);
    }
    if policy.endpoints.iter().any(|a| prefix.contains(a)) {
        return Some(Reason::Endpoint);
    }
    // A static prefix shorter than the minimum (an operator's default route through an exit peer)
    // does not shadow every discovered prefix; the others are the operator's and stay theirs.
    let held = |s: &&IpNet| match s {
        IpNet::V4(_) => s.prefix_len() >= policy.min_v4,
        IpNet::V6(_) => s.prefix_len() >= policy.min_v6,
    };
    if statics.iter().filter(held).any(|s| overlaps(s, prefix)) {
        return Some(Reason::StaticPeer);
    }
    None
}

/// The mesh address each untrusted peer owns: its own, inside the mesh prefix, not this node's and not
/// held by a trusted peer or a senior one (first seen on this node; then the lowest key).
pub fn owners(
    trust: &Trust,
    mesh: Ipv6Net,
    own: Ipv6Addr,
) -> BTreeMap<PublicKey, Option<Ipv6Addr>> {
    // One sorted list, not a list per address: planning runs at every change, over thousands of peers.
    let mut claims: Vec<(Ipv6Addr, bool, u64, &PublicKey)> = trust
        .peers
        .iter()
        .map(|(k, t)| (t.mesh_addr, !t.trusted, t.seniority, k))
        .collect();
    claims.sort_unstable_by_key(|(addr, untrusted, seniority, k)| {
        (*addr, *untrusted, *seniority, k.0)
    });
    let mut out = BTreeMap::new();
    for claimants in claims.chunk_by(|a, b| a.0 == b.0) {
        let addr = claimants[0].0;
        let usable = mesh.contains(&addr) && addr != own;
        for (i, (_, _, _, k)) in claimants.iter().enumerate() {
            out.insert(**k, (usable && i == 0).then_some(addr));
        }
    }
    out
}

/// Splits each untrusted peer's allowed IPs into what is used and what is refused. Returns the peers'
/// screened sets (only for peers that lost something) and every refusal, sorted.
pub fn screen(
    trust: &Trust,
    mesh: Ipv6Net,
    own: Ipv6Addr,
    peers: &[(PublicKey, &BTreeSet<IpNet>)],
) -> (BTreeMap<PublicKey, BTreeSet<IpNet>>, Vec<Refused>) {
    // Only untrusted (discovered) peers are screened: without any, there is nothing to compute.
    if trust.peers.values().all(|t| t.trusted) {
        return (BTreeMap::new(), Vec::new());
    }
    let statics: BTreeSet<IpNet> = peers
        .iter()
        .filter(|(k, _)| trust.peers.get(k).is_none_or(|t| t.trusted))
        .flat_map(|(_, a)| a.iter().copied())
        .collect();
    let owners = owners(trust, mesh, own);
    let mut kept = BTreeMap::new();
    let mut refused = Vec::new();
    for (key, allowed) in peers {
        let Some(t) = trust.peers.get(key).filter(|t| !t.trusted) else {
            continue;
        };
        for (prefix, reason) in &t.refused {
            refused.push(Refused {
                peer: *key,
                prefix: *prefix,
                reason: *reason,
            });
        }
        let owned = owners.get(key).copied().flatten();
        let claimed = IpNet::V6(Ipv6Net::from(t.mesh_addr));
        let mut keep = BTreeSet::new();
        for prefix in *allowed {
            // Its mesh address, when it does not own it (held by another, outside the mesh prefix).
            let unowned = (*prefix == claimed && owned.is_none()).then_some(Reason::MeshAddress);
            let verdict = unowned.or_else(|| {
                check(
                    &trust.policy,
                    mesh,
                    owned,
                    &statics,
                    &t.proven,
                    &t.addresses,
                    prefix,
                )
            });
            match verdict {
                None => {
                    keep.insert(*prefix);
                }
                Some(reason) => refused.push(Refused {
                    peer: *key,
                    prefix: *prefix,
                    reason,
                }),
            }
        }
        if keep.len() != allowed.len() {
            kept.insert(*key, keep);
        }
    }
    refused.sort();
    refused.dedup();
    (kept, refused)
}

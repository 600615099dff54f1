//! KubeSpan-compatible mode (`meshd.kubespanCompat: true`): the rules a Talos node applies, reproduced so
//! that a plain Linux node running meshd looks like one more KubeSpan node. Pure; the driver is `mesh`.
//!
//! - [`eui64`] and [`first_physical_mac`]: the node address, as Talos's `UpdateAddress`/`wgEUI64`
//!   (`adapters/kubespan/identity.go`) and `HardwareAddrController` (`controllers/network/hardware_addr.go`)
//!   compute it: the modified EUI-64 of the first physical link's MAC (links sorted by name, type ether, no
//!   link kind) inside the cluster's ULA /64.
//! - [`allowed_ips`] and [`resolve_overlaps`]: a peer's AllowedIPs as `PeerSpecController`
//!   (`controllers/kubespan/peer_spec.go`) builds them: `AdditionalAddresses ∪ Addresses (/32, /128) −
//!   ExcludeAdvertisedNetworks ∪ {KubeSpan address /128}`, then, peer after peer in node ID order, minus
//!   what earlier peers already hold.
//! - [`Handshake`]: KubeSpan's peer state from WireGuard handshakes (`adapters/kubespan/peer_status.go`),
//!   for peers that never answer meshd's probes (Talos nodes do not run them).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::peer::PeerState;

/// KubeSpan's WireGuard port.
pub const PORT: u16 = 51820;
/// How long after an endpoint change a handshake is waited for (`EndpointConnectionTimeout`).
pub const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(15);
/// Without a handshake for this long a peer is down (`PeerDownInterval` = 180 + 5 + 90 s).
pub const PEER_DOWN: Duration = Duration::from_secs(275);

/// The modified EUI-64 address of `mac` (6 or 8 bytes) in `prefix` (a /64 or shorter): the prefix's first
/// 8 bytes, then the MAC with `ff:fe` in the middle (EUI-48) and the universal/local bit flipped.
pub fn eui64(prefix: Ipv6Net, mac: &[u8]) -> Option<Ipv6Addr> {
    if prefix.prefix_len() > 64 {
        return None;
    }
    let mut ip = [0u8; 16];
    ip[..8].copy_from_slice(&prefix.network().octets()[..8]);
    match mac.len() {
        6 => {
            ip[8..11].copy_from_slice(&mac[..3]);
            ip[11] = 0xff;
            ip[12] = 0xfe;
            ip[13..].copy_from_slice(&mac[3..]);
        }
        8 => ip[8..].copy_from_slice(mac),
        _ => return None,
    }
    ip[8] ^= 0x02;
    Some(Ipv6Addr::from(ip))
}

/// A link as [`first_physical_mac`] sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// Link type ether (ARPHRD_ETHER).
    pub ether: bool,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, `wireguard`, ...); none for a physical NIC.
    pub kind: Option<String>,
    pub mac: Vec<u8>,
}

/// Talos's "first MAC": the first link by name that is ether and has no kind (a physical NIC). `None` when
/// there is none (e.g. a container or a network namespace with only veths: Talos then has no KubeSpan
/// address; meshd falls back, see `mesh`).
pub fn first_physical_mac(links: &[Link]) -> Option<&Link> {
    let mut sorted: Vec<&Link> = links.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
        .into_iter()
        .find(|l| l.ether && l.kind.is_none() && !l.mac.is_empty())
}

/// The fallback where Talos would have no address: the first ether link by name with a non-zero MAC,
/// whatever its kind (a veth in a container).
pub fn first_any_mac(links: &[Link]) -> Option<&Link> {
    let mut sorted: Vec<&Link> = links.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
        .into_iter()
        .find(|l| l.ether && l.mac.len() == 6 && l.mac.iter().any(|b| *b != 0))
}

/// A set of addresses of one family as sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ranges(Vec<(u128, u128)>);

impl Ranges {
    fn add(&mut self, lo: u128, hi: u128) {
        self.0.push((lo, hi));
        self.0.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(self.0.len());
        for &(l, h) in &self.0 {
            match out.last_mut() {
                Some(last) if l <= last.1.saturating_add(1) => last.1 = last.1.max(h),
                _ => out.push((l, h)),
            }
        }
        self.0 = out;
    }

    fn remove(&mut self, lo: u128, hi: u128) {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(l, h) in &self.0 {
            if h < lo || l > hi {
                out.push((l, h));
                continue;
            }
            if l < lo {
                out.push((l, lo - 1));
            }
            if h > hi {
                out.push((hi + 1, h));
            }
        }
        self.0 = out;
    }

    fn subtract(&mut self, other: &Ranges) {
        for &(l, h) in &other.0 {
            self.remove(l, h);
        }
    }

    /// The fewest prefixes covering exactly the set (`bits` = 32 or 128): from each range's start, the
    /// largest aligned block that does not pass its end.
    fn prefixes(&self, bits: u32) -> Vec<(u128, u8)> {
        fn last(start: u128, host_bits: u32) -> u128 {
            if host_bits >= 128 {
                u128::MAX
            } else {
                start + ((1u128 << host_bits) - 1)
            }
        }
        let mut out = Vec::new();
        for &(lo, hi) in &self.0 {
            let mut cur = lo;
            loop {
                let mut host_bits = if cur == 0 {
                    bits
                } else {
                    cur.trailing_zeros().min(bits)
                };
                while host_bits > 0 && last(cur, host_bits) > hi {
                    host_bits -= 1;
                }
                out.push((cur, (bits - host_bits) as u8));
                let end = last(cur, host_bits);
                if end >= hi {
                    break;
                }
                cur = end + 1;
            }
        }
        out
    }
}

fn range_of(net: &IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(n) => (
            false,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// An address set (both families), built like Go's `netipx.IPSetBuilder`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Ranges,
    v6: Ranges,
}

impl IpSet {
    pub fn add(&mut self, net: &IpNet) {
        let (v6, lo, hi) = range_of(&net.trunc());
        if v6 { &mut self.v6 } else { &mut self.v4 }.add(lo, hi);
    }

    pub fn remove(&mut self, net: &IpNet) {
        let (v6, lo, hi) = range_of(&net.trunc());
        if v6 { &mut self.v6 } else { &mut self.v4 }.remove(lo, hi);
    }

    pub fn subtract(&mut self, other: &IpSet) {
        self.v4.subtract(&other.v4);
        self.v6.subtract(&other.v6);
    }

    pub fn union(&mut self, other: &IpSet) {
        for &(l, h) in &other.v4.0 {
            self.v4.add(l, h);
        }
        for &(l, h) in &other.v6.0 {
            self.v6.add(l, h);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.0.is_empty() && self.v6.0.is_empty()
    }

    /// The fewest prefixes covering exactly the set, IPv4 first, each family in address order.
    pub fn prefixes(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (lo, len) in self.v4.prefixes(32) {
            let ip = std::net::Ipv4Addr::from(lo as u32);
            if let Ok(n) = Ipv4Net::new(ip, len) {
                out.push(IpNet::V4(n));
            }
        }
        for (lo, len) in self.v6.prefixes(128) {
            if let Ok(n) = Ipv6Net::new(Ipv6Addr::from(lo), len) {
                out.push(IpNet::V6(n));
            }
        }
        out
    }
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// A peer's AllowedIPs as Talos builds them from its affiliate: additional addresses and node addresses
/// (as /32, /128), minus the excluded networks, plus the KubeSpan address (never excluded).
pub fn allowed_ips(
    additional: &[IpNet],
    addresses: &[IpAddr],
    exclude: &[IpNet],
    kubespan: Option<IpAddr>,
) -> IpSet {
    let mut set = IpSet::default();
    for p in additional {
        set.add(p);
    }
    for a in addresses {
        set.add(&host(*a));
    }
    for e in exclude {
        set.remove(e);
    }
    if let Some(k) = kubespan {
        set.add(&host(k));
    }
    set
}

/// Talos's overlap rule: peers in order (Talos lists affiliates by node ID); each keeps only what no
/// earlier peer holds. Returns the sets in the same order; a peer can end up with nothing (Talos logs
/// "conflict resolution removed all ranges" and keeps the peer).
pub fn resolve_overlaps(sets: Vec<IpSet>) -> Vec<IpSet> {
    let mut taken = IpSet::default();
    let mut out = Vec::with_capacity(sets.len());
    for mut set in sets {
        set.subtract(&taken);
        taken.union(&set);
        out.push(set);
    }
    out
}

/// KubeSpan's endpoint choice and peer state from WireGuard handshakes alone, for a peer that does not
/// answer meshd's probes: the first endpoint, then round robin to the next whenever the peer is down
/// (a peer with one endpoint never moves).
#[derive(Clone, Debug)]
pub struct Handshake {
    endpoints: Vec<SocketAddr>,
    index: Option<usize>,
    changed: Instant,
    pub state: PeerState,
}

impl Handshake {
    pub fn new(endpoints: &[SocketAddr], now: Instant) -> Handshake {
        Handshake {
            endpoints: endpoints.to_vec(),
            index: None,
            changed: now,
            state: PeerState::Unknown,
        }
    }

    /// New candidates: the current endpoint is kept when it is still listed.
    pub fn set_endpoints(&mut self, endpoints: &[SocketAddr]) {
        let current = self.endpoint();
        self.endpoints = endpoints.to_vec();
        self.index = current.and_then(|c| self.endpoints.iter().position(|e| *e == c));
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.index.and_then(|i| self.endpoints.get(i).copied())
    }

    /// KubeSpan's `CalculateState`, with T0 the last endpoint change.
    pub fn calculate(&self, now: Instant, last_handshake: Option<Instant>) -> PeerState {
        let since = now.saturating_duration_since(self.changed);
        let after_change = last_handshake.is_some_and(|h| h >= self.changed);
        let state = if since < ENDPOINT_TIMEOUT {
            if after_change {
                PeerState::Up
            } else {
                PeerState::Unknown
            }
        } else if since < PEER_DOWN {
            if after_change {
                PeerState::Up
            } else {
                PeerState::Down
            }
        } else if last_handshake.is_some_and(|h| now.saturating_duration_since(h) < PEER_DOWN) {
            PeerState::Up
        } else {
            PeerState::Down
        };
        if state == PeerState::Down && self.index.is_none() {
            PeerState::Unknown
        } else {
            state
        }
    }

    /// Updates the state and, when the peer is down or has no endpoint yet, moves to the next endpoint.
    /// Returns the new endpoint when it changed.
    pub fn poll(&mut self, now: Instant, last_handshake: Option<Instant>) -> Option<SocketAddr> {
        self.state = self.calculate(now, last_handshake);
        if self.endpoints.is_empty() {
            return None;
        }
        let next = match self.index {
            None => 0,
            Some(_) if self.state != PeerState::Down => return None,
            Some(i) => (i + 1) % self.endpoints.len(),
        };
        if self.index == Some(next) {
            return None;
        }
        self.index = Some(next);
        self.changed = now;
        self.endpoint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn eui64_matches_talos_vector() {
        // Talos `TestIdentityUpdateAddress` (adapters/kubespan/identity_test.go).
        let prefix =
            hybridnet_config::ula_prefix("8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=", 2);
        let mac = [0x2e, 0x1a, 0xb6, 0x53, 0x81, 0x69];
        assert_eq!(
            eui64(prefix, &mac).unwrap(),
            "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        // EUI-64 MACs are copied; other lengths and long prefixes are refused.
        let p: Ipv6Net = "fd00::/64".parse().unwrap();
        assert_eq!(
            eui64(p, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap(),
            "fd00::201:203:405:607".parse::<Ipv6Addr>().unwrap()
        );
        assert!(eui64(p, &[1, 2, 3]).is_none());
        assert!(eui64("fd00::/96".parse().unwrap(), &mac).is_none());
    }

    #[test]
    fn first_mac_is_the_first_physical_link_by_name() {
        let link = |name: &str, ether: bool, kind: Option<&str>, last: u8| Link {
            name: name.into(),
            ether,
            kind: kind.map(str::to_owned),
            mac: vec![2, 0, 0, 0, 0, last],
        };
        let links = vec![
            link("lo", false, None, 0),
            link("veth0", true, Some("veth"), 1),
            link("enp2s0", true, None, 2),
            link("br0", true, Some("bridge"), 3),
            link("enp1s0", true, None, 4),
            link("wg0", false, Some("wireguard"), 5),
        ];
        assert_eq!(first_physical_mac(&links).unwrap().name, "enp1s0");
        let veths = vec![
            link("priv", true, Some("veth"), 6),
            link("eth0", true, Some("veth"), 7),
        ];
        assert!(first_physical_mac(&veths).is_none());
        assert_eq!(first_any_mac(&veths).unwrap().name, "eth0");
    }

    #[test]
    fn allowed_ips_follow_talos_rules() {
        let ks: IpAddr = "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169".parse().unwrap();
        let addrs: Vec<IpAddr> = ["192.168.3.5", "10.0.0.7", "2001:db8::5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        // Pod CIDR, node addresses as hosts, KubeSpan /128.
        let set = allowed_ips(&nets(&["10.244.4.0/24"]), &addrs, &[], Some(ks));
        assert_eq!(
            set.prefixes(),
            nets(&[
                "10.0.0.7/32",
                "10.244.4.0/24",
                "192.168.3.5/32",
                "2001:db8::5/128",
                "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/128"
            ])
        );
        // Excluding a network removes node addresses and cuts additional prefixes; the KubeSpan address
        // stays even when excluded.
        let set = allowed_ips(
            &nets(&["10.244.4.0/24"]),
            &addrs,
            &nets(&["192.168.0.0/16", "10.244.4.128/25", "fd00::/8"]),
            Some(ks),
        );
        assert_eq!(
            set.prefixes(),
            nets(&[
                "10.0.0.7/32",
                "10.244.4.0/25",
                "2001:db8::5/128",
                "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/128"
            ])
        );
        // A hole in the middle gives the fewest covering prefixes.
        let set = allowed_ips(&nets(&["10.0.0.0/24"]), &[], &nets(&["10.0.0.5/32"]), None);
        assert_eq!(
            set.prefixes(),
            nets(&[
                "10.0.0.0/30",
                "10.0.0.4/32",
                "10.0.0.6/31",
                "10.0.0.8/29",
                "10.0.0.16/28",
                "10.0.0.32/27",
                "10.0.0.64/26",
                "10.0.0.128/25"
            ])
        );
        // Whole address spaces survive the arithmetic.
        let set = allowed_ips(&nets(&["0.0.0.0/0", "::/0"]), &[], &[], None);
        assert_eq!(set.prefixes(), nets(&["0.0.0.0/0", "::/0"]));
        // Adjacent prefixes merge; host bits are ignored like Go's Prefix.Masked.
        let set = allowed_ips(
            &nets(&["10.1.0.0/25", "10.1.0.128/25", "10.2.0.9/16"]),
            &[],
            &[],
            None,
        );
        assert_eq!(set.prefixes(), nets(&["10.1.0.0/24", "10.2.0.0/16"]));
    }

    #[test]
    fn overlaps_go_to_the_earlier_peer() {
        let a = allowed_ips(&nets(&["10.244.0.0/16"]), &[], &[], None);
        let b = allowed_ips(&nets(&["10.244.1.0/24", "10.245.0.0/24"]), &[], &[], None);
        let c = allowed_ips(&nets(&["10.244.2.0/24"]), &[], &[], None);
        let out = resolve_overlaps(vec![a.clone(), b, c]);
        assert_eq!(out[0], a);
        assert_eq!(out[1].prefixes(), nets(&["10.245.0.0/24"]));
        assert!(out[2].is_empty(), "conflict resolution removed all ranges");
    }

    #[test]
    fn handshake_state_and_rotation_follow_kubespan() {
        let eps: Vec<SocketAddr> = ["192.0.2.1:51820", "198.51.100.1:51820"]
            .iter()
            .map(|e| e.parse().unwrap())
            .collect();
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut h = Handshake::new(&eps, t0);
        // No endpoint yet: the first one, at once.
        assert_eq!(h.poll(t0, None), Some(eps[0]));
        assert_eq!(h.state, PeerState::Unknown);
        // Within 15 s without a handshake: unknown, no move.
        assert_eq!(h.poll(s(10), None), None);
        assert_eq!(h.state, PeerState::Unknown);
        // A handshake after the change: up.
        assert_eq!(h.poll(s(12), Some(s(11))), None);
        assert_eq!(h.state, PeerState::Up);
        // Up while the last handshake is younger than 275 s, long after the change.
        assert_eq!(h.poll(s(400), Some(s(300))), None);
        assert_eq!(h.state, PeerState::Up);
        // 275 s without a handshake: down, and the next endpoint.
        assert_eq!(h.poll(s(600), Some(s(300))), Some(eps[1]));
        assert_eq!(h.endpoint(), Some(eps[1]));
        // 15 s after that change with no handshake: down again, round robin back to the first.
        assert_eq!(h.poll(s(610), Some(s(300))), None);
        assert_eq!(h.state, PeerState::Unknown);
        assert_eq!(h.poll(s(616), Some(s(300))), Some(eps[0]));
        // One endpoint never rotates.
        let mut one = Handshake::new(&eps[..1], t0);
        assert_eq!(one.poll(t0, None), Some(eps[0]));
        assert_eq!(one.poll(s(100), None), None);
        assert_eq!(one.state, PeerState::Down);
        // New candidates keep the current endpoint when it is still listed.
        h.set_endpoints(&[eps[1], eps[0]]);
        assert_eq!(h.endpoint(), Some(eps[0]));
    }
}

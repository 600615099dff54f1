//! Links, addresses, routes and rules over rtnetlink.
//!
//! What meshd owns, so that cleanup never touches anyone else's:
//! - its interface (and therefore the addresses on it);
//! - every route in [`ROUTE_TABLE`] whose output interface is its interface (added with protocol
//!   [`ROUTE_PROTOCOL`]);
//! - the two rules (IPv4, IPv6) `not fwmark FWMARK/FWMARK lookup ROUTE_TABLE` at [`RULE_PRIORITY`].
//!
//! WireGuard's own UDP packets and meshd's probes carry [`FWMARK`], so they skip the table and take the
//! underlay even when a peer's allowed IPs cover its underlay address. The numbers avoid KubeSpan's
//! (table 180, marks 0x20/0x40/0x60, priority 32500), Kilo's (table 1107), Calico's marks (0xffff0000),
//! Cilium's (0x0f00, upper 16 bits for identities), Flannel's and kube-proxy's (0x4000, 0x8000) and Istio's
//! (0x539): mark bit 0x1000, table 51821, priority 32450 (before `main` at 32766).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures_util::TryStreamExt as _;
use hybridnet_nft::netlink_errno;
use ipnet::IpNet;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use netlink_packet_route::rule::{RuleAttribute, RuleFlags};
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

use crate::Error;
pub use crate::topology::Route;

/// meshd's routes by destination, with their output link (see [`Net::routes`]).
pub type KnownRoutes = BTreeMap<IpNet, (Route, Option<u32>)>;

/// meshd's routing table.
pub const ROUTE_TABLE: u32 = 51821;
/// meshd's rule priority.
pub const RULE_PRIORITY: u32 = 32450;
/// The fwmark bit on WireGuard's and the prober's own packets.
pub const FWMARK: u32 = 0x1000;
/// The protocol number on meshd's routes (`ip route show table 51821 proto 213`).
pub const ROUTE_PROTOCOL: u8 = 213;
/// The alias (`IFLA_IFALIAS`, `ip link show` prints it) meshd puts on the link it creates. A link of the
/// configured name without it is someone else's: meshd never adopts, reconfigures or deletes it.
pub const OWNER_MARK: &str = "hybridnet-meshd";

/// A link as meshd's ownership check sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub alias: Option<String>,
    /// `wireguard`, `tun`, `dummy`... (`None`: the kernel reports no kind).
    pub kind: Option<String>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    pub mtu: Option<u32>,
}

impl LinkState {
    /// Whether meshd created it (it carries [`OWNER_MARK`]).
    pub fn ours(&self) -> bool {
        self.alias.as_deref() == Some(OWNER_MARK)
    }
}

fn nl(what: &str) -> impl Fn(rtnetlink::Error) -> Error + '_ {
    move |e| Error::Netlink(format!("{what}: {e}"))
}

/// A netlink connection (its task is spawned on the current runtime).
#[derive(Debug, Clone)]
pub struct Net {
    handle: Handle,
}

impl Net {
    pub fn new() -> Result<Net, Error> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::Netlink(format!("connect: {e}")))?;
        tokio::spawn(conn);
        Ok(Net { handle })
    }

    /// The index of link `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, Error> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl("get link")(e)),
        }
    }

    /// Link `name`, with its alias and kind, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<LinkState>, Error> {
        use netlink_packet_route::link::{LinkAttribute, LinkInfo};
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let msg = match links.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => {
                return Ok(None);
            }
            Err(e) => return Err(nl("get link")(e)),
        };
        let mut state = LinkState {
            index: msg.header.index,
            alias: None,
            kind: None,
            up: msg
                .header
                .flags
                .contains(netlink_packet_route::link::LinkFlags::Up),
            mtu: None,
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::Mtu(mtu) => state.mtu = Some(*mtu),
                LinkAttribute::IfAlias(alias) => state.alias = Some(alias.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            state.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Some(state))
    }

    /// Puts [`OWNER_MARK`] on link `index` (meshd created it).
    pub async fn mark(&self, index: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).alias(OWNER_MARK).build())
            .execute()
            .await
            .map_err(nl("set link alias"))
    }

    /// Every link's name, type, kind and MAC (for the KubeSpan-compatible node address).
    pub async fn links(&self) -> Result<Vec<crate::kubespan::Link>, Error> {
        use netlink_packet_route::link::{LinkAttribute, LinkInfo, LinkLayerType};
        let mut out = Vec::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("dump links"))? {
            let mut link = crate::kubespan::Link {
                name: String::new(),
                ether: msg.header.link_layer_type == LinkLayerType::Ether,
                kind: None,
                mac: Vec::new(),
            };
            for a in &msg.attributes {
                match a {
                    LinkAttribute::IfName(n) => link.name = n.clone(),
                    LinkAttribute::Address(m) => link.mac = m.clone(),
                    LinkAttribute::LinkInfo(infos) => {
                        for i in infos {
                            if let LinkInfo::Kind(k) = i {
                                link.kind = Some(k.to_string());
                            }
                        }
                    }
                    _ => {}
                }
            }
            out.push(link);
        }
        Ok(out)
    }

    /// Creates a kernel WireGuard link.
    pub async fn add_wireguard(&self, name: &str) -> Result<(), Error> {
        self.handle
            .link()
            .add(rtnetlink::LinkWireguard::new(name).build())
            .execute()
            .await
            .map_err(nl("add wireguard link"))
    }

    pub async fn delete_link(&self, index: u32) -> Result<(), Error> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl("delete link"))
    }

    /// Sets the MTU and brings the link up.
    pub async fn up(&self, index: u32, mtu: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(nl("set link up"))
    }

    /// Makes the addresses on link `index` exactly `want` (the link is ours). Returns the number of
    /// changes.
    pub async fn sync_addresses(&self, index: u32, want: &BTreeSet<IpNet>) -> Result<usize, Error> {
        let mut have = BTreeSet::new();
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut stale = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(nl("get addresses"))? {
            let addr = msg.attributes.iter().find_map(|a| match a {
                netlink_packet_route::address::AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(addr) = addr else { continue };
            let Ok(net) = IpNet::new(addr, msg.header.prefix_len) else {
                continue;
            };
            // IPv6 link-local addresses are the kernel's.
            if matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
                continue;
            }
            if want.contains(&net) {
                have.insert(net);
            } else {
                stale.push(msg);
            }
        }
        let mut changes = stale.len();
        for msg in stale {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(nl("delete address"))?;
        }
        for net in want.difference(&have) {
            let req = self
                .handle
                .address()
                .add(index, net.addr(), net.prefix_len());
            match req.execute().await {
                Ok(()) => changes += 1,
                Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(nl("add address")(e)),
            }
        }
        Ok(changes)
    }

    /// Every address of every link but `skip` (the mesh link), with its prefix length: one dump, read by
    /// both [`Net::underlay_addresses`] and [`Net::underlay_networks`].
    async fn addresses_outside(&self, skip: u32) -> Result<Vec<(IpAddr, u8)>, Error> {
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("get addresses"))? {
            if msg.header.index == skip {
                continue;
            }
            for a in &msg.attributes {
                if let netlink_packet_route::address::AddressAttribute::Address(ip) = a {
                    out.push((*ip, msg.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// Global unicast addresses of every link but `skip` (the mesh link) and loopback.
    pub async fn underlay_addresses(&self, skip: u32) -> Result<Vec<IpAddr>, Error> {
        let mut out = Vec::new();
        for (ip, _) in self.addresses_outside(skip).await? {
            let usable = match ip {
                IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
                IpAddr::V6(v6) => !v6.is_loopback() && v6.segments()[0] & 0xffc0 != 0xfe80,
            };
            if usable && !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// This node's underlay subnets: every address outside link `skip` with its prefix length (the
    /// subnet it sits in), loopback and link-local included (the trust screen refuses those anyway).
    pub async fn underlay_networks(&self, skip: u32) -> Result<Vec<IpNet>, Error> {
        let mut out = Vec::new();
        for (ip, len) in self.addresses_outside(skip).await? {
            let Ok(n) = IpNet::new(ip, len) else {
                continue;
            };
            // The subnet, and the address itself (never a peer's, proven or not).
            for n in [n.trunc(), IpNet::from(ip)] {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    /// meshd's routes: table [`ROUTE_TABLE`], through link `index` or added by meshd (protocol
    /// [`ROUTE_PROTOCOL`], e.g. via a next hop on the underlay), by destination, with their output link.
    pub async fn routes(&self, index: u32) -> Result<KnownRoutes, Error> {
        let mut out = BTreeMap::new();
        for v6 in [false, true] {
            let msg = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            let mut stream = self.handle.route().get(msg).execute();
            while let Some(route) = stream.try_next().await.map_err(nl("dump routes"))? {
                let mut table = u32::from(route.header.table);
                let mut oif = None;
                let mut dst = None;
                let mut gateway = None;
                let mut src = None;
                let addr = |a: &RouteAddress| match a {
                    RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
                    RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
                    _ => None,
                };
                for a in &route.attributes {
                    match a {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(a) => dst = addr(a),
                        RouteAttribute::Gateway(a) => gateway = addr(a),
                        RouteAttribute::PrefSource(a) => src = addr(a),
                        _ => {}
                    }
                }
                let ours = oif == Some(index)
                    || route.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL);
                if table != ROUTE_TABLE || !ours {
                    continue;
                }
                let len = route.header.destination_prefix_length;
                let dst = dst.unwrap_or(if v6 {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                });
                let kind = match gateway {
                    Some(gateway) => Route::Via { gateway, src },
                    None if oif == Some(index) => Route::Mesh,
                    // Ours, but through another link without a next hop: not a shape meshd makes.
                    None => Route::Via {
                        gateway: dst,
                        src: None,
                    },
                };
                if let Ok(net) = IpNet::new(dst, len) {
                    out.insert(net, (kind, oif));
                }
            }
        }
        Ok(out)
    }

    fn route_message(
        index: u32,
        net: &IpNet,
        route: Route,
    ) -> netlink_packet_route::route::RouteMessage {
        let protocol = RouteProtocol::from(ROUTE_PROTOCOL);
        match (net, route) {
            (IpNet::V4(n), Route::Mesh) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(index)
                .table_id(ROUTE_TABLE)
                .protocol(protocol)
                .build(),
            (IpNet::V6(n), Route::Mesh) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .output_interface(index)
                .table_id(ROUTE_TABLE)
                .protocol(protocol)
                .build(),
            (IpNet::V4(n), Route::Via { gateway, src }) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(n.network(), n.prefix_len())
                    .table_id(ROUTE_TABLE)
                    .protocol(protocol);
                if let IpAddr::V4(g) = gateway {
                    b = b.gateway(g);
                }
                if let Some(IpAddr::V4(s)) = src {
                    b = b.pref_source(s);
                }
                b.build()
            }
            (IpNet::V6(n), Route::Via { gateway, src }) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(n.network(), n.prefix_len())
                    .table_id(ROUTE_TABLE)
                    .protocol(protocol);
                if let IpAddr::V6(g) = gateway {
                    b = b.gateway(g);
                }
                if let Some(IpAddr::V6(s)) = src {
                    b = b.pref_source(s);
                }
                b.build()
            }
        }
    }

    /// Adds (or replaces: one call when a route changes its next hop) a route in meshd's table.
    pub async fn add_route(&self, index: u32, net: &IpNet, route: Route) -> Result<(), Error> {
        if let Route::Via { gateway, .. } = route
            && gateway.is_ipv4() != net.addr().is_ipv4()
        {
            return Err(Error::Netlink(format!(
                "route to {net} via {gateway}: the next hop is of another family"
            )));
        }
        self.handle
            .route()
            .add(Self::route_message(index, net, route))
            .replace()
            .execute()
            .await
            .map_err(nl("add route"))
    }

    pub async fn del_route(&self, oif: Option<u32>, net: &IpNet) -> Result<(), Error> {
        let protocol = RouteProtocol::from(ROUTE_PROTOCOL);
        let mut msg = match net {
            IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .table_id(ROUTE_TABLE)
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len())
                .table_id(ROUTE_TABLE)
                .build(),
        };
        msg.header.protocol = protocol;
        if let Some(oif) = oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if netlink_errno(&e) == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(nl("delete route")(e)),
        }
    }

    /// Routes: makes meshd's routes exactly `want`, with one netlink call per difference (a changed next
    /// hop is one replace), from `have` (meshd's routes as [`Net::routes`] read them, or as meshd knows
    /// them since), which follows each change made. Returns the number of changes.
    pub async fn sync_routes(
        &self,
        index: u32,
        want: &BTreeMap<IpNet, Route>,
        have: &mut KnownRoutes,
    ) -> Result<usize, Error> {
        let mut changes = 0;
        // One bad route (e.g. a next hop that is not on a connected network) must not keep the others
        // from being applied: every difference is tried, the first failure is reported.
        let mut failed: Vec<String> = Vec::new();
        let gone: Vec<(IpNet, Option<u32>)> = have
            .iter()
            .filter(|(net, _)| !want.contains_key(net))
            .map(|(net, (_, oif))| (*net, *oif))
            .collect();
        for (net, oif) in gone {
            match self.del_route(oif, &net).await {
                Ok(()) => {
                    have.remove(&net);
                    changes += 1;
                }
                Err(e) => failed.push(format!("{net}: {e}")),
            }
        }
        for (net, route) in want {
            let same = have.get(net).is_some_and(|(r, oif)| {
                r == route && (*route != Route::Mesh || *oif == Some(index))
            });
            if !same {
                match self.add_route(index, net, *route).await {
                    Ok(()) => {
                        let oif = match route {
                            Route::Mesh => Some(index),
                            // The kernel picks the link of the next hop: unknown until read (a later
                            // delete then names no link, which the table and protocol still single out).
                            Route::Via { .. } => None,
                        };
                        have.insert(*net, (*route, oif));
                        changes += 1;
                    }
                    Err(e) => failed.push(format!("{net}: {e}")),
                }
            }
        }
        match failed.first() {
            None => Ok(changes),
            Some(first) => Err(Error::Netlink(format!(
                "{} route change(s) failed, first: {first}",
                failed.len()
            ))),
        }
    }

    async fn our_rules(&self) -> Result<Vec<netlink_packet_route::rule::RuleMessage>, Error> {
        let mut out = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut stream = self.handle.rule().get(version).execute();
            while let Some(rule) = stream.try_next().await.map_err(nl("dump rules"))? {
                let prio = rule
                    .attributes
                    .contains(&RuleAttribute::Priority(RULE_PRIORITY));
                let table = rule.attributes.contains(&RuleAttribute::Table(ROUTE_TABLE));
                if prio && table {
                    out.push(rule);
                }
            }
        }
        Ok(out)
    }

    /// Adds meshd's two rules unless they exist (a restart adopts them; a flushed one comes back).
    /// Returns the number of rules added.
    pub async fn ensure_rules(&self) -> Result<usize, Error> {
        let existing = self.our_rules().await?;
        let mut added = 0;
        for v6 in [false, true] {
            let family = if v6 {
                netlink_packet_route::AddressFamily::Inet6
            } else {
                netlink_packet_route::AddressFamily::Inet
            };
            if existing.iter().any(|r| r.header.family == family) {
                continue;
            }
            let base = self
                .handle
                .rule()
                .add()
                .table_id(ROUTE_TABLE)
                .priority(RULE_PRIORITY)
                .fw_mark(FWMARK)
                .action(netlink_packet_route::rule::RuleAction::ToTable);
            let result = if v6 {
                let mut req = base.v6();
                let m = req.message_mut();
                m.header.flags |= RuleFlags::Invert;
                m.attributes.push(RuleAttribute::FwMask(FWMARK));
                req.execute().await
            } else {
                let mut req = base.v4();
                let m = req.message_mut();
                m.header.flags |= RuleFlags::Invert;
                m.attributes.push(RuleAttribute::FwMask(FWMARK));
                req.execute().await
            };
            match result {
                Ok(()) => added += 1,
                Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(nl("add rule")(e)),
            }
        }
        Ok(added)
    }

    /// Removes meshd's rules.
    pub async fn remove_rules(&self) -> Result<(), Error> {
        for rule in self.our_rules().await? {
            self.handle
                .rule()
                .del(rule)
                .execute()
                .await
                .map_err(nl("delete rule"))?;
        }
        Ok(())
    }
}

/// The mesh MTU for `auto`: the smallest MTU of the up, non-loopback, non-mesh links (from
/// `/sys/class/net`), minus the WireGuard overhead: 80 when any endpoint is IPv6, else 60. At least 1280.
pub fn auto_mtu(own: &str, any_v6: bool) -> u32 {
    let mut links = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let operstate = std::fs::read_to_string(path.join("operstate")).unwrap_or_default();
            let mtu = std::fs::read_to_string(path.join("mtu"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            links.push((name, operstate.trim().to_owned(), mtu));
        }
    }
    auto_mtu_of(&links, own, any_v6)
}

/// [`auto_mtu`] over `(name, operstate, mtu)` of every link. Pure. Links that are down (or without an
/// MTU), `lo` and `own` do not count; with none left the underlay is taken as 1500.
pub fn auto_mtu_of(links: &[(String, String, Option<u32>)], own: &str, any_v6: bool) -> u32 {
    let overhead = if any_v6 { 80 } else { 60 };
    let min = links
        .iter()
        .filter(|(name, state, _)| {
            name != "lo" && name != own && (state == "up" || state == "unknown")
        })
        .filter_map(|(_, _, mtu)| *mtu)
        .min();
    min.unwrap_or(1500).saturating_sub(overhead).max(1280)
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack socket reports IPv4
/// peers) written as the IPv4 address it is: one form for comparing and showing endpoints.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_unmapped_and_others_kept() {
        let p = |s: &str| s.parse::<SocketAddr>().expect("an address");
        assert_eq!(
            unmapped(p("[::ffff:192.0.2.1]:51821")),
            p("192.0.2.1:51821")
        );
        assert_eq!(unmapped(p("192.0.2.1:51821")), p("192.0.2.1:51821"));
        assert_eq!(unmapped(p("[2001:db8::1]:51821")), p("[2001:db8::1]:51821"));
        // IPv4-compatible (deprecated) addresses are IPv6 addresses, not IPv4 ones.
        assert_eq!(unmapped(p("[::192.0.2.1]:51821")), p("[::192.0.2.1]:51821"));
    }

    use super::auto_mtu_of;

    fn link(name: &str, state: &str, mtu: u32) -> (String, String, Option<u32>) {
        (name.to_owned(), state.to_owned(), Some(mtu))
    }

    #[test]
    fn auto_mtu_is_the_smallest_up_underlay_less_the_overhead() {
        let links = [
            link("lo", "unknown", 65536),
            link("eth0", "up", 1400),
            link("eth1", "up", 9000),
            link("eth2", "down", 1280),
            link("hybridnet0", "unknown", 1300),
            link("tun0", "unknown", 1450),
            ("eth3".to_owned(), "up".to_owned(), None),
        ];
        assert_eq!(auto_mtu_of(&links, "hybridnet0", false), 1340);
        assert_eq!(auto_mtu_of(&links, "hybridnet0", true), 1320, "IPv6: 80");
        // KubeSpan's documented default: 1500 - 80 = 1420.
        assert_eq!(auto_mtu_of(&[link("eth0", "up", 1500)], "x", true), 1420);
        // Never below the IPv6 minimum; no usable link counts as 1500.
        assert_eq!(auto_mtu_of(&[link("eth0", "up", 1300)], "x", false), 1280);
        assert_eq!(auto_mtu_of(&[], "x", false), 1440);
        assert_eq!(auto_mtu_of(&[link("eth0", "down", 1000)], "x", true), 1420);
    }
}

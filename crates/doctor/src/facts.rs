//! Everything the checks look at, gathered once from the node: the config, the kubelet's settings, the
//! daemons' status records, and a few kernel facts. The checks (`checks.rs`) are pure functions of this.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use hybridnet_config::Config;
use serde_json::Value;

use crate::kubelet::{self, Found};
use crate::skew::{self, Measured};

/// A daemon's status record, as the doctor sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// No record, or one that cannot be read (the reason).
    Missing(String),
    /// A record whose writer stopped or is stuck (`updatedAt` too old, or `stopped`).
    Stale { summary: String, age_secs: u64 },
    /// The daemon is running: its uptime and its details.
    Live {
        ready: bool,
        uptime_secs: u64,
        details: Value,
    },
}

/// One route: IPv4 from the main table (`/proc/net/route`), IPv6 from `/proc/net/ipv6_route`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dest: IpAddr,
    pub prefix_len: u8,
    pub interface: String,
    /// Via a gateway (`RTF_GATEWAY`); otherwise the destination is on the link and each address on it
    /// takes a neighbour entry.
    pub gateway: bool,
}

/// The kernel's neighbour table of one family (ARP for IPv4, NDP for IPv6): its hard limit and how often it
/// was found full since boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighbourTable {
    /// `net.<family>.neigh.default.gc_thresh3`: above it a new entry cannot be made and packets to that
    /// address are dropped ("neighbor table overflow" in the kernel log).
    pub limit: u64,
    /// `gc_thresh2`: above it the kernel collects entries older than 5 s, so addresses are resolved again.
    pub soft_limit: u64,
    /// `table_fulls` of `/proc/net/stat/{arp,ndisc}_cache`, summed over CPUs.
    pub fulls: u64,
}

#[derive(Debug)]
pub struct Facts {
    pub config_path: PathBuf,
    /// The hybridnet config, or why it does not load.
    pub config: Result<Config, String>,
    /// The kubelet's cluster DNS servers and where they were read; `Err`: a file that exists but is broken.
    pub kubelet_dns: Result<Option<Found<Vec<IpAddr>>>, String>,
    /// The kubelet's API server (its kubeconfig's `server`).
    pub kubelet_server: Result<Option<Found<String>>, String>,
    /// Records of apiprism, meshd and dnslocal, by daemon name.
    pub records: BTreeMap<&'static str, Record>,
    /// `net.ipv4.ip_forward`.
    pub ipv4_forward: Option<bool>,
    /// `net.ipv6.conf.all.forwarding` (the mesh's own addresses are IPv6: a gateway forwards them).
    pub ipv6_forward: Option<bool>,
    /// Link MTUs by interface name.
    pub mtus: BTreeMap<String, u32>,
    pub routes: Vec<Route>,
    /// This node's clock against its time sources' `Date` headers (`skew`).
    pub clock: Vec<Measured>,
    /// The IPv4 and IPv6 neighbour tables; `None` where they cannot be read (in a network namespace other
    /// than the host's, `neigh/default` is not there: the tables are the host's).
    pub neighbours: [Option<NeighbourTable>; 2],
}

/// Where to look (the command line's choices).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub config: PathBuf,
    pub state_dir: Option<PathBuf>,
    /// A kubelet config file; default: the first of [`kubelet::KUBELET_CONFIGS`] that exists, else the
    /// Talos machine config in `config` if it sets `machine.kubelet.clusterDNS`.
    pub kubelet_config: Option<PathBuf>,
    /// A kubelet kubeconfig; default: the first of [`kubelet::KUBELET_KUBECONFIGS`] that exists.
    pub kubelet_kubeconfig: Option<PathBuf>,
    /// URLs whose `Date` the clock is compared with; default (empty): the discovery service endpoints and
    /// apiprism's upstreams from the config ([`time_sources`]).
    pub time_sources: Vec<String>,
}

/// Whether a record is live at `now` (the runtime's rule, passed in: this crate sits below the runtime).
pub type Liveness = fn(&hybridnet_state::DaemonStatus, u64) -> bool;

impl Facts {
    pub fn gather(src: &Sources, live: Liveness, now: u64) -> Facts {
        let config = hybridnet_config::load_file(&src.config).map_err(|e| e.to_string());
        let state_dir = src.state_dir.clone().unwrap_or_else(|| match &config {
            Ok(c) => c.state_dir.clone(),
            Err(_) => Config::defaults().state_dir,
        });
        let records = hybridnet_state::DAEMONS
            .iter()
            .map(|d| (*d, read_record(&state_dir, d, live, now)))
            .collect();
        let clock = skew::measure_all(&time_sources(src, config.as_ref().ok()), skew::TIMEOUT);
        Facts {
            config_path: src.config.clone(),
            config,
            kubelet_dns: kubelet_dns(src),
            kubelet_server: kubelet_server(src),
            records,
            ipv4_forward: read_trim("/proc/sys/net/ipv4/ip_forward").map(|v| v == "1"),
            ipv6_forward: read_trim("/proc/sys/net/ipv6/conf/all/forwarding").map(|v| v == "1"),
            mtus: link_mtus(),
            routes: std::fs::read_to_string("/proc/net/route")
                .map(|t| parse_routes(&t))
                .unwrap_or_default()
                .into_iter()
                .chain(
                    std::fs::read_to_string("/proc/net/ipv6_route")
                        .map(|t| parse_routes6(&t))
                        .unwrap_or_default(),
                )
                .collect(),
            clock,
            neighbours: [
                neighbour_table("ipv4", "arp_cache"),
                neighbour_table("ipv6", "ndisc_cache"),
            ],
        }
    }
}

fn neighbour_table(family: &str, stat: &str) -> Option<NeighbourTable> {
    let knob = |name: &str| {
        read_trim(&format!("/proc/sys/net/{family}/neigh/default/{name}"))?
            .parse()
            .ok()
    };
    Some(NeighbourTable {
        limit: knob("gc_thresh3")?,
        soft_limit: knob("gc_thresh2")?,
        fulls: std::fs::read_to_string(format!("/proc/net/stat/{stat}"))
            .map(|t| parse_table_fulls(&t))
            .unwrap_or(0),
    })
}

/// `/proc/net/stat/arp_cache` (and `ndisc_cache`): a header naming the columns, then one line of hex
/// counters per CPU (net/core/neighbour.c, `neigh_stat_seq_show`). Returns `table_fulls` summed; 0 when
/// the column is missing.
pub fn parse_table_fulls(text: &str) -> u64 {
    let mut lines = text.lines();
    let Some(column) = lines
        .next()
        .and_then(|h| h.split_whitespace().position(|c| c == "table_fulls"))
    else {
        return 0;
    };
    lines
        .filter_map(|l| l.split_whitespace().nth(column))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .fold(0, u64::saturating_add)
}

/// Where to read the time: the command line's URLs, else the discovery service endpoints (when discovery
/// is on) and the API servers apiprism balances (`https://host:port/`), without repeats.
pub fn time_sources(src: &Sources, config: Option<&Config>) -> Vec<String> {
    if !src.time_sources.is_empty() {
        return src.time_sources.clone();
    }
    let Some(c) = config else {
        return Vec::new();
    };
    let discovery = c
        .cluster
        .discovery
        .enabled
        .then_some(c.cluster.discovery.endpoints.iter().cloned())
        .into_iter()
        .flatten();
    let api = c.apiprism.upstreams.iter().map(|u| {
        if u.host.contains(':') {
            format!("https://[{}]:{}/", u.host, u.port)
        } else {
            format!("https://{}:{}/", u.host, u.port)
        }
    });
    let mut out: Vec<String> = Vec::new();
    for url in discovery.chain(api) {
        if !out.contains(&url) {
            out.push(url);
        }
    }
    out
}

fn kubelet_dns(src: &Sources) -> Result<Option<Found<Vec<IpAddr>>>, String> {
    if let Some(path) = &src.kubelet_config {
        return kubelet::cluster_dns_in(path);
    }
    if let Some(path) = kubelet::first_existing(&kubelet::KUBELET_CONFIGS) {
        return kubelet::cluster_dns_in(&path);
    }
    // Talos: the machine config itself may be in our config file (the lab and the tests do that).
    match kubelet::cluster_dns_in(&src.config) {
        Ok(found) => Ok(found.filter(|f| f.source.ends_with("machine.kubelet.clusterDNS"))),
        Err(_) => Ok(None),
    }
}

fn kubelet_server(src: &Sources) -> Result<Option<Found<String>>, String> {
    let path = match &src.kubelet_kubeconfig {
        Some(p) => p.clone(),
        None => match kubelet::first_existing(&kubelet::KUBELET_KUBECONFIGS) {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    kubelet::kubeconfig_server(&path)
}

fn read_record(state_dir: &Path, daemon: &str, live: Liveness, now: u64) -> Record {
    // The state crate's reader bounds the size and checks the envelope and schema.
    let status = match hybridnet_state::StateDir::new(state_dir).read_status(daemon) {
        Ok(record) => record.data,
        Err(e) => return Record::Missing(e.to_string()),
    };
    if !live(&status, now) {
        return Record::Stale {
            summary: status.summary,
            age_secs: now.saturating_sub(status.updated_at),
        };
    }
    Record::Live {
        ready: status.ready,
        uptime_secs: now.saturating_sub(status.started_at),
        details: status.details,
    }
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn link_mtus() -> BTreeMap<String, u32> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return BTreeMap::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mtu = std::fs::read_to_string(e.path().join("mtu")).ok()?;
            Some((name, mtu.trim().parse().ok()?))
        })
        .collect()
}

/// `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`, addresses as
/// little-endian hex. Malformed lines are skipped.
pub fn parse_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            Some(Route {
                dest: IpAddr::V4(Ipv4Addr::from(u32::from_be(dest))),
                prefix_len: u8::try_from(mask.count_ones()).ok()?,
                interface: (*f.first()?).to_owned(),
                gateway: flags & RTF_GATEWAY != 0,
            })
        })
        .collect()
}

/// `RTF_REJECT`: an unreachable or prohibit route (the kernel lists its default `lo` ones).
const RTF_REJECT: u32 = 0x0200;
/// `RTF_GATEWAY`: the route has a next hop (include/uapi/linux/route.h).
const RTF_GATEWAY: u32 = 0x0002;

/// `/proc/net/ipv6_route`: `dest dest_len src src_len next_hop metric refcnt use flags iface`, addresses as
/// 32 hex digits in network order, lengths and flags in hex (net/ipv6/route.c, `rt6_info_seq_show`). Reject
/// routes and malformed lines are skipped.
pub fn parse_routes6(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            if flags & RTF_REJECT != 0 {
                return None;
            }
            let dest = u128::from_str_radix(f[0], 16).ok()?;
            let prefix_len = u8::from_str_radix(f[1], 16).ok().filter(|l| *l <= 128)?;
            Some(Route {
                dest: IpAddr::V6(Ipv6Addr::from(dest)),
                prefix_len,
                interface: f[9].to_owned(),
                gateway: flags & RTF_GATEWAY != 0,
            })
        })
        .collect()
}

/// Whether the first `len` bits of `a` and `b` are the same (same family only).
fn same_prefix(a: IpAddr, b: IpAddr, len: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// The interface of the longest route matching `ip` (of its family).
pub fn route_interface(routes: &[Route], ip: IpAddr) -> Option<&str> {
    route_to(routes, ip).map(|r| r.interface.as_str())
}

/// The longest-prefix route to `ip`.
pub fn route_to(routes: &[Route], ip: IpAddr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| same_prefix(ip, r.dest, r.prefix_len))
        .max_by_key(|r| r.prefix_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_from_proc_net_route() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    wg0\t0000630A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                    junk\n";
        let routes = parse_routes(text);
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[1].dest, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 0)));
        assert_eq!(routes[1].prefix_len, 24);
        assert_eq!(
            route_interface(&routes, Ipv4Addr::new(10, 99, 0, 7).into()),
            Some("wg0")
        );
        assert_eq!(
            route_interface(&routes, Ipv4Addr::new(192, 0, 2, 12).into()),
            Some("eth0")
        );
        assert_eq!(
            route_interface(&routes, Ipv4Addr::new(8, 8, 8, 8).into()),
            Some("eth0")
        );
        assert_eq!(route_interface(&[], Ipv4Addr::new(8, 8, 8, 8).into()), None);
        let gateway = |ip: Ipv4Addr| route_to(&routes, ip.into()).map(|r| r.gateway);
        assert_eq!(
            gateway(Ipv4Addr::new(8, 8, 8, 8)),
            Some(true),
            "the default"
        );
        assert_eq!(
            gateway(Ipv4Addr::new(192, 0, 2, 12)),
            Some(false),
            "on the link"
        );
    }

    #[test]
    fn this_machines_neighbour_tables_read() {
        // The real thing: unit tests run in the host's namespace, where the limits are.
        for (family, stat) in [("ipv4", "arp_cache"), ("ipv6", "ndisc_cache")] {
            let t = neighbour_table(family, stat)
                .unwrap_or_else(|| panic!("{family} neighbour limits unreadable here"));
            assert!(t.limit >= t.soft_limit && t.limit > 0, "{family}: {t:?}");
        }
    }

    #[test]
    fn neighbour_table_fulls_are_summed_over_cpus() {
        // As Linux 6.x prints /proc/net/stat/arp_cache on two CPUs (read on this machine after a 32-node
        // lab overflowed the table).
        let text = "entries  allocs   destroys hash_grows lookups  hits     res_failed rcv_probes_mcast rcv_probes_ucast periodic_gc_runs forced_gc_runs unresolved_discards table_fulls\n\
                    00000420 0000558e 000062a3 00000006   000449ac 00022094 000004e0   00000000         00000000         000008e2         00049258       00000000            00048f10\n\
                    00000420 00005d6e 00004c39 00000002   0004c2d0 00025e25 000003eb   00000000         00000000         00000000         00043a94       00000000            000437e1\n";
        assert_eq!(parse_table_fulls(text), 0x48f10 + 0x437e1);
        assert_eq!(parse_table_fulls("entries allocs\n1 2\n"), 0, "no column");
        assert_eq!(parse_table_fulls(""), 0);
        assert_eq!(
            parse_table_fulls("table_fulls\nzz\nffffffffffffffff\n1\n"),
            u64::MAX,
            "junk skipped, no overflow"
        );
    }

    #[test]
    fn routes_from_proc_net_ipv6_route() {
        // As a Linux 6.x node prints it: a /64 on eth0, a default via eth0, the mesh /64, a local /128 on lo,
        // and the kernel's unreachable default on lo (RTF_REJECT), then junk.
        let text = "20010db8000000010000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000003 00000000 00000003     eth0\n\
                    fdc496f322a306020000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 hybridnet0\n\
                    20010db8000000010000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
                    zz 40\n";
        let routes = parse_routes6(text);
        assert_eq!(routes.len(), 4, "{routes:?}");
        let v6 = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert_eq!(
            route_interface(&routes, v6("2001:db8:0:1::77")),
            Some("eth0")
        );
        assert_eq!(route_interface(&routes, v6("2001:db8:0:1::5")), Some("lo"));
        assert_eq!(
            route_interface(&routes, v6("fdc4:96f3:22a3:602::9")),
            Some("hybridnet0")
        );
        assert_eq!(
            route_interface(&routes, v6("2a00::1")),
            Some("eth0"),
            "the default route"
        );
        assert_eq!(
            route_interface(&routes, Ipv4Addr::new(192, 0, 2, 1).into()),
            None,
            "no IPv4 route matches by an IPv6 one"
        );
        assert!(
            parse_routes6("ffff 81 x x x x x x 00000001 eth0\n").is_empty(),
            "a /129 is refused"
        );
    }

    #[test]
    fn this_machines_ipv6_routes_parse() {
        // The real thing: this kernel's table, whatever it holds, parses to routes on interfaces that exist
        // (reject routes aside).
        let text =
            std::fs::read_to_string("/proc/net/ipv6_route").expect("/proc/net/ipv6_route (Linux)");
        let routes = parse_routes6(&text);
        let rejects = text
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(8)
                    .and_then(|f| u32::from_str_radix(f, 16).ok())
                    .is_some_and(|f| f & RTF_REJECT != 0)
            })
            .count();
        assert_eq!(routes.len() + rejects, text.lines().count(), "{text}");
        for r in &routes {
            assert!(
                Path::new("/sys/class/net").join(&r.interface).exists(),
                "{r:?}"
            );
        }
    }
}

//! Everything the checks look at, gathered once from the node: the config, the kubelet's settings, the
//! daemons' status records, and a few kernel facts. The checks (`checks.rs`) are pure functions of this.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use hybridnet_config::Config;
use serde_json::Value;

use crate::kubelet::{self, Found};

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

/// One IPv4 route of the main table (from `/proc/net/route`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route4 {
    pub dest: Ipv4Addr,
    pub prefix_len: u8,
    pub interface: String,
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
    /// Link MTUs by interface name.
    pub mtus: BTreeMap<String, u32>,
    pub routes: Vec<Route4>,
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
        Facts {
            config_path: src.config.clone(),
            config,
            kubelet_dns: kubelet_dns(src),
            kubelet_server: kubelet_server(src),
            records,
            ipv4_forward: read_trim("/proc/sys/net/ipv4/ip_forward").map(|v| v == "1"),
            mtus: link_mtus(),
            routes: std::fs::read_to_string("/proc/net/route")
                .map(|t| parse_routes(&t))
                .unwrap_or_default(),
        }
    }
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
pub fn parse_routes(text: &str) -> Vec<Route4> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            Some(Route4 {
                dest: Ipv4Addr::from(u32::from_be(dest)),
                prefix_len: u8::try_from(mask.count_ones()).ok()?,
                interface: (*f.first()?).to_owned(),
            })
        })
        .collect()
}

/// The interface of the longest route matching `ip`.
pub fn route_interface(routes: &[Route4], ip: Ipv4Addr) -> Option<&str> {
    routes
        .iter()
        .filter(|r| {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(r.prefix_len))
                .unwrap_or(0);
            u32::from(ip) & mask == u32::from(r.dest) & mask
        })
        .max_by_key(|r| r.prefix_len)
        .map(|r| r.interface.as_str())
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
        assert_eq!(routes[1].dest, Ipv4Addr::new(192, 0, 2, 0));
        assert_eq!(routes[1].prefix_len, 24);
        assert_eq!(
            route_interface(&routes, Ipv4Addr::new(10, 99, 0, 7)),
            Some("wg0")
        );
        assert_eq!(
            route_interface(&routes, Ipv4Addr::new(192, 0, 2, 12)),
            Some("eth0")
        );
        assert_eq!(
            route_interface(&routes, Ipv4Addr::new(8, 8, 8, 8)),
            Some("eth0")
        );
        assert_eq!(route_interface(&[], Ipv4Addr::new(8, 8, 8, 8)), None);
    }
}

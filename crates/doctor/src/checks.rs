//! The checks: pure functions of [`Facts`], each returning findings in plain words with the fix.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hybridnet_config::Config;
use serde_json::Value;

use crate::facts::{Facts, NeighbourTable, Record, route_interface, route_to};
use crate::kubelet::url_host_port;
use crate::model::{Finding, Verdict};

/// Talos's host DNS resolver (`constants.HostDNSAddress` in siderolabs/talos pkg/machinery/constants).
pub const TALOS_HOST_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 116, 108));
/// WireGuard's per-packet overhead over IPv4 (20 IP + 8 UDP + 32 WireGuard) and over IPv6 (+20).
const WG_OVERHEAD_V4: u32 = 60;
const WG_OVERHEAD_V6: u32 = 80;
/// apiprism counts as unused when it has served no connection this long after start.
const UNUSED_AFTER_SECS: u64 = 120;

/// Every check, in the order they print.
pub fn all(f: &Facts) -> Vec<Finding> {
    let mut out = vec![match &f.config {
        Ok(_) => Finding::ok("config", format!("{} loads", f.config_path.display())),
        Err(e) => Finding::fail(
            "config",
            format!("{} does not load: {e}", f.config_path.display()),
            format!(
                "run `meshd check-config --config {}` and fix what it names",
                f.config_path.display()
            ),
        ),
    }];
    out.extend(f.records.iter().map(|(d, r)| running(d, r)));
    let Ok(cfg) = &f.config else {
        return out;
    };
    out.push(kubelet_dns(f, cfg));
    out.push(kubelet_dns_twice(f, cfg));
    out.push(kubelet_api(f, cfg));
    out.push(apiprism_used(f));
    out.push(kubeprism_port(f, cfg));
    out.push(mesh_port(f));
    out.push(mtu(f));
    out.push(forwarding(f));
    out.push(neighbours(f));
    out.push(clock(f));
    out
}

fn live_details<'a>(f: &'a Facts, daemon: &str) -> Option<(&'a Value, u64)> {
    match f.records.get(daemon) {
        Some(Record::Live {
            details,
            uptime_secs,
            ..
        }) => Some((details, *uptime_secs)),
        _ => None,
    }
}

fn running(daemon: &'static str, r: &Record) -> Finding {
    let check = match daemon {
        "apiprism" => "apiprism-running",
        "meshd" => "meshd-running",
        _ => "dnslocal-running",
    };
    match r {
        Record::Live { ready: true, .. } => {
            Finding::ok(check, format!("{daemon} runs and is ready"))
        }
        Record::Live { ready: false, .. } => Finding::warn(
            check,
            format!("{daemon} runs but is not ready"),
            format!("run `{daemon} status` and read its log for what it waits for"),
        ),
        Record::Stale { summary, age_secs } => Finding::fail(
            check,
            format!("{daemon} is not running (its last status, {age_secs}s old: {summary})"),
            format!(
                "start {daemon} (Talos: `talosctl service ext-{daemon}`; systemd: `systemctl status hybridnet-{daemon}`) and read its log"
            ),
        ),
        Record::Missing(why) => Finding::fail(
            check,
            format!("{daemon} has no status record ({why})"),
            format!("start {daemon}, or pass --state-dir / --config with the stateDir it uses"),
        ),
    }
}

/// The addresses dnslocal answers on: its listen addresses and, with `interceptClusterDNS`, the kube-dns
/// ClusterIP it holds.
fn listen_ips(cfg: &Config) -> Vec<IpAddr> {
    cfg.dnslocal
        .listen
        .iter()
        .map(SocketAddr::ip)
        .chain(cfg.dnslocal.intercept_cluster_dns)
        .collect()
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn kubelet_dns(f: &Facts, cfg: &Config) -> Finding {
    const C: &str = "kubelet-dns";
    let found = match &f.kubelet_dns {
        Err(e) => {
            return Finding::fail(
                C,
                format!("cannot read the kubelet config: {e}"),
                "fix or remove the broken file, or pass --kubelet-config",
            );
        }
        Ok(None) => {
            return Finding::skip(
                C,
                "no kubelet config found (kubeadm /var/lib/kubelet/config.yaml, Talos /etc/kubernetes/kubelet.yaml or machine.kubelet.clusterDNS, k3s /etc/rancher/k3s/config.yaml); pass --kubelet-config",
            );
        }
        Ok(Some(found)) => found,
    };
    let ours = listen_ips(cfg);
    if found.value.iter().any(|ip| ours.contains(ip)) {
        return Finding::ok(
            C,
            format!(
                "the kubelet gives pods dnslocal ({}), from {}",
                join(&found.value),
                found.source
            ),
        );
    }
    let first = ours
        .first()
        .map_or_else(|| "169.254.20.10".to_owned(), ToString::to_string);
    Finding::fail(
        C,
        format!(
            "the kubelet gives pods {} as DNS ({}), but dnslocal listens on {}: pods' lookups bypass dnslocal",
            join(&found.value),
            found.source,
            join(&ours)
        ),
        format!(
            "set the kubelet's clusterDNS to [{first}] (kubeadm: clusterDNS in /var/lib/kubelet/config.yaml, then restart the kubelet; Talos: machine.kubelet.clusterDNS; k3s: --cluster-dns {first}), or set dnslocal.interceptClusterDNS: true to answer on {} itself (NodeLocal DNSCache's mode; dnslocal.clusterDNS then names a kube-dns-upstream Service)",
            found
                .value
                .first()
                .map_or_else(String::new, ToString::to_string)
        ),
    )
}

fn kubelet_dns_twice(f: &Facts, cfg: &Config) -> Finding {
    const C: &str = "kubelet-dns-single";
    let Ok(Some(found)) = &f.kubelet_dns else {
        return Finding::skip(C, "no kubelet DNS servers to look at");
    };
    let ours = listen_ips(cfg);
    let others: Vec<IpAddr> = found
        .value
        .iter()
        .copied()
        .filter(|ip| !ours.contains(ip))
        .collect();
    if others.len() == found.value.len() || others.is_empty() {
        return Finding::ok(C, "the kubelet gives pods one DNS service");
    }
    if others.contains(&TALOS_HOST_DNS) {
        return Finding::fail(
            C,
            format!(
                "the kubelet gives pods both dnslocal and Talos's host DNS ({TALOS_HOST_DNS}) ({}): lookups go to either, cluster names fail when they reach host DNS without forwardKubeDNSToHost",
                found.source
            ),
            "keep only dnslocal in machine.kubelet.clusterDNS; to let host DNS serve the node itself, leave machine.features.hostDNS on but out of clusterDNS",
        );
    }
    Finding::warn(
        C,
        format!(
            "the kubelet gives pods dnslocal and {} ({}): glibc falls back to the others when dnslocal is slow, bypassing its cache",
            join(&others),
            found.source
        ),
        "list only dnslocal's address in clusterDNS (dnslocal already fails over between its upstreams)",
    )
}

fn is_apiprism(cfg: &Config, host: &str, port: u16) -> bool {
    let local = matches!(host, "localhost" | "127.0.0.1" | "::1");
    cfg.apiprism
        .listen
        .iter()
        .any(|l| l.port() == port && (local || l.ip().to_string() == host))
}

fn kubelet_api(f: &Facts, cfg: &Config) -> Finding {
    const C: &str = "kubelet-api";
    let found = match &f.kubelet_server {
        Err(e) => {
            return Finding::fail(
                C,
                format!("cannot read the kubelet kubeconfig: {e}"),
                "fix the file, or pass --kubeconfig",
            );
        }
        Ok(None) => {
            return Finding::skip(
                C,
                "no kubelet kubeconfig found (kubeadm /etc/kubernetes/kubelet.conf, Talos /etc/kubernetes/kubeconfig-kubelet, k3s kubelet.kubeconfig); pass --kubeconfig",
            );
        }
        Ok(Some(found)) => found,
    };
    match url_host_port(&found.value) {
        Some((host, port)) if is_apiprism(cfg, &host, port) => Finding::ok(
            C,
            format!(
                "the kubelet reaches the API through apiprism ({}, {})",
                found.value, found.source
            ),
        ),
        _ => Finding::fail(
            C,
            format!(
                "the kubelet talks to {} directly ({}): when that server goes, so does this node's API",
                found.value, found.source
            ),
            format!(
                "point the kubelet's kubeconfig at https://127.0.0.1:{} (kubeadm: server: in /etc/kubernetes/kubelet.conf; k3s agents: --server stays, use apiprism for the rest; Talos: enable KubePrism or give apiprism its port)",
                cfg.apiprism.listen.first().map_or(7445, SocketAddr::port)
            ),
        ),
    }
}

fn apiprism_used(f: &Facts) -> Finding {
    const C: &str = "apiprism-used";
    let Some((details, uptime)) = live_details(f, "apiprism") else {
        return Finding::skip(C, "apiprism is not running");
    };
    let upstreams = details["upstreams"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let total: u64 = upstreams.iter().filter_map(|u| u["total"].as_u64()).sum();
    let active: u64 = upstreams.iter().filter_map(|u| u["active"].as_u64()).sum();
    if total > 0 || active > 0 {
        return Finding::ok(
            C,
            format!("apiprism carried {total} client connections ({active} open)"),
        );
    }
    if uptime < UNUSED_AFTER_SECS {
        return Finding::ok(
            C,
            format!("apiprism has carried no connection yet (up {uptime}s)"),
        );
    }
    Finding::warn(
        C,
        format!("nothing uses apiprism: no client connection in {uptime}s"),
        "point the kubelet, kube-proxy and the CNI agent at https://127.0.0.1:7445 (their kubeconfigs, or KUBERNETES_SERVICE_HOST/PORT for the CNI)",
    )
}

fn kubeprism_port(f: &Facts, cfg: &Config) -> Finding {
    const C: &str = "kubeprism-port";
    // On Talos the extension's config rarely holds the machine config (the loader refuses a clash when it
    // does), so the running apiprism is the evidence: a configured address it does not listen on is held by
    // something else, KubePrism on Talos.
    let Some((details, _)) = live_details(f, "apiprism") else {
        return Finding::skip(C, "apiprism is not running");
    };
    let listening: Vec<&str> = details["listen"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let missing: Vec<SocketAddr> = cfg
        .apiprism
        .listen
        .iter()
        .copied()
        .filter(|l| !listening.contains(&l.to_string().as_str()))
        .collect();
    if missing.is_empty() {
        let kp = cfg.cluster.kube_prism.as_ref().map_or_else(
            || "KubePrism off or unknown".to_owned(),
            |k| format!("KubePrism on {}", k.port),
        );
        return Finding::ok(
            C,
            format!("apiprism listens on {} ({kp})", join(&cfg.apiprism.listen)),
        );
    }
    let port = missing.first().map_or(7445, SocketAddr::port);
    Finding::fail(
        C,
        format!(
            "apiprism cannot listen on {}: another process holds the port (on Talos: KubePrism, which also defaults to {port})",
            join(&missing)
        ),
        format!(
            "either set machine.features.kubePrism.enabled: false (apiprism takes over {port}), or move apiprism.listen to another port, e.g. 127.0.0.1:7455; `ss -ltnp sport = :{port}` shows who holds it"
        ),
    )
}

fn mesh_port(f: &Facts) -> Finding {
    const C: &str = "mesh-port";
    let Some((details, uptime)) = live_details(f, "meshd") else {
        return Finding::skip(C, "meshd is not running");
    };
    let port = details["listenPort"].as_u64().unwrap_or(0);
    let peers = details["peers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if peers.is_empty() {
        return Finding::skip(C, "meshd has no peers yet");
    }
    let up = peers.iter().filter(|p| p["state"] == "up").count();
    if up > 0 {
        return Finding::ok(
            C,
            format!(
                "{up} of {} peers reach this node's mesh ports (UDP {port} and {})",
                peers.len(),
                port + 1
            ),
        );
    }
    let down = peers.iter().filter(|p| p["state"] == "down").count();
    if down == 0 && uptime < 30 {
        return Finding::ok(C, format!("no peer up yet (meshd up {uptime}s)"));
    }
    let probes = port + 1;
    Finding::fail(
        C,
        format!(
            "none of {} peers answers: the mesh ports (UDP {port} WireGuard, {probes} probes) are not reachable from any peer",
            peers.len()
        ),
        format!(
            "allow UDP {port} and {probes} in from the other nodes (host firewall: e.g. `nft add rule inet filter input udp dport {{ {port}, {probes} }} accept`; cloud security group or NAT port forward of both); then `meshd status` shows the peers up"
        ),
    )
}

fn mtu(f: &Facts) -> Finding {
    const C: &str = "mtu";
    let Some((details, _)) = live_details(f, "meshd") else {
        return Finding::skip(C, "meshd is not running");
    };
    let mesh_mtu = u32::try_from(details["mtu"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
    let iface = details["interface"].as_str().unwrap_or("");
    let mut problems = Vec::new();
    if let Some(&real) = f.mtus.get(iface)
        && mesh_mtu > 0
        && real != mesh_mtu
    {
        problems.push(format!("{iface} has MTU {real}, meshd wants {mesh_mtu}"));
    }
    let peers = details["peers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for p in peers {
        let Some(ep) = p["endpoint"]
            .as_str()
            .and_then(|e| e.parse::<SocketAddr>().ok())
        else {
            continue;
        };
        let overhead = match ep.ip() {
            IpAddr::V4(_) => WG_OVERHEAD_V4,
            IpAddr::V6(_) => WG_OVERHEAD_V6,
        };
        let dev = route_interface(&f.routes, ep.ip());
        let Some(dev) = dev else { continue };
        if let Some(&under) = f.mtus.get(dev)
            && mesh_mtu + overhead > under
        {
            problems.push(format!(
                "to {} ({ep}) via {dev}: {mesh_mtu} + {overhead} bytes of WireGuard > the link's {under}",
                p["name"].as_str().unwrap_or("?")
            ));
        }
    }
    let clamp_error = details["mssClamp"]["error"].as_str();
    let clamp_on = details["mssClamp"]["enabled"].as_bool().unwrap_or(false);
    if !problems.is_empty() {
        return Finding::fail(
            C,
            format!(
                "mesh packets do not fit the underlay: {} (they are fragmented or silently dropped)",
                problems.join("; ")
            ),
            "set meshd.mtu to the smallest underlay MTU minus 80 (or `mtu: auto`), and keep clampMSS on",
        );
    }
    if let Some(e) = clamp_error {
        return Finding::warn(
            C,
            format!(
                "the MSS clamping rule is missing ({e}): TCP over the mesh stalls on paths with a PMTU black hole"
            ),
            "load nf_tables and give meshd NET_ADMIN; `meshd status` shows when it is back",
        );
    }
    if !clamp_on {
        return Finding::warn(
            C,
            format!(
                "mesh MTU {mesh_mtu} fits, but MSS clamping is off: pods' TCP relies on PMTU discovery"
            ),
            "set meshd.clampMSS: true unless the CNI clamps",
        );
    }
    Finding::ok(
        C,
        format!("mesh MTU {mesh_mtu} fits every peer's underlay link, MSS clamped"),
    )
}

fn forwarding(f: &Facts) -> Finding {
    const C: &str = "forwarding";
    let Some((details, _)) = live_details(f, "meshd") else {
        return Finding::skip(C, "meshd is not running");
    };
    let gateway = details["topology"]["gatewayCandidate"]
        .as_bool()
        .unwrap_or(false);
    let off: Vec<&str> = [
        ("IPv4 (net.ipv4.ip_forward)", f.ipv4_forward),
        ("IPv6 (net.ipv6.conf.all.forwarding)", f.ipv6_forward),
    ]
    .into_iter()
    .filter(|(_, on)| *on == Some(false))
    .map(|(what, _)| what)
    .collect();
    let unknown = f.ipv4_forward.is_none() && f.ipv6_forward.is_none();
    match (unknown, off.is_empty(), gateway) {
        (true, _, _) => Finding::skip(C, "cannot read the forwarding sysctls"),
        (false, true, _) => Finding::ok(C, "IPv4 and IPv6 forwarding are on"),
        (false, false, true) => Finding::fail(
            C,
            format!(
                "this node is a gateway for its location but {} forwarding is off: traffic between locations through it is dropped (the mesh's own addresses are IPv6)",
                off.join(" and ")
            ),
            "sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 (persist it: /etc/sysctl.d, or Talos machine.sysctls; meshd sets them itself where /proc/sys is writable)",
        ),
        (false, false, false) if f.ipv4_forward == Some(false) => Finding::warn(
            C,
            "IPv4 forwarding is off: pod traffic cannot cross this node (fine only if no pods run here)",
            "sysctl -w net.ipv4.ip_forward=1 (the CNI usually sets it)",
        ),
        (false, false, false) => Finding::ok(
            C,
            "IPv4 forwarding is on (IPv6 forwarding is off: needed only on a gateway or for IPv6 pods)",
        ),
    }
}

/// Whether the kernel's neighbour tables hold an entry for every peer address on this node's links.
///
/// Each peer endpoint reached without a gateway needs an ARP (IPv4) or NDP (IPv6) entry, and the kernel's
/// default hard limit (`gc_thresh3`) is 1024 per family for the whole machine, pods' entries included.
/// Above it new entries fail and packets to those peers are dropped in the kernel: probes go unanswered
/// and peers look down (found in a 32-node lab: the tables of network namespaces are the host's).
fn neighbours(f: &Facts) -> Finding {
    const C: &str = "neighbours";
    let Some((details, _)) = live_details(f, "meshd") else {
        return Finding::skip(C, "meshd is not running");
    };
    let peers = details["peers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    // Every candidate path of every peer: standby paths are probed, so they hold entries too.
    let mut on_link = [
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    ];
    for ep in peers
        .iter()
        .flat_map(|p| p["paths"].as_array().map(Vec::as_slice).unwrap_or_default())
        .filter_map(|path| path["endpoint"].as_str()?.parse::<SocketAddr>().ok())
    {
        let ip = ep.ip().to_canonical();
        if route_to(&f.routes, ip).is_some_and(|r| !r.gateway) {
            on_link[usize::from(ip.is_ipv6())].insert(ip);
        }
    }
    let mut fail = Vec::new();
    let mut warn = Vec::new();
    let mut ok = Vec::new();
    for (i, (family, sysctl)) in [("IPv4 (ARP)", "net.ipv4"), ("IPv6 (NDP)", "net.ipv6")]
        .into_iter()
        .enumerate()
    {
        let Some(NeighbourTable {
            limit,
            soft_limit,
            fulls,
        }) = f.neighbours[i]
        else {
            continue;
        };
        let need = u64::try_from(on_link[i].len()).unwrap_or(u64::MAX);
        let overflowed = if fulls > 0 {
            format!(" (the kernel found it full {fulls} times since boot)")
        } else {
            String::new()
        };
        // The soft limit at twice the need (pods hold entries too), the hard one twice that.
        let soft = need.saturating_mul(2).max(512).next_power_of_two();
        let fix = format!(
            "{sysctl}.neigh.default.gc_thresh3={} {sysctl}.neigh.default.gc_thresh2={soft} {sysctl}.neigh.default.gc_thresh1={}",
            soft.saturating_mul(2),
            soft / 4
        );
        if need >= limit {
            fail.push((
                format!(
                    "{need} peer addresses on this node's links need {family} neighbour entries, more than the table's limit of {limit}{overflowed}: packets to the peers beyond it are dropped"
                ),
                fix,
            ));
        } else if need >= soft_limit {
            warn.push((
                format!(
                    "{need} peer addresses on this node's links need {family} neighbour entries, above the table's soft limit of {soft_limit} (hard limit {limit}){overflowed}: the kernel keeps evicting and resolving them again"
                ),
                fix,
            ));
        } else {
            ok.push(format!(
                "{family}: {need} on-link peer addresses, limit {limit}{overflowed}"
            ));
        }
    }
    let fix = |items: &[(String, String)]| {
        format!(
            "raise the limits: sysctl -w {} (persist it: /etc/sysctl.d, or Talos machine.sysctls)",
            items
                .iter()
                .map(|(_, fix)| fix.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let message = |items: &[(String, String)]| {
        items
            .iter()
            .map(|(m, _)| m.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !fail.is_empty() {
        let all: Vec<_> = fail.iter().chain(&warn).cloned().collect();
        return Finding::fail(C, message(&all), fix(&all));
    }
    if !warn.is_empty() {
        return Finding::warn(C, message(&warn), fix(&warn));
    }
    if ok.is_empty() {
        return Finding::skip(
            C,
            "cannot read the neighbour table limits (in a network namespace they are the host's)",
        );
    }
    Finding::ok(C, ok.join("; "))
}

/// TLS errors a wrong clock causes, as rustls and Go word them.
const CLOCK_WORDS: [&str; 5] = [
    "notvalidyet",
    "not yet valid",
    "expired",
    "certificate has expired",
    "clock",
];

/// A clock this far off (from the nearest time source) fails: meshd answers a probe only when its
/// timestamp is within 30 s of its own clock (`WINDOW` in crates/meshd/src/probe.rs), so two nodes off by
/// 15 s the opposite ways already see each other down. TLS certificate validity (a node behind by more
/// than a certificate's age cannot connect to the discovery service or a freshly rotated API server) and
/// the discovery service's 30-minute record TTL break only later.
pub const SKEW_FAIL_MS: u64 = 15_000;
/// A clock this far off warns: a synchronised clock is within milliseconds, so no time sync runs, and an
/// unsynchronised clock drifts on (seconds a day) until it reaches [`SKEW_FAIL_MS`].
pub const SKEW_WARN_MS: u64 = 2_000;

const CLOCK_FIX: &str = "enable time synchronisation: Talos: machine.time (on by default; `talosctl time` shows the offset, and the servers in machine.time.servers must be reachable on UDP 123); elsewhere `timedatectl set-ntp true` (systemd-timesyncd) or chrony; meshd reconnects on its own";

/// The clock against the time sources, then against meshd's peers: their probe pongs carry their clocks,
/// and two nodes 30 s apart refuse each other's probes (`clockOffsetMs` in meshd's status).
fn clock(f: &Facts) -> Finding {
    let peers: Vec<(&str, i64)> = live_details(f, "meshd")
        .and_then(|(d, _)| d["peers"].as_array())
        .map(|ps| {
            ps.iter()
                .filter_map(|p| Some((p["name"].as_str()?, p["clockOffsetMs"].as_i64()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut finding = clock_by_sources(f);
    if let Some(m) = finding.measured.as_mut() {
        m["peers"] = peers
            .iter()
            .map(|(name, ms)| ((*name).to_owned(), Value::from(*ms)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    let Some((name, worst)) = peers.iter().max_by_key(|(_, ms)| ms.unsigned_abs()) else {
        return finding;
    };
    let off = worst.unsigned_abs();
    if off > SKEW_WARN_MS && finding.verdict < Verdict::Warn {
        finding.verdict = Verdict::Warn;
        finding.message = format!(
            "meshd peer {name}'s clock is {} {} this node's (its probe pongs): 30 s apart, each refuses the other's probes and they see each other down",
            seconds(off),
            if *worst > 0 { "ahead of" } else { "behind" }
        );
        finding.fix = Some(format!(
            "{CLOCK_FIX}; on whichever of the two is off (run doctor on {name} too)"
        ));
    } else if finding.verdict <= Verdict::Ok {
        finding.verdict = Verdict::Ok;
        finding.message = format!(
            "{}; {} meshd peers' clocks within {} of ours (probe pongs)",
            finding.message,
            peers.len(),
            seconds(off)
        );
    }
    finding
}

fn clock_by_sources(f: &Facts) -> Finding {
    const C: &str = "clock";
    let registries = live_details(f, "meshd")
        .and_then(|(d, _)| d["discovery"]["registries"].as_array())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let measured = clock_measured(&f.clock);
    // Direct evidence first: a registry failing on certificate validity.
    for r in registries {
        let error = r["error"].as_str().unwrap_or("").to_lowercase();
        if CLOCK_WORDS.iter().any(|w| error.contains(w)) {
            return Finding::fail(
                C,
                format!(
                    "discovery registry {} fails on certificate validity ({}): this node's clock is off",
                    r["endpoint"].as_str().unwrap_or("?"),
                    r["error"].as_str().unwrap_or("")
                ),
                CLOCK_FIX,
            )
            .with_measured(measured);
        }
    }
    let best = f
        .clock
        .iter()
        .filter_map(|m| m.offset.as_ref().ok().map(|o| (m.source.as_str(), *o)))
        .min_by_key(|(_, o)| o.at_least_ms());
    let Some((source, offset)) = best else {
        let why = f
            .clock
            .iter()
            .map(|m| {
                format!(
                    "{}: {}",
                    m.source,
                    m.offset.as_ref().err().map_or("", String::as_str)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let asked = if why.is_empty() {
            "no time source to ask".to_owned()
        } else {
            format!("no time source gave its time ({why})")
        };
        if registries.is_empty() {
            return Finding::skip(C, asked).with_measured(measured);
        }
        let watching = registries
            .iter()
            .filter(|r| r["state"] == "watching")
            .count();
        return Finding::ok(
            C,
            format!(
                "{watching} of {} discovery registries watching, no certificate-time error; {asked}",
                registries.len()
            ),
        )
        .with_measured(measured);
    };
    let others = f.clock.iter().filter(|m| m.offset.is_ok()).count() - 1;
    let against = if others == 0 {
        source.to_owned()
    } else {
        format!("{source}, the nearest of {} time sources", others + 1)
    };
    let off = offset.at_least_ms();
    let direction = if offset.estimate_ms() > 0 {
        "behind"
    } else {
        "ahead of"
    };
    let said = format!(
        "this node's clock is {} {direction} {against} (offset {})",
        seconds(offset.estimate_ms().unsigned_abs()),
        signed(offset)
    );
    if off > SKEW_FAIL_MS {
        Finding::fail(
            C,
            format!(
                "{said}: meshd's peers refuse probes stamped more than 30 s from their own clocks (their peers go down), and TLS to the discovery service and API servers fails once certificates are not valid at this time"
            ),
            CLOCK_FIX,
        )
        .with_measured(measured)
    } else if off > SKEW_WARN_MS {
        Finding::warn(
            C,
            format!(
                "{said}: no time synchronisation keeps it right; at {} s meshd's peers start refusing its probes",
                SKEW_FAIL_MS / 1000
            ),
            CLOCK_FIX,
        )
        .with_measured(measured)
    } else {
        Finding::ok(
            C,
            format!("clock agrees with {against} (offset {})", signed(offset)),
        )
        .with_measured(measured)
    }
}

/// `+1.2 s ± 0.3 s` (positive: our clock is behind the source's).
fn signed(o: crate::skew::Offset) -> String {
    let est = o.estimate_ms();
    let sign = if est < 0 { '-' } else { '+' };
    let tenths = |ms: u64| {
        let t = ms.saturating_add(50) / 100;
        format!("{}.{}", t / 10, t % 10)
    };
    format!(
        "{sign}{} s ± {} s",
        tenths(est.unsigned_abs()),
        tenths(o.uncertainty_ms())
    )
}

/// `0.4 s`, `75 s`, `600 s (10 min)`, rounded.
fn seconds(ms: u64) -> String {
    if ms < 9_950 {
        let tenths = ms.saturating_add(50) / 100;
        format!("{}.{} s", tenths / 10, tenths % 10)
    } else if ms < 119_500 {
        format!("{} s", ms.saturating_add(500) / 1000)
    } else {
        format!(
            "{} s ({} min)",
            ms.saturating_add(500) / 1000,
            ms.saturating_add(30_000) / 60_000
        )
    }
}

/// The clock check's `measured`: each source's offset bounds (or error), and the nearest one's estimate.
fn clock_measured(readings: &[crate::skew::Measured]) -> Value {
    let best = readings
        .iter()
        .filter_map(|m| m.offset.as_ref().ok().map(|o| (m, *o)))
        .min_by_key(|(_, o)| o.at_least_ms());
    let ms = |v: i64| v as f64 / 1000.0;
    serde_json::json!({
        "offsetSeconds": best.map(|(_, o)| ms(o.estimate_ms())),
        "uncertaintySeconds": best.map(|(_, o)| o.uncertainty_ms() as f64 / 1000.0),
        "source": best.map(|(m, _)| m.source.clone()),
        "readings": readings.iter().map(|m| match &m.offset {
            Ok(o) => serde_json::json!({
                "source": m.source,
                "offsetSeconds": ms(o.estimate_ms()),
                "lowSeconds": ms(o.low_ms),
                "highSeconds": ms(o.high_ms),
            }),
            Err(e) => serde_json::json!({"source": m.source, "error": e}),
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests;

//! meshd `topology: location` in network namespaces, userspace backend (this kernel has no WireGuard
//! module): locations are LANs, a few nodes also have a public address and are gateway candidates.
//! Needs root; fails (never skips) without it.

use std::time::{Duration, Instant};

use hybridnet_integration::meshd::TcpFlow;
use hybridnet_integration::meshd::location::LocationLab;
use hybridnet_integration::wait_until;
use nix::sys::signal::Signal;

fn ping(lab: &LocationLab, from: usize, to: usize, timeout: Duration) {
    let dst = lab.nodes[to].mesh_ip().to_string();
    wait_until(
        timeout,
        format!(
            "{} to ping {}",
            lab.nodes[from].name(),
            lab.nodes[to].name()
        ),
        || lab.nodes[from].ping(&dst),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

fn path_of(lab: &LocationLab, from: usize, to: usize) -> Result<(String, String), String> {
    let row = lab.nodes[from].peer(&lab.nodes[to].name())?;
    Ok((
        row["path"].as_str().unwrap_or("-").to_owned(),
        row["via"].as_str().unwrap_or("-").to_owned(),
    ))
}

fn wait_path(lab: &LocationLab, from: usize, to: usize, path: &str, via: Option<&str>) {
    wait_until(
        Duration::from_secs(10),
        format!(
            "{} to reach {} {path} {via:?}",
            lab.nodes[from].name(),
            lab.nodes[to].name()
        ),
        || {
            let (p, v) = path_of(lab, from, to)?;
            if p == path && via.is_none_or(|w| w == v) {
                Ok(())
            } else {
                Err(format!("path {p} via {v}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn locations_native_inside_wireguard_across_gateway_failover_and_a_third_location() {
    let mut lab = LocationLab::new("meshd-topology");
    // loc1: node11 and node12 public (two gateway candidates), node13 private.
    // loc2: node21 public (its only gateway), node22 and node23 private.
    let mut all = lab.add_location(1, &[true, true, false]);
    all.extend(lab.add_location(2, &[true, false, false]));
    let mut daemons = lab.start_nodes(&all);
    let (n11, n12, n13) = (lab.pos(11), lab.pos(12), lab.pos(13));
    let (n21, n22, n23) = (lab.pos(21), lab.pos(22), lab.pos(23));

    let t0 = Instant::now();
    ping(&lab, n13, n23, Duration::from_secs(15));
    eprintln!(
        "private node13 reaches private node23 {:?} after the peer configs",
        t0.elapsed()
    );
    // Every pair, both ways, IPv4 mesh addresses.
    for &a in &all {
        for &b in all.iter().filter(|b| **b != a) {
            ping(&lab, a, b, Duration::from_secs(5));
        }
    }
    // Paths as the status shows them.
    wait_path(&lab, n13, n11, "native", Some(&lab.lan_ip(n11).to_string()));
    wait_path(&lab, n13, n12, "native", Some(&lab.lan_ip(n12).to_string()));
    wait_path(&lab, n11, n21, "direct", None);
    wait_path(&lab, n12, n21, "direct", None);
    wait_path(&lab, n11, n23, "gateway", Some("node21"));
    wait_path(&lab, n22, n11, "gateway", Some("node21"));
    let gw = lab
        .gateway_seen_by(n13, 1)
        .unwrap_or_else(|e| panic!("{e}"));
    let (gw_pos, standby) = if gw == "node11" {
        (n11, n12)
    } else {
        (n12, n11)
    };
    wait_path(&lab, n13, n23, "gateway", Some(&gw));
    // The path gauge: one series per peer, 1 for its current path (the other kinds have none).
    let paths = |i: usize, peer: &str| -> Vec<(String, f64)> {
        let d = &daemons[all.iter().position(|&k| k == i).unwrap_or(0)];
        let m = d.metrics().unwrap_or_else(|e| panic!("metrics: {e}"));
        let needle = format!("peer=\"{peer}\"");
        m.series("meshd_peer_path")
            .filter(|(l, _)| l.contains(&needle))
            .map(|(l, v)| (l.to_owned(), v))
            .collect()
    };
    for (i, peer, path) in [
        (n13, "node23", "gateway"),
        (n13, "node12", "native"),
        (n21, &*gw, "direct"),
    ] {
        wait_until(Duration::from_secs(3), "meshd_peer_path", || {
            let series = paths(i, peer);
            let on: Vec<&(String, f64)> = series.iter().filter(|(_, v)| *v == 1.0).collect();
            if series.len() == 1 && on.len() == 1 && on[0].0.contains(&format!("path=\"{path}\"")) {
                Ok(())
            } else {
                Err(format!("{}: {series:?}", lab.nodes[i].name()))
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // Every node that needs to know settles on the same gateway for loc1 (loc1's nodes and the other
    // locations' candidates; start-up may briefly differ: a candidate counts itself up before it has
    // heard from the candidates ordered before it). loc2's private nodes do not probe loc1 at all.
    wait_until(
        Duration::from_secs(5),
        "every node to pick the same gateway for loc1",
        || {
            for i in [n11, n12, n13, n21] {
                let g = lab.gateway_seen_by(i, 1)?;
                if g != gw {
                    return Err(format!(
                        "{} sees {g}, node13 sees {gw}",
                        lab.nodes[i].name()
                    ));
                }
            }
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // Native inside a location: the route is via the LAN address, and nothing enters WireGuard.
    let route = lab.route_get(n13, lab.nodes[n12].mesh_ip());
    let want = format!("via {} dev lan", lab.lan_ip(n12));
    assert!(
        route.contains(&want),
        "node13 -> node12: {route} (want {want})"
    );
    let route = lab.route_get(n11, lab.nodes[n12].mesh_ip());
    assert!(route.contains(&want), "gateway node11 -> node12: {route}");
    // nft counters of ICMP leaving by each interface, on both ends (the mesh interface also carries the
    // kernel's own IPv6 chatter, so its packet counters alone would not tell).
    for i in [n13, n12] {
        lab.count_icmp(i);
    }
    let out = lab.nodes[n13].netns.exec(&[
        "ping",
        "-c",
        "20",
        "-i",
        "0.05",
        "-W",
        "1",
        &lab.nodes[n12].mesh_ip().to_string(),
    ]);
    assert!(out.status.success(), "native ping node13 -> node12 failed");
    for i in [n13, n12] {
        let (lan, mesh) = lab.icmp_counts(i);
        eprintln!(
            "{}: ICMP packets out by lan {lan}, by hybridnet0 {mesh}",
            lab.nodes[i].name()
        );
        assert!(
            lan >= 20,
            "{}: the pings did not take the LAN ({lan})",
            lab.nodes[i].name()
        );
        assert_eq!(
            mesh,
            0,
            "{}: native traffic entered the mesh interface",
            lab.nodes[i].name()
        );
    }
    let row = lab.nodes[n13].details().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        row["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|p| p["rxBytes"] == 0 && p["txBytes"] == 0),
        "a private node has no WireGuard traffic at all: {row}"
    );

    // Across locations: via the LAN gateway, over WireGuard on the gateways.
    let route = lab.route_get(n13, lab.nodes[n23].mesh_ip());
    let want = format!("via {} dev lan", lab.lan_ip(gw_pos));
    assert!(
        route.contains(&want),
        "node13 -> node23: {route} (want {want})"
    );
    let route = lab.route_get(gw_pos, lab.nodes[n23].mesh_ip());
    assert!(route.contains("dev hybridnet0"), "{gw} -> node23: {route}");
    let wg_rx = || {
        lab.nodes[n21]
            .peer(&gw)
            .map(|r| r["rxBytes"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    let wg_before = wg_rx();
    ping(&lab, n13, n23, Duration::from_secs(2));
    wait_until(
        Duration::from_secs(3),
        "node21's WireGuard counter for loc1's gateway to move",
        || {
            let now = wg_rx();
            if now > wg_before {
                Ok(())
            } else {
                Err(format!("{wg_before} -> {now}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "node21's WireGuard rx from {gw}: {wg_before} -> {} bytes",
        wg_rx()
    );

    // The active gateway loses its WAN link only (its LAN side and meshd stay up: Kilo's leader would
    // black-hole its location): its pongs say it has no uplink, so node13 moves to the standby, as does
    // node21 (its probes to the gateway fail); a TCP stream survives. The WAN comes back: everyone returns.
    let standby_name = lab.nodes[standby].name();
    let via_lan = |i: usize| format!("via {} dev lan", lab.lan_ip(i));
    let flow = TcpFlow::start(
        &lab.nodes[n23].netns,
        &lab.nodes[n13].netns,
        lab.nodes[n23].mesh_ip(),
        7100,
    );
    std::thread::sleep(Duration::from_millis(500));
    let cut = Instant::now();
    lab.nodes[gw_pos].netns.ip(&["link", "set", "pub", "down"]);
    wait_until(
        Duration::from_secs(10),
        "node13 to leave the gateway without uplink",
        || {
            let r = lab.route_get(n13, lab.nodes[n23].mesh_ip());
            let remote = lab.gateway_seen_by(n21, 1)?;
            if r.contains(&via_lan(standby)) && remote == standby_name {
                Ok(())
            } else {
                Err(format!("{r}; node21 sees {remote}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let moved = cut.elapsed();
    ping(&lab, n13, n23, Duration::from_secs(5));
    lab.nodes[gw_pos].netns.ip(&["link", "set", "pub", "up"]);
    let back = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "everyone back on the first gateway",
        || {
            let r = lab.route_get(n13, lab.nodes[n23].mesh_ip());
            let remote = lab.gateway_seen_by(n21, 1)?;
            if r.contains(&via_lan(gw_pos)) && remote == gw {
                Ok(())
            } else {
                Err(format!("{r}; node21 sees {remote}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let returned = back.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (gap, echoes) = flow
        .finish()
        .unwrap_or_else(|e| panic!("the TCP stream broke when the gateway lost its WAN: {e}"));
    eprintln!(
        "{gw} lost its WAN link: loc1 moved to {standby_name} after {moved:?}; WAN back: returned after \
         {returned:?}; TCP stream {echoes} echoes, longest gap {gap:?}"
    );
    assert!(moved <= Duration::from_secs(5), "moved after {moved:?}");
    assert!(
        gap <= Duration::from_secs(5),
        "TCP stream stalled for {gap:?}"
    );

    // Kill the active gateway of loc1 (meshd SIGKILLed, links down) while a TCP stream runs from node13
    // to node23: loc1's traffic moves to the standby gateway within 5 s and the stream survives.
    let flow = TcpFlow::start(
        &lab.nodes[n23].netns,
        &lab.nodes[n13].netns,
        lab.nodes[n23].mesh_ip(),
        7101,
    );
    std::thread::sleep(Duration::from_millis(500));
    let kill = Instant::now();
    let gw_daemon = all
        .iter()
        .position(|&i| i == gw_pos)
        .unwrap_or_else(|| panic!("no daemon"));
    daemons[gw_daemon]
        .signal(Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    lab.unplug(gw_pos);
    let want = via_lan(standby);
    wait_until(
        Duration::from_secs(10),
        "node13 to route loc2 via the standby gateway",
        || {
            let r = lab.route_get(n13, lab.nodes[n23].mesh_ip());
            if r.contains(&want) { Ok(()) } else { Err(r) }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let routed = kill.elapsed();
    wait_until(
        Duration::from_secs(10),
        "node21 to use the standby gateway for loc1",
        || {
            let g = lab.gateway_seen_by(n21, 1)?;
            if g == standby_name { Ok(()) } else { Err(g) }
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let remote = kill.elapsed();
    ping(&lab, n13, n23, Duration::from_secs(5));
    let traffic = kill.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let (gap, echoes) = flow
        .finish()
        .unwrap_or_else(|e| panic!("the TCP stream broke across the gateway failover: {e}"));
    eprintln!(
        "gateway {gw} killed: node13's route moved after {routed:?}, node21 moved loc1 to {standby_name} after {remote:?}, \
         ping through after {traffic:?}; TCP stream: {echoes} echoes, longest gap {gap:?}"
    );
    assert!(
        routed <= Duration::from_secs(5),
        "route moved after {routed:?}"
    );
    assert!(
        remote <= Duration::from_secs(5),
        "remote gateway moved after {remote:?}"
    );
    assert!(
        gap <= Duration::from_secs(5),
        "TCP stream stalled for {gap:?}"
    );
    wait_path(&lab, standby, n23, "gateway", Some("node21"));
    wait_path(&lab, n22, n13, "gateway", Some("node21"));
    // Each move of loc1's active gateway (the WAN cut and its return, the kill) is counted where it was
    // decided: on the private node that moved (the `MeshdGatewayChanged` alert's metric).
    let changes: f64 = daemons[all.iter().position(|&i| i == n13).unwrap_or(0)]
        .metrics()
        .map(|m| m.value("meshd_gateway_changes_total"))
        .unwrap_or(f64::NAN);
    assert!(
        changes >= 2.0,
        "node13 counted {changes} changes of loc1's active gateway (a WAN cut and a kill happened)"
    );

    // A third location joins (configs reloaded everywhere) while a stream runs: nothing established is
    // disturbed, nobody is renumbered, and the new location is reachable from the private nodes.
    let ops_before = daemons[all.iter().position(|&i| i == n21).unwrap_or(0)]
        .metrics()
        .map(|m| m.value("meshd_wireguard_peer_ops_total"))
        .unwrap_or(f64::NAN);
    let flow = TcpFlow::start(
        &lab.nodes[n23].netns,
        &lab.nodes[n13].netns,
        lab.nodes[n23].mesh_ip(),
        7102,
    );
    std::thread::sleep(Duration::from_millis(500));
    let added = lab.add_location(3, &[true, false]);
    let t3 = Instant::now();
    daemons.extend(lab.start_nodes(&added));
    let (n31, n32) = (lab.pos(31), lab.pos(32));
    ping(&lab, n13, n32, Duration::from_secs(15));
    eprintln!(
        "node13 reaches node32 (a new location) {:?} after loc3 started",
        t3.elapsed()
    );
    for (a, b) in [
        (n23, n32),
        (n32, n13),
        (n31, n21),
        (standby, n31),
        (n22, n31),
    ] {
        ping(&lab, a, b, Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (gap, echoes) = flow
        .finish()
        .unwrap_or_else(|e| panic!("the TCP stream broke when loc3 joined: {e}"));
    let ops_after = daemons[all.iter().position(|&i| i == n21).unwrap_or(0)]
        .metrics()
        .map(|m| m.value("meshd_wireguard_peer_ops_total"))
        .unwrap_or(f64::NAN);
    eprintln!(
        "loc3 joined: TCP stream {echoes} echoes, longest gap {gap:?}; node21 WireGuard peer ops {ops_before} -> {ops_after}"
    );
    assert!(
        gap < Duration::from_secs(1),
        "the stream stalled {gap:?} when loc3 joined"
    );
    assert!(
        ops_after - ops_before <= 2.0,
        "node21 only adds loc3's gateway and then sets its endpoint when a probe answers; its peers for \
         loc1 are untouched: {ops_before} -> {ops_after}"
    );
    assert_eq!(
        lab.gateway_seen_by(n13, 1).as_deref(),
        Ok(standby_name.as_str())
    );
    wait_path(&lab, n21, n32, "gateway", Some("node31"));
}

/// `gateway: always` on the candidate that sorts second (its own `meshd.gateway` and its entry in every
/// other config): after the reload every node that needs to know uses it; `never` on the pinned one's
/// rival leaves it the only candidate; both pins removed, the key order decides again.
#[test]
fn gateway_pins_override_the_key_order() {
    let mut lab = LocationLab::new("meshd-topology-pins");
    let mut all = lab.add_location(1, &[true, true, false]);
    all.extend(lab.add_location(2, &[true, false]));
    let _daemons = lab.start_nodes(&all);
    let (n11, n12, n13, n21) = (lab.pos(11), lab.pos(12), lab.pos(13), lab.pos(21));
    ping(&lab, n13, lab.pos(22), Duration::from_secs(15));
    let first = wait_until(Duration::from_secs(5), "loc1's gateway", || {
        let a = lab.gateway_seen_by(n13, 1)?;
        let b = lab.gateway_seen_by(n21, 1)?;
        if a == b {
            Ok(a)
        } else {
            Err(format!("{a} vs {b}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let (first_pos, second) = if first == lab.nodes[n11].name() {
        (n11, n12)
    } else {
        (n12, n11)
    };
    let everyone_uses = |lab: &LocationLab, pos: usize| {
        let name = lab.nodes[pos].name();
        let want = format!("via {} dev lan", lab.lan_ip(pos));
        wait_until(
            Duration::from_secs(10),
            format!("loc1 to use {name}"),
            || {
                let r = lab.route_get(n13, lab.nodes[lab.pos(22)].mesh_ip());
                let remote = lab.gateway_seen_by(n21, 1)?;
                let own = lab.gateway_seen_by(first_pos, 1)?;
                if r.contains(&want) && remote == name && own == name {
                    Ok(())
                } else {
                    Err(format!(
                        "{r}; node21 sees {remote}; {} sees {own}",
                        lab.nodes[first_pos].name()
                    ))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    };
    let rewrite = |lab: &LocationLab| {
        for i in 0..lab.nodes.len() {
            lab.write_config(i);
        }
    };
    lab.places[second].gateway = Some("always");
    rewrite(&lab);
    everyone_uses(&lab, second);
    ping(&lab, n13, lab.pos(22), Duration::from_secs(5));
    lab.places[second].gateway = None;
    lab.places[first_pos].gateway = Some("never");
    rewrite(&lab);
    everyone_uses(&lab, second);
    lab.places[first_pos].gateway = None;
    rewrite(&lab);
    everyone_uses(&lab, first_pos);
    ping(&lab, n13, lab.pos(22), Duration::from_secs(5));
}

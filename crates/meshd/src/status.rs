//! What `meshd status` shows (the `details` of `status.json`) and `meshd/members.json`.

use std::fmt::Write as _;
use std::net::IpAddr;

use hybridnet_state::{Member, Members};
use serde_json::{Value, json};

use hybridnet_state::unix_now;

use crate::mesh::Mesh;
use crate::peer::PathState;
use crate::topology::PathKind;

fn ms(d: Option<std::time::Duration>) -> Value {
    d.map_or(Value::Null, |d| {
        json!((d.as_secs_f64() * 1e4).round() / 10.0)
    })
}

/// The summary line, the details but their peer table, and the peer table as JSON text (`with_peers`
/// joins them), given the plan the report made (`Mesh::planned`). Each peer's row is built as a `Value` and
/// written out at once: the whole table as `Value`s took about 7 KB per peer while it lasted (every
/// second), its text takes about 0.6 KB.
pub fn report(mesh: &Mesh, planned: &crate::plan::Desired) -> (String, Value, String) {
    let mut peers: Vec<&crate::mesh::Peer> = mesh.peers.values().collect();
    peers.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let paths = &planned.paths;
    let name_of = |k: &hybridnet_config::PublicKey| {
        if *k == mesh.public {
            "(this node)".to_owned()
        } else {
            mesh.peers
                .get(k)
                .map_or_else(|| k.to_string(), |p| p.spec.name.clone())
        }
    };
    let mut up = 0;
    let mut table = Vec::with_capacity(peers.len().saturating_mul(640) + 2);
    table.push(b'[');
    let rows = peers.iter().map(|p| {
            let m = &p.machine;
            let state = mesh.reported_state(p, paths).as_str();
            let (path, via) = match paths.get(&p.key) {
                Some(PathKind::Native { via }) => ("native", json!(via.to_string())),
                Some(PathKind::Gateway { via }) => ("gateway", json!(via.as_ref().map(name_of))),
                Some(PathKind::Relayed { via }) => ("relayed", json!(name_of(via))),
                Some(PathKind::Direct) | None => ("direct", Value::Null),
            };
            json!({
                "path": path,
                "via": via,
                // `probes` normally; `traffic` when only WireGuard traffic shows the peer alive.
                "liveness": if p.by_traffic() { "traffic" } else { "probes" },
                "name": p.spec.name,
                "publicKey": p.key.to_string(),
                "meshAddress": p.mesh_addr.to_string(),
                "state": state,
                "endpoint": p.endpoint().map(|e| e.to_string()),
                "handshakeMode": p.handshake_mode(),
                "rttMs": ms(m.active.and_then(|a| m.paths[a].rtt)),
                "failovers": m.failovers,
                "rxBytes": p.stats.rx_bytes,
                "txBytes": p.stats.tx_bytes,
                "handshakeAgeS": p.stats.last_handshake.map(|d| d.as_secs()),
                "lastSeen": p.last_seen_unix,
                // Its clock minus ours at its last version-3 pong (doctor's `clock` check reads it).
                "clockOffsetMs": p.clock_offset_ms,
                "source": p.spec.source.as_str(),
                // What the WireGuard device holds for the peer (read from the device).
                "allowedIPs": mesh.device_allowed(&p.key).into_iter().flatten().map(ToString::to_string).collect::<Vec<_>>(),
                "paths": m.paths.iter().map(|path| json!({
                    "endpoint": path.endpoint.to_string(),
                    "state": match path.state { PathState::Unknown => "unknown", PathState::Alive => "alive", PathState::Dead => "dead" },
                    "rttMs": ms(path.rtt),
                })).collect::<Vec<_>>(),
            })
        });
    for (i, row) in rows.enumerate() {
        if row["state"] == "up" {
            up += 1;
        }
        if i > 0 {
            table.push(b',');
        }
        // Writing a `Value` into a vector cannot fail (its keys are strings).
        let _ = serde_json::to_writer(&mut table, &row);
    }
    table.push(b']');
    let table = String::from_utf8(table).unwrap_or_else(|_| "[]".to_owned());
    let summary = format!(
        "{up}/{} peers up on {} ({}, {})",
        peers.len(),
        mesh.cfg.meshd.interface,
        mesh.backend.name(),
        mesh.mesh_addr
    );
    let details = json!({
        "interface": mesh.cfg.meshd.interface,
        "backend": mesh.backend.name(),
        "publicKey": mesh.public.to_string(),
        "meshAddress": mesh.mesh_addr.to_string(),
        "meshPrefix": mesh.prefix.to_string(),
        "listenPort": mesh.cfg.meshd.listen_port,
        "mtu": mesh.mtu,
        "error": mesh.last_error,
        "mssClamp": {
            "enabled": mesh.cfg.meshd.clamp_mss,
            "error": mesh.clamp_error,
        },
    });
    let mut details = details;
    let nat = mesh.nat();
    details["nat"] = json!({
        "type": nat.kind.as_str(),
        "reflexive": nat.reflexive.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "announced": mesh.reflexive_endpoints().iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    // Prefixes two peers claim: one holds it (see `plan`), the others do without.
    details["prefixConflicts"] = planned
        .conflicts
        .iter()
        .map(|c| {
            json!({
                "prefix": c.prefix.to_string(),
                "holder": name_of(&c.holder),
                "without": c.losers.iter().map(name_of).collect::<Vec<_>>(),
            })
        })
        .collect();
    details["relay"] = relay(mesh, &name_of);
    // Prefixes of discovered peers the trust screen refused (see `plan::trust`).
    details["refusedPrefixes"] = crate::mesh::trust::rows(mesh, &planned.refused);
    if let Some(plan) = &mesh.plan {
        let layout = &planned;
        details["topology"] = json!({
            "location": plan.location,
            "gatewayCandidate": plan.candidate,
            "gateways": layout.gateways.iter().map(|(loc, g)| (loc.clone(), json!(g.as_ref().map(name_of)))).collect::<serde_json::Map<String, Value>>(),
        });
    }
    (summary, details, table)
}

/// The details with the peer table (`report`'s text) as their `peers`, as JSON text for the status
/// record.
pub fn with_peers(
    details: &Value,
    peers: String,
) -> Result<Box<serde_json::value::RawValue>, serde_json::Error> {
    use serde::ser::{SerializeMap as _, Serializer as _};
    let peers = serde_json::value::RawValue::from_string(peers)?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    let fields = details.as_object();
    let mut map = ser.serialize_map(None)?;
    for (k, v) in fields.into_iter().flatten() {
        if k != "peers" {
            map.serialize_entry(k, v)?;
        }
    }
    map.serialize_entry("peers", &peers)?;
    map.end()?;
    drop(peers);
    let text = String::from_utf8(out).map_err(serde::ser::Error::custom)?;
    serde_json::value::RawValue::from_string(text)
}

/// End-to-end encrypted relaying: the allocations this node holds on its relays (`grants`), and as a
/// relay (public, `relay: auto`) the allocations it holds for others and what it forwarded and dropped.
fn relay(mesh: &Mesh, name_of: &dyn Fn(&hybridnet_config::PublicKey) -> String) -> Value {
    let now = std::time::Instant::now();
    let grants: Vec<Value> = mesh
        .relaying
        .views(now)
        .iter()
        .map(|v| {
            json!({
                "peer": name_of(&v.peer),
                "relay": name_of(&v.relay),
                "endpoint": v.endpoint.map(|e| e.to_string()),
                "expiresInS": v.expires_in.map(|d| d.as_secs()),
                "refused": v.refused.map(crate::probe::AllocResult::as_str),
                // The relayed path, probed end to end through the relay.
                "path": v.endpoint.map(|_| v.path.as_str()),
                "rttMs": ms(v.rtt),
            })
        })
        .collect();
    // Relays passed over for a peer: their relayed path died (no pongs) or carried no handshake.
    let excluded: Vec<Value> = mesh
        .relaying
        .exclusions(now)
        .iter()
        .map(|x| {
            json!({
                "peer": name_of(&x.peer),
                "relay": name_of(&x.relay),
                "reason": x.reason.as_str(),
                "leftS": x.left.as_secs(),
            })
        })
        .collect();
    let (stats, rows) = mesh.forwarder().snapshot();
    let allocations: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "parties": [name_of(&r.pair.0), name_of(&r.pair.1)],
                "ports": r.ports,
                "addresses": r.addrs.iter().map(|a| a.map(|a| a.to_string())).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "relays": mesh.relays_for_others(),
        "grants": grants,
        "excluded": excluded,
        "allocations": allocations,
        "openPorts": mesh.forwarder().open_ports(),
        "forwardedPackets": stats.forwarded_packets,
        "forwardedBytes": stats.forwarded_bytes,
        "dropped": stats.dropped,
        "requests": stats.requests,
    })
}

/// The peer table for `meshd status`.
pub fn render(details: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "interface {} ({})  mesh {}  port {}  mtu {}\npublic key {}",
        s(&details["interface"]),
        s(&details["backend"]),
        s(&details["meshAddress"]),
        details["listenPort"],
        details["mtu"],
        s(&details["publicKey"]),
    );
    if let Some(t) = details["topology"].as_object() {
        let gateways: Vec<String> = t["gateways"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(loc, g)| format!("{loc}={}", g.as_str().unwrap_or("-")))
            .collect();
        let _ = writeln!(
            out,
            "location {}{}  gateways {}",
            t["location"].as_str().unwrap_or("-"),
            if t["gatewayCandidate"] == true {
                " (gateway candidate)"
            } else {
                ""
            },
            gateways.join(" ")
        );
    }
    if let Some(e) = details["error"].as_str() {
        let _ = writeln!(out, "last error: {e}");
    }
    if let Some(e) = details["mssClamp"]["error"].as_str() {
        let _ = writeln!(out, "MSS clamping failed: {e}");
    } else if details["mssClamp"]["enabled"] == false {
        let _ = writeln!(out, "MSS clamping off (clampMSS: false)");
    }
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<8} {:<28} {:>8} {:>5} {:>12} {:>12}  paths",
        "PEER", "STATE", "PATH", "ENDPOINT", "RTT ms", "FAIL", "RX", "TX"
    );
    for p in details["peers"].as_array().into_iter().flatten() {
        let paths: Vec<String> = p["paths"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{}={}", s(&x["endpoint"]), s(&x["state"])))
            .collect();
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<8} {:<28} {:>8} {:>5} {:>12} {:>12}  {}",
            s(&p["name"]),
            if p["handshakeMode"] == true {
                format!("{}(hs)", s(&p["state"]))
            } else {
                s(&p["state"])
            },
            s(&p["path"]),
            match (p["path"].as_str(), p["via"].as_str()) {
                (Some("gateway" | "relayed"), Some(via)) => format!("via {via}"),
                _ => p["endpoint"].as_str().unwrap_or("-").to_owned(),
            },
            p["rttMs"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.1}")),
            p["failovers"].to_string(),
            p["rxBytes"].to_string(),
            p["txBytes"].to_string(),
            paths.join(" "),
        );
    }
    let relay = &details["relay"];
    for g in relay["grants"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "relayed {} via {}: {}",
            s(&g["peer"]),
            s(&g["relay"]),
            match (g["endpoint"].as_str(), g["refused"].as_str()) {
                (Some(e), _) => match g["path"].as_str() {
                    Some(path) if path != "unknown" => {
                        format!("relay port {e}, {}s left, path {path}", g["expiresInS"])
                    }
                    _ => format!("relay port {e}, {}s left", g["expiresInS"]),
                },
                (None, Some(why)) => format!("refused ({why})"),
                (None, None) => "asking".to_owned(),
            }
        );
    }
    for x in relay["excluded"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "relay {} left for {}: path {}, held {}s more{}",
            s(&x["relay"]),
            s(&x["peer"]),
            s(&x["reason"]),
            x["leftS"],
            if x["leftS"] == 0 {
                " (and while relayed through another)"
            } else {
                ""
            }
        );
    }
    if relay["relays"] == true || relay["forwardedPackets"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "relay for others: {} allocations, {} ports, forwarded {} datagrams ({} bytes), dropped {}",
            relay["allocations"].as_array().map_or(0, Vec::len),
            relay["openPorts"],
            relay["forwardedPackets"],
            relay["forwardedBytes"],
            relay["dropped"],
        );
    }
    for r in details["refusedPrefixes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "refused {} from {} ({})",
            s(&r["prefix"]),
            s(&r["peer"]),
            s(&r["reason"]),
        );
    }
    for r in details["discovery"]["registries"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let mut line = format!(
            "registry {}: {}, {} affiliates, {} reconnects",
            s(&r["endpoint"]),
            s(&r["state"]),
            r["affiliates"],
            r["reconnects"],
        );
        for (key, label) in [("relists", "relists"), ("watchRestarts", "watch restarts")] {
            if let Some(n) = r[key].as_u64() {
                let _ = write!(line, ", {n} {label}");
            }
        }
        if let Some(e) = r["error"].as_str() {
            let _ = write!(line, "; last error: {e}");
        }
        let _ = writeln!(out, "{line}");
    }
    out
}

/// This node's name (the kernel hostname).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// `meshd/members.json`: this node and every peer. `own_addresses` are this node's underlay addresses.
pub fn members(mesh: &Mesh, own_addresses: Vec<IpAddr>) -> Members {
    let cluster = &mesh.cfg.cluster;
    let mut members = vec![Member {
        name: hostname(),
        node_id: None,
        addresses: own_addresses,
        mesh_address: Some(IpAddr::V6(mesh.mesh_addr)),
        location: mesh.cfg.meshd.location.clone(),
        control_plane: cluster.machine_type.is_control_plane(),
        api_server_port: cluster
            .machine_type
            .is_control_plane()
            .then_some(cluster.local_api_server_port),
        last_seen: unix_now(),
    }];
    let mut peers: Vec<&crate::mesh::Peer> = mesh.peers.values().collect();
    peers.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    for p in peers {
        let mut addresses: Vec<IpAddr> = p.spec.addresses.clone();
        for path in &p.machine.paths {
            if !addresses.contains(&path.endpoint.ip()) {
                addresses.push(path.endpoint.ip());
            }
        }
        members.push(Member {
            name: p.spec.name.clone(),
            node_id: p.spec.node_id.clone(),
            addresses,
            mesh_address: Some(IpAddr::V6(p.mesh_addr)),
            location: p.spec.location.clone(),
            control_plane: p.spec.api_server_port.is_some(),
            api_server_port: p.spec.api_server_port,
            last_seen: p.last_seen_unix,
        });
    }
    Members { members }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer table written apart (`report`) is the details' `peers` in the record, the rest unchanged.
    #[test]
    fn the_peer_table_joins_the_details_as_their_peers() {
        let details =
            json!({"interface": "hn0", "error": null, "nat": {"type": "none"}, "peers": "stale"});
        let table =
            r#"[{"name":"a","state":"up","rttMs":1.5},{"name":"b","state":"down","rttMs":null}]"#;
        let json = with_peers(&details, table.to_owned()).unwrap_or_else(|e| panic!("{e}"));
        let read: Value = serde_json::from_str(json.get()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read,
            json!({
                "interface": "hn0", "error": null, "nat": {"type": "none"},
                "peers": [{"name": "a", "state": "up", "rttMs": 1.5}, {"name": "b", "state": "down", "rttMs": null}],
            })
        );
        assert!(with_peers(&details, "[{".to_owned()).is_err(), "not JSON");
    }

    #[test]
    fn render_shows_paths_gateways_and_relays() {
        let details = json!({
            "interface": "hybridnet0", "backend": "userspace", "meshAddress": "fd00::1", "listenPort": 51821,
            "mtu": 1420, "publicKey": "k",
            "topology": {"location": "loc1", "gatewayCandidate": false, "gateways": {"loc1": "node11", "loc2": null}},
            "peers": [
                {"name": "node11", "state": "up", "path": "native", "via": "192.168.1.11", "endpoint": "192.168.1.11:51821", "rttMs": 0.2, "failovers": 0, "rxBytes": 0, "txBytes": 0, "paths": []},
                {"name": "node23", "state": "up", "path": "gateway", "via": "node11", "endpoint": null, "rttMs": null, "failovers": 0, "rxBytes": 0, "txBytes": 0, "paths": []},
                {"name": "node5", "state": "up", "path": "relayed", "via": "node1", "endpoint": null, "rttMs": null, "failovers": 0, "rxBytes": 0, "txBytes": 0, "paths": []},
            ],
            "refusedPrefixes": [{"peer": "node5", "prefix": "0.0.0.0/0", "reason": "default-route"}],
            "relay": {
                "relays": true, "openPorts": 2, "forwardedPackets": 7, "forwardedBytes": 700,
                "dropped": {"no-consent": 3},
                "allocations": [{"parties": ["node3", "node4"], "ports": [40001, 40002], "addresses": [null, null]}],
                "grants": [
                    {"peer": "node5", "relay": "node1", "endpoint": "198.51.100.11:40001", "expiresInS": 52, "refused": null},
                    {"peer": "node6", "relay": "node1", "endpoint": null, "expiresInS": null, "refused": "not-relay"},
                ],
                "excluded": [
                    {"peer": "node5", "relay": "node2", "reason": "no-handshake", "leftS": 287},
                    {"peer": "node7", "relay": "node2", "reason": "dead", "leftS": 0},
                ],
            },
        });
        let out = render(&details);
        assert!(
            out.contains("relayed node5 via node1: relay port 198.51.100.11:40001, 52s left"),
            "{out}"
        );
        assert!(
            out.contains("relayed node6 via node1: refused (not-relay)"),
            "{out}"
        );
        assert!(
            out.contains("relay node2 left for node5: path no-handshake, held 287s more\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "relay node2 left for node7: path dead, held 0s more (and while relayed through another)"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "relay for others: 1 allocations, 2 ports, forwarded 7 datagrams (700 bytes)"
            ),
            "{out}"
        );
        assert!(
            out.contains("location loc1  gateways loc1=node11 loc2=-"),
            "{out}"
        );
        assert!(out.contains("PATH"), "{out}");
        let line = |name: &str| {
            out.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            line("node11").contains("native   192.168.1.11:51821"),
            "{out}"
        );
        assert!(line("node23").contains("gateway  via node11"), "{out}");
        assert!(line("node5").contains("relayed  via node1"), "{out}");
        assert!(
            out.contains("refused 0.0.0.0/0 from node5 (default-route)"),
            "{out}"
        );
    }
}

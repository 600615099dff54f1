//! The per-peer metrics, rendered at each scrape from one compact row per peer.
//!
//! Kept as prometheus-client families, the eight per-peer series cost about 1.2 KiB a peer: each series
//! owns its label strings in a map slot of its family, and at 5,000 peers that is 40,000 series. A row
//! here is 72 bytes: the values and a shared pointer to the peer's spec (its name and key); the series are
//! written only when Prometheus asks. The rows are one vector sorted by name and key, rebuilt at each
//! report. Names are unique in the output: of two peers with one name only the one with the smaller key
//! is written, as the families merged such peers into one series.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use hybridnet_config::PublicKey;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::model::PeerSpec;

/// The path kinds a row's `path` indexes (`meshd_peer_path`'s label values).
pub const PATHS: [&str; 4] = ["native", "direct", "gateway", "relayed"];

/// A value a row does not have (an RTT before the first pong, a handshake age the backend does not
/// report): written as NaN.
pub const NONE: u32 = u32::MAX;

/// One peer's values, as the last report left them.
#[derive(Clone, Debug)]
pub struct PeerRow {
    pub spec: Arc<PeerSpec>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub active_endpoint: Option<SocketAddr>,
    /// Counted over the process's life, across re-created meshes (config changes).
    pub failovers: u32,
    /// Microseconds, or [`NONE`].
    pub rtt_us: u32,
    /// Seconds, or [`NONE`].
    pub handshake_age_s: u32,
    /// 0 unknown, 1 up, 2 down (as `meshd status` shows it).
    pub state: u8,
    /// An index into [`PATHS`].
    pub path: u8,
}

impl PeerRow {
    fn order(&self) -> (&str, &PublicKey) {
        (&self.spec.name, &self.spec.key)
    }
}

/// The rows, shared by the mesh (which replaces them at each report) and the registry (which reads them
/// at each scrape).
#[derive(Clone, Debug, Default)]
pub struct PeerTable(Arc<Mutex<Vec<PeerRow>>>);

impl PeerTable {
    /// Replaces the rows with `rows` (any order); each carries over the failovers its peer counted
    /// before, plus the new ones in its own `failovers`.
    pub fn replace(&self, mut rows: Vec<PeerRow>) {
        rows.sort_by(|a, b| a.order().cmp(&b.order()));
        rows.shrink_to_fit();
        let mut table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for row in &mut rows {
            if let Ok(i) = table.binary_search_by(|old| old.order().cmp(&row.order())) {
                row.failovers = row.failovers.saturating_add(table[i].failovers);
            }
        }
        *table = rows;
    }

    /// Forgets a peer that is gone: every series of it goes.
    pub fn remove(&self, key: &PublicKey) {
        let mut table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        table.retain(|r| r.spec.key != *key);
    }
}

/// Writes one metric family: the descriptor, then a series per row that has one.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[&PeerRow],
    series: impl Fn(&PeerRow) -> Option<(L, M)>,
    metric_type: prometheus_client::metrics::MetricType,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for row in rows {
        if let Some((labels, value)) = series(row) {
            value.encode(metric.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for PeerTable {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType::{Counter, Gauge};
        let rows = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut sorted: Vec<&PeerRow> = rows.iter().collect();
        sorted.dedup_by(|a, b| a.spec.name == b.spec.name);
        let nan_or = |v: u32, scale: f64| {
            if v == NONE {
                f64::NAN
            } else {
                f64::from(v) / scale
            }
        };
        let peer = |r: &PeerRow| [("peer", r.spec.name.clone())];
        let e = &mut encoder;
        family(
            e,
            "peer_state",
            "Peer state as meshd status shows it (through its gateway or relay where it has one): 0 unknown, 1 up, 2 down.",
            &sorted,
            |r| Some((peer(r), ConstGauge::new(i64::from(r.state)))),
            Gauge,
        )?;
        family(
            e,
            "peer_rtt_seconds",
            "Smoothed probe RTT of the peer's active path.",
            &sorted,
            |r| Some((peer(r), ConstGauge::new(nan_or(r.rtt_us, 1e6)))),
            Gauge,
        )?;
        family(
            e,
            "peer_handshake_age_seconds",
            "Age of the last WireGuard handshake, when the backend reports it.",
            &sorted,
            |r| Some((peer(r), ConstGauge::new(nan_or(r.handshake_age_s, 1.0)))),
            Gauge,
        )?;
        let bytes = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        family(
            e,
            "peer_rx_bytes",
            "Bytes received from the peer (WireGuard counter).",
            &sorted,
            |r| Some((peer(r), bytes(r.rx_bytes))),
            Gauge,
        )?;
        family(
            e,
            "peer_tx_bytes",
            "Bytes sent to the peer (WireGuard counter).",
            &sorted,
            |r| Some((peer(r), bytes(r.tx_bytes))),
            Gauge,
        )?;
        // Every peer's series from its first report, at 0: a counter that appears only at its first
        // increment hides that increment from `increase()` (the MeshdPathFailover alert).
        family(
            e,
            "peer_failovers",
            "Switches away from a dead active path.",
            &sorted,
            |r| Some((peer(r), ConstCounter::new(u64::from(r.failovers)))),
            Counter,
        )?;
        family(
            e,
            "peer_active_endpoint",
            "1 for the endpoint in use.",
            &sorted,
            |r| {
                let endpoint = r.active_endpoint?.to_string();
                Some((
                    [("peer", r.spec.name.clone()), ("endpoint", endpoint)],
                    ConstGauge::new(1i64),
                ))
            },
            Gauge,
        )?;
        family(
            e,
            "peer_path",
            "1 for the path the peer takes now: native, direct, gateway or relayed.",
            &sorted,
            |r| {
                let path = PATHS.get(usize::from(r.path))?;
                Some((
                    [("peer", r.spec.name.clone()), ("path", (*path).to_owned())],
                    ConstGauge::new(1i64),
                ))
            },
            Gauge,
        )?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Source;

    fn row(key: PublicKey, name: &str, state: u8, endpoint: Option<&str>) -> PeerRow {
        PeerRow {
            spec: Arc::new(PeerSpec {
                name: name.to_owned(),
                key,
                candidates: Vec::new(),
                allowed_ips: Vec::new(),
                mesh_address: None,
                location: None,
                source: Source::Static,
                node_id: None,
                addresses: Vec::new(),
                api_server_port: None,
                refused: Vec::new(),
            }),
            rx_bytes: 100,
            tx_bytes: 200,
            active_endpoint: endpoint.map(|e| e.parse().unwrap()),
            failovers: 0,
            rtt_us: NONE,
            handshake_age_s: 3,
            state,
            path: 1,
        }
    }

    #[test]
    fn rows_render_as_the_series_the_families_wrote_and_go_with_their_peer() {
        let registry = hybridnet_runtime::SharedRegistry::default();
        let m = crate::metrics::Metrics::register(&registry);
        let (a, b, c) = (PublicKey([1; 32]), PublicKey([2; 32]), PublicKey([3; 32]));
        let mut up = row(a, "node2", 1, Some("192.0.2.12:51821"));
        up.rtt_us = 1500;
        up.failovers = 1;
        let mut relayed = row(b, "node3", 2, None);
        relayed.path = 3;
        // Another key under a name already written: one series per name (the smaller key's), as the
        // families kept.
        let twin = row(c, "node2", 0, None);
        m.peer_table
            .replace(vec![twin.clone(), relayed.clone(), up.clone()]);
        // The next report: failovers add up (2 new ones for node2).
        up.failovers = 2;
        m.peer_table.replace(vec![up, relayed, twin]);
        let text = registry.encode();
        for line in [
            "# TYPE meshd_peer_state gauge",
            r#"meshd_peer_state{peer="node2"} 1"#,
            r#"meshd_peer_state{peer="node3"} 2"#,
            r#"meshd_peer_rtt_seconds{peer="node2"} 0.0015"#,
            r#"meshd_peer_rtt_seconds{peer="node3"} NaN"#,
            r#"meshd_peer_handshake_age_seconds{peer="node3"} 3.0"#,
            r#"meshd_peer_state{peer="node2"} 1"#,
            r#"meshd_peer_rx_bytes{peer="node2"} 100"#,
            r#"meshd_peer_tx_bytes{peer="node2"} 200"#,
            "# TYPE meshd_peer_failovers counter",
            r#"meshd_peer_failovers_total{peer="node2"} 3"#,
            r#"meshd_peer_failovers_total{peer="node3"} 0"#,
            r#"meshd_peer_active_endpoint{peer="node2",endpoint="192.0.2.12:51821"} 1"#,
            r#"meshd_peer_path{peer="node2",path="direct"} 1"#,
            r#"meshd_peer_path{peer="node3",path="relayed"} 1"#,
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in\n{text}");
        }
        assert_eq!(
            text.matches("meshd_peer_state{peer=\"node2\"}").count(),
            1,
            "{text}"
        );
        assert!(!text.contains("meshd_peer_active_endpoint{peer=\"node3\""));
        // A peer that is gone takes every series with it.
        m.peer_table.remove(&b);
        assert!(!registry.encode().contains("node3"));
    }
}

//! meshd's metrics (prefix `meshd_`), per peer where it matters (those in [`PeerTable`]).

use std::sync::atomic::AtomicU64;

use hybridnet_runtime::SharedRegistry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

pub mod peers;

pub use peers::{PeerRow, PeerTable};

type Labels = Vec<(String, String)>;

/// Registered once per process (a re-created mesh after a config change reuses them).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// The per-peer series (state, RTT, handshake age, counters, failovers, active endpoint, path),
    /// rendered at each scrape from one row per peer.
    pub peer_table: PeerTable,
    pub peers: Gauge,
    pub peers_up: Gauge,
    pub reconciles: Counter,
    /// Duration of the last reconcile pass.
    pub reconcile_seconds: Gauge<f64, AtomicU64>,
    /// Duration of the last reconcile pass triggered by a change (no device or route dump).
    pub reconcile_change_seconds: Gauge<f64, AtomicU64>,
    pub reconcile_errors: Counter,
    pub wireguard_peer_ops: Counter,
    pub route_changes: Counter,
    pub probes_sent: Counter,
    pub probes_answered: Counter,
    pub probes_rejected: Counter,
    /// Pings from peers answered with a pong (the other half of the probe packets).
    pub pings_answered: Counter,
    /// Peers by how closely they are probed (`need`: fast, gateway, traffic, slow).
    pub peers_probing: Family<Labels, Gauge>,
    /// Peers that carried traffic within the busy hold (their paths are watched by WireGuard's counters).
    pub peers_busy: Gauge,
    /// Readings of WireGuard's counters that counted as liveness evidence.
    pub counter_reads: Counter,
    /// Probe datagrams that got no answer or were not taken, by reason (`malformed`, `unknown` sender,
    /// `throttled` before the HMAC, `mac`, `untargeted`, `stale`, `replayed`, `full`, `unbound` pong).
    pub probes_dropped: Family<Labels, Counter>,
    /// Peers by source (`static`, `discovery`, `cache`).
    pub peers_by_source: Family<Labels, Gauge>,
    /// Per discovery registry: 1 while its watch is live.
    pub discovery_registry_up: Family<Labels, Gauge>,
    pub discovery_affiliates: Family<Labels, Gauge>,
    /// Unix time of the last snapshot or delta.
    pub discovery_last_update_seconds: Family<Labels, Gauge>,
    pub discovery_updates: Family<Labels, Counter>,
    pub discovery_errors: Family<Labels, Counter>,
    /// Records dropped, by registry and reason (decrypt, oversized, protobuf, short, endpoint; the Kubernetes
    /// registry: annotation). Every reason a registry can count is there at 0 from its start
    /// ([`Metrics::discovery_rejected_zero`]), so `increase()` sees the first rejection.
    pub discovery_rejected: Family<Labels, Counter>,
    /// 1 while the MSS clamping table holds exactly meshd's rule.
    pub mss_clamp_ok: Gauge,
    /// Times the MSS clamping table was (re)written (start, repair after a flush, upgrade).
    pub mss_clamp_installs: Counter,
    /// 1 when the config asks for MSS clamping (`clampMSS`), so an alert tells "missing" from "turned off".
    pub mss_clamp_enabled: Gauge,
    /// `topology: location`: changes of a location's active gateway (to another node, or to none); the log
    /// line names the location. One series, there from the start, so an alert can use `increase()`.
    pub gateway_changes: Counter,
    /// Kubernetes registry: watches resumed after the server closed them (`closed`) and relists after
    /// 410 Gone (`gone`).
    pub discovery_resyncs: Family<Labels, Counter>,
    /// Prefixes that more than one peer claims (each held by one of them; see `plan`).
    pub prefix_conflicts: Gauge,
    /// Changes made to resources meshd owns that were found changed from outside, by resource
    /// (`link`, `address`, `rule`).
    pub drift_repairs: Family<Labels, Counter>,
    /// Prefixes of discovered peers refused, by peer and reason (counted once per change).
    pub prefixes_refused: Family<Labels, Counter>,
    /// Prefixes refused in the last reconcile.
    pub prefixes_refused_now: Gauge,
    /// Relay (a public node with `relay: auto`): allocations held now.
    pub relay_allocations: Gauge,
    /// Relay: allocation requests answered, by result (`granted` or the refusal).
    pub relay_requests: Family<Labels, Counter>,
    /// Relay: datagrams and bytes forwarded between the parties of an allocation.
    pub relay_forwarded_packets: Counter,
    pub relay_forwarded_bytes: Counter,
    /// Relay: datagrams not forwarded, by reason.
    pub relay_dropped: Family<Labels, Counter>,
    /// Relayed peers whose relay granted an allocation (this node's side).
    pub relay_grants: Gauge,
    /// Relayed paths (this node's side) that failed, by reason: `no_pongs` (the probes through the
    /// relay went unanswered) or `no_handshake` (they answered, WireGuard's handshakes did not get
    /// through).
    pub relay_paths_failed: Family<Labels, Counter>,
}

impl Metrics {
    pub fn register(registry: &SharedRegistry) -> Metrics {
        let m = Metrics::default();
        for reason in RELAY_PATH_FAILURES {
            drop(
                m.relay_paths_failed
                    .get_or_create(&vec![("reason".to_owned(), reason.to_owned())]),
            );
        }
        registry.register("meshd", |r| {
            r.register_collector(Box::new(m.peer_table.clone()));
            r.register("peers", "Peers configured", m.peers.clone());
            r.register("peers_up", "Peers up", m.peers_up.clone());
            r.register("reconciles", "Reconcile passes", m.reconciles.clone());
            r.register(
                "reconcile_seconds",
                "Duration of the last reconcile pass (device diff and apply, route sync)",
                m.reconcile_seconds.clone(),
            );
            r.register(
                "reconcile_change_seconds",
                "Duration of the last reconcile pass triggered by a change (diffed against what meshd knows: no device or route dump)",
                m.reconcile_change_seconds.clone(),
            );
            r.register(
                "reconcile_errors",
                "Failed reconcile passes",
                m.reconcile_errors.clone(),
            );
            r.register(
                "wireguard_peer_ops",
                "Peer changes applied to the WireGuard device",
                m.wireguard_peer_ops.clone(),
            );
            r.register(
                "route_changes",
                "Routes added or removed",
                m.route_changes.clone(),
            );
            r.register("probes_sent", "Probes sent", m.probes_sent.clone());
            r.register(
                "probes_answered",
                "Pongs matched to a probe",
                m.probes_answered.clone(),
            );
            r.register(
                "probes_rejected",
                "Probe datagrams dropped (unknown sender, bad MAC, malformed)",
                m.probes_rejected.clone(),
            );
            r.register(
                "pings_answered",
                "Pings from peers answered with a pong",
                m.pings_answered.clone(),
            );
            r.register(
                "peers_probing",
                "Peers by probing need: fast, gateway, traffic (WireGuard counters first), slow",
                m.peers_probing.clone(),
            );
            r.register(
                "peers_busy",
                "Peers that carried traffic lately (probed only when their counters stop)",
                m.peers_busy.clone(),
            );
            r.register(
                "counter_reads",
                "Readings of WireGuard's counters used as liveness evidence",
                m.counter_reads.clone(),
            );
            r.register(
                "probes_dropped",
                "Probe datagrams not answered or not taken, by reason",
                m.probes_dropped.clone(),
            );
            r.register(
                "peers_by_source",
                "Peers by where they came from (static, discovery, cache)",
                m.peers_by_source.clone(),
            );
            r.register(
                "discovery_registry_up",
                "1 while the discovery registry's watch is live",
                m.discovery_registry_up.clone(),
            );
            r.register(
                "discovery_affiliates",
                "Affiliates the registry reports (ours excluded)",
                m.discovery_affiliates.clone(),
            );
            r.register(
                "discovery_last_update_seconds",
                "Unix time of the registry's last snapshot or delta",
                m.discovery_last_update_seconds.clone(),
            );
            r.register(
                "discovery_updates",
                "Our affiliate published to the registry",
                m.discovery_updates.clone(),
            );
            r.register(
                "discovery_errors",
                "Registry sessions that failed (then reconnected with backoff)",
                m.discovery_errors.clone(),
            );
            r.register(
                "discovery_rejected",
                "Affiliate records dropped (other cluster, tampered, oversized, malformed)",
                m.discovery_rejected.clone(),
            );
            r.register(
                "mss_clamp_ok",
                "1 while the nftables MSS clamping rule is in place",
                m.mss_clamp_ok.clone(),
            );
            r.register(
                "mss_clamp_enabled",
                "1 when the config asks for MSS clamping (clampMSS), 0 when it is turned off",
                m.mss_clamp_enabled.clone(),
            );
            r.register(
                "gateway_changes",
                "topology location: changes of a location's active gateway (to another node or to none)",
                m.gateway_changes.clone(),
            );
            r.register(
                "mss_clamp_installs",
                "Times the nftables MSS clamping table was written (start, repair, upgrade)",
                m.mss_clamp_installs.clone(),
            );
            r.register(
                "discovery_resyncs",
                "Kubernetes registry: watches resumed after the server closed them (reason closed) and relists after 410 Gone (reason gone)",
                m.discovery_resyncs.clone(),
            );
            r.register(
                "prefix_conflicts",
                "Prefixes claimed by more than one peer (one holds each)",
                m.prefix_conflicts.clone(),
            );
            r.register(
                "drift_repairs",
                "Resources meshd owns found changed from outside and repaired, by resource (link, address, rule)",
                m.drift_repairs.clone(),
            );
            r.register(
                "prefixes_refused",
                "Prefixes announced by discovered peers and refused by the trust screen, by peer and reason (counted once per change)",
                m.prefixes_refused.clone(),
            );
            r.register(
                "relay_allocations",
                "Relay: allocations held now (pairs of nodes relayed through this node)",
                m.relay_allocations.clone(),
            );
            r.register(
                "relay_requests",
                "Relay: allocation requests answered, by result (granted or the refusal)",
                m.relay_requests.clone(),
            );
            r.register(
                "relay_forwarded_packets",
                "Relay: datagrams forwarded between the parties of an allocation",
                m.relay_forwarded_packets.clone(),
            );
            r.register(
                "relay_forwarded_bytes",
                "Relay: bytes forwarded between the parties of an allocation",
                m.relay_forwarded_bytes.clone(),
            );
            r.register(
                "relay_dropped",
                "Relay: datagrams at relay ports not forwarded, by reason",
                m.relay_dropped.clone(),
            );
            r.register(
                "relay_grants",
                "Relayed peers whose relay granted this node an allocation",
                m.relay_grants.clone(),
            );
            r.register(
                "relay_paths_failed",
                "Relayed paths of this node that failed, by reason (no_pongs: probes through the relay unanswered; no_handshake: probes answered, no WireGuard handshake got through)",
                m.relay_paths_failed.clone(),
            );
            r.register(
                "refused_prefixes",
                "Prefixes of discovered peers refused in the last reconcile",
                m.prefixes_refused_now.clone(),
            );
        });
        m
    }
}

impl Metrics {
    /// Counts a probe datagram dropped for `reason`.
    pub fn dropped(&self, reason: &str) {
        self.probes_dropped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}

impl Metrics {
    /// Creates `registry`'s rejection series at 0, one per reason it can count: a counter series that
    /// appears only at its first increment starts at 1, which `increase()` never counts, so an alert would
    /// miss the first rejected record.
    pub fn discovery_rejected_zero(&self, registry: &str, reasons: &[&str]) {
        for reason in reasons {
            drop(
                self.discovery_rejected
                    .get_or_create(&rejected_labels(registry, reason)),
            );
        }
    }

    /// Counts a record `registry` dropped for `reason`.
    pub fn discovery_rejected(&self, registry: &str, reason: &str) {
        self.discovery_rejected
            .get_or_create(&rejected_labels(registry, reason))
            .inc();
    }

    /// Creates the series of `reason` in `meshd_relay_dropped_total` at 0 (kept if it exists).
    pub fn relay_dropped_zero(&self, reason: &str) {
        drop(
            self.relay_dropped
                .get_or_create(&vec![("reason".to_owned(), reason.to_owned())]),
        );
    }

    /// Counts a datagram at a relay port not forwarded, for `reason`.
    pub fn relay_dropped(&self, reason: &str) {
        self.relay_dropped
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// Counts an allocation request answered with `result`.
    pub fn relay_request(&self, result: &str) {
        self.relay_requests
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    /// Counts a relayed path of ours that failed for `reason` (one of [`RELAY_PATH_FAILURES`]).
    pub fn relay_path_failed(&self, reason: &str) {
        self.relay_paths_failed
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}

/// The reasons `meshd_relay_paths_failed_total` counts (each series there from the start, at 0).
pub const RELAY_PATH_FAILURES: [&str; 2] = ["no_pongs", "no_handshake"];

fn rejected_labels(registry: &str, reason: &str) -> Labels {
    vec![
        ("registry".to_owned(), registry.to_owned()),
        ("reason".to_owned(), reason.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_series_exist_at_zero_before_the_first_rejection() {
        let registry = SharedRegistry::default();
        let m = Metrics::register(&registry);
        m.discovery_rejected_zero("https://discovery.example:443", &["decrypt", "short"]);
        m.discovery_rejected_zero("k8s", &["annotation"]);
        let text = registry.encode();
        for series in [
            r#"meshd_discovery_rejected_total{registry="https://discovery.example:443",reason="decrypt"} 0"#,
            r#"meshd_discovery_rejected_total{registry="https://discovery.example:443",reason="short"} 0"#,
            r#"meshd_discovery_rejected_total{registry="k8s",reason="annotation"} 0"#,
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
        // Zeroing again (a restarted discovery after a config change) keeps the counts.
        m.discovery_rejected("k8s", "annotation");
        m.discovery_rejected_zero("k8s", &["annotation"]);
        assert!(
            registry.encode().contains(
                r#"meshd_discovery_rejected_total{registry="k8s",reason="annotation"} 1"#
            )
        );
    }
}

//! What the mesh publishes besides `status.json`: per-peer metrics and the peer cache.

use hybridnet_config::PublicKey;
use ipnet::IpNet;

use super::Mesh;
use crate::cache;
use crate::metrics;
use crate::peer::PeerState;
use crate::topology::PathKind;

impl Mesh {
    /// Publishes per-peer metrics, given the plan's `paths` (the report plans once for these and
    /// `meshd status`).
    pub fn update_metrics(&mut self, paths: &std::collections::BTreeMap<PublicKey, PathKind>) {
        let mut up = 0;
        let now = std::time::Instant::now();
        let mut needs = std::collections::BTreeMap::from([
            ("fast", 0i64),
            ("gateway", 0),
            ("traffic", 0),
            ("slow", 0),
        ]);
        let mut busy = 0;
        let mut rows = Vec::with_capacity(self.peers.len());
        // As `meshd status` shows them (through gateways and relays).
        let states: std::collections::HashMap<_, _> = self
            .peers
            .values()
            .map(|p| (p.key, self.reported_state(p, paths)))
            .collect();
        for p in self.peers.values_mut() {
            *needs.entry(p.machine.need().as_str()).or_default() += 1;
            busy += i64::from(p.machine.busy(now));
            let state = states.get(&p.key).copied().unwrap_or(PeerState::Unknown);
            if state == PeerState::Up {
                up += 1;
            }
            let delta = p.machine.failovers.saturating_sub(p.reported_failovers);
            p.reported_failovers = p.machine.failovers;
            let secs = |d: std::time::Duration, scale: f64| {
                u32::try_from((d.as_secs_f64() * scale).round() as u64)
                    .unwrap_or(metrics::peers::NONE - 1)
            };
            let path = paths.get(&p.key).map_or("direct", |k| k.as_str());
            rows.push(metrics::PeerRow {
                spec: p.spec.clone(),
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
                active_endpoint: p.endpoint(),
                failovers: u32::try_from(delta).unwrap_or(u32::MAX),
                rtt_us: p
                    .machine
                    .active
                    .and_then(|a| p.machine.paths[a].rtt)
                    .map_or(metrics::peers::NONE, |r| secs(r, 1e6)),
                handshake_age_s: p
                    .stats
                    .last_handshake
                    .map_or(metrics::peers::NONE, |d| secs(d, 1.0)),
                state: match state {
                    PeerState::Unknown => 0,
                    PeerState::Up => 1,
                    PeerState::Down => 2,
                },
                path: metrics::peers::PATHS
                    .iter()
                    .position(|k| *k == path)
                    .and_then(|i| u8::try_from(i).ok())
                    .unwrap_or(1),
            });
        }
        // One write of the table per report (a scrape waits for that, never for the loop).
        self.metrics.peer_table.replace(rows);
        self.metrics.peers_up.set(up);
        self.metrics.peers_busy.set(busy);
        for (need, n) in needs {
            self.metrics
                .peers_probing
                .get_or_create(&vec![("need".to_owned(), need.to_owned())])
                .set(n);
        }
    }

    /// Writes the peer cache when it changed.
    pub fn store_cache(&mut self) {
        let mut peers: Vec<cache::CachedPeer> = self
            .peers
            .values()
            .map(|p| {
                let mut endpoints: Vec<String> = Vec::new();
                if let Some(a) = p.endpoint() {
                    endpoints.push(a.to_string());
                }
                for path in &p.machine.paths {
                    let s = path.endpoint.to_string();
                    if !endpoints.contains(&s) {
                        endpoints.push(s);
                    }
                }
                cache::CachedPeer {
                    name: p.spec.name.clone(),
                    public_key: p.key.to_string(),
                    endpoints,
                    allowed_ips: p
                        .allowed_ips
                        .iter()
                        .filter(|n| !matches!(n, IpNet::V6(v) if self.prefix.contains(v)))
                        .map(ToString::to_string)
                        .collect(),
                    location: p.spec.location.clone(),
                    source: p.spec.source.as_str().to_owned(),
                    last_seen: 0,
                    node_id: p.spec.node_id.clone(),
                    addresses: p.spec.addresses.iter().map(ToString::to_string).collect(),
                    api_server_port: p.spec.api_server_port,
                    mesh_address: self
                        .cfg
                        .meshd
                        .kubespan_compat
                        .then(|| p.mesh_addr.to_string()),
                }
            })
            .collect();
        peers.sort_by(|a, b| a.public_key.cmp(&b.public_key));
        let c = cache::Cache {
            version: cache::VERSION,
            peers,
        };
        let hash = {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::hash::DefaultHasher::new();
            c.hash(&mut h);
            h.finish()
        };
        if self.cache_written == Some(hash) {
            return;
        }
        let path = cache::path(&self.cfg.data_dir);
        match cache::store(&path, &c) {
            Ok(()) => self.cache_written = Some(hash),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot write the peer cache")
            }
        }
    }
}

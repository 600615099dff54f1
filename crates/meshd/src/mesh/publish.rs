//! What the mesh publishes besides `status.json`: per-peer metrics and the peer cache.

use ipnet::IpNet;

use super::Mesh;
use crate::cache;
use crate::metrics;
use crate::peer::PeerState;

impl Mesh {
    /// Publishes per-peer metrics.
    pub fn update_metrics(&mut self) {
        let mut up = 0;
        let paths = self.paths();
        let now = std::time::Instant::now();
        let mut needs = std::collections::BTreeMap::from([
            ("fast", 0i64),
            ("gateway", 0),
            ("traffic", 0),
            ("slow", 0),
        ]);
        let mut busy = 0;
        // As `meshd status` shows them (through gateways and relays).
        let states: std::collections::HashMap<_, _> = self
            .peers
            .values()
            .map(|p| (p.key, self.reported_state(p, &paths)))
            .collect();
        for p in self.peers.values_mut() {
            *needs.entry(p.machine.need().as_str()).or_default() += 1;
            busy += i64::from(p.machine.busy(now));
            // One series per peer, its current path (1); the other kinds' are removed, not kept at 0: at
            // thousands of peers every labelled series is memory here and cardinality in Prometheus.
            let now = paths.get(&p.key).map_or("direct", |k| k.as_str());
            for kind in crate::topology::PATH_KINDS {
                let labels = metrics::peer_path(&p.spec.name, kind);
                if kind == now {
                    self.metrics.peer_path.get_or_create(&labels).set(1);
                } else {
                    self.metrics.peer_path.remove(&labels);
                }
            }
            let l = metrics::peer(&p.spec.name);
            // A counter series that appears only at its first increment hides that increment from
            // `increase()` (the MeshdPathFailover alert): start every peer's at 0.
            drop(self.metrics.peer_failovers.get_or_create(&l));
            let state = states.get(&p.key).copied().unwrap_or(PeerState::Unknown);
            if state == PeerState::Up {
                up += 1;
            }
            self.metrics.peer_state.get_or_create(&l).set(match state {
                PeerState::Unknown => 0,
                PeerState::Up => 1,
                PeerState::Down => 2,
            });
            let rtt = p
                .machine
                .active
                .and_then(|a| p.machine.paths[a].rtt)
                .map_or(f64::NAN, |r| r.as_secs_f64());
            self.metrics.peer_rtt_seconds.get_or_create(&l).set(rtt);
            let hs = p.stats.last_handshake.map_or(f64::NAN, |d| d.as_secs_f64());
            self.metrics
                .peer_handshake_age_seconds
                .get_or_create(&l)
                .set(hs);
            self.metrics
                .peer_rx_bytes
                .get_or_create(&l)
                .set(p.stats.rx_bytes as i64);
            self.metrics
                .peer_tx_bytes
                .get_or_create(&l)
                .set(p.stats.tx_bytes as i64);
            let delta = p.machine.failovers.saturating_sub(p.reported_failovers);
            if delta > 0 {
                self.metrics.peer_failovers.get_or_create(&l).inc_by(delta);
                p.reported_failovers = p.machine.failovers;
            }
            // Only the endpoint in use has a series (1); the others' are removed.
            let active = p.endpoint();
            for path in &p.machine.paths {
                let labels = metrics::peer_endpoint(&p.spec.name, path.endpoint);
                if active == Some(path.endpoint) {
                    self.metrics
                        .peer_active_endpoint
                        .get_or_create(&labels)
                        .set(1);
                } else {
                    self.metrics.peer_active_endpoint.remove(&labels);
                }
            }
        }
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

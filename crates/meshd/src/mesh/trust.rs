//! The mesh's side of the trust boundary ([`crate::plan::trust`]): what this node protects (its
//! underlay subnets, the service subnets, the addresses of the discovery service and the API servers),
//! each peer's standing, and the report of refused prefixes (logged once per change, counted).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use hybridnet_config::{Config, HostPort};

use super::Mesh;
use crate::plan::trust::{PeerTrust, Policy, Refused, Trust};

/// How long one endpoint's name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The addresses meshd and apiprism talk to: the control-plane endpoint, apiprism's static upstreams,
/// the discovery service endpoints, and the in-cluster API server (`KUBERNETES_SERVICE_HOST`). Names
/// are resolved once per config (2 s each at most); one that does not resolve is skipped.
pub async fn protected_endpoints(cfg: &Config) -> Vec<IpAddr> {
    let mut hosts: Vec<HostPort> = Vec::new();
    hosts.extend(cfg.cluster.control_plane_endpoint.iter().cloned());
    hosts.extend(cfg.apiprism.upstreams.iter().cloned());
    for e in &cfg.cluster.discovery.endpoints {
        if let Ok(t) = crate::discovery::grpc::Target::parse(e) {
            hosts.push(HostPort {
                host: t.host,
                port: t.port,
            });
        }
    }
    if let Ok(h) = std::env::var("KUBERNETES_SERVICE_HOST") {
        hosts.push(HostPort { host: h, port: 443 });
    }
    let mut out = Vec::new();
    for hp in hosts {
        if hp.host == "localhost" {
            continue;
        }
        let found: Vec<IpAddr> = match hybridnet_runtime::net::resolve(&hp, RESOLVE_TIMEOUT).await {
            Ok(addrs) => addrs.iter().map(std::net::SocketAddr::ip).collect(),
            Err(error) => {
                tracing::debug!(host = %hp.host, %error, "cannot resolve an endpoint to protect");
                Vec::new()
            }
        };
        for ip in found {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

impl Mesh {
    /// The trust inputs of the plan, as of now.
    pub(super) fn trust(&self) -> Trust {
        let m = &self.cfg.meshd;
        let mut underlay = self.underlay.clone();
        for a in &m.addresses {
            if !underlay.contains(a) {
                underlay.push(*a);
            }
        }
        let policy = Policy {
            min_v4: m.trust.min_prefix_v4,
            min_v6: m.trust.min_prefix_v6,
            underlay,
            service_subnets: self.cfg.cluster.service_subnets.clone(),
            endpoints: self.protected.clone(),
        };
        // Only discovered peers are screened: with none, no peer's standing is needed (not built for
        // every plan of a mesh of static peers).
        let screened = self
            .peers
            .values()
            .any(|p| p.spec.source != crate::model::Source::Static);
        let peers = self
            .peers
            .values()
            .filter(|_| screened)
            .map(|p| {
                let t = PeerTrust {
                    trusted: p.spec.source == crate::model::Source::Static,
                    mesh_addr: p.mesh_addr,
                    seniority: p.seniority,
                    refused: p.spec.refused.clone(),
                    addresses: p.spec.addresses.clone(),
                    proven: proven(p),
                };
                (p.key, t)
            })
            .collect();
        Trust { policy, peers }
    }

    /// Re-reads this node's underlay subnets; `true` when they changed.
    pub(super) async fn refresh_underlay(&mut self) -> bool {
        match self.net.underlay_networks(self.index).await {
            Ok(nets) if nets != self.underlay => {
                self.underlay = nets;
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, "cannot read the underlay addresses (the trust screen keeps the last ones)");
                false
            }
        }
    }

    /// Logs and counts the refusals that are new since the last reconcile (once per change, not per
    /// reconcile).
    pub(super) fn report_refused(&mut self, refused: &[Refused]) {
        if refused == self.refused.as_slice() {
            return;
        }
        let before: BTreeSet<&Refused> = self.refused.iter().collect();
        for r in refused.iter().filter(|r| !before.contains(r)) {
            let name = self
                .peers
                .get(&r.peer)
                .map_or_else(|| r.peer.to_string(), |p| p.spec.name.clone());
            tracing::warn!(peer = %name, prefix = %r.prefix, reason = r.reason.as_str(), "refused a prefix a discovered peer announced; the rest of its record is used");
            self.metrics
                .prefixes_refused
                .get_or_create(&vec![
                    ("peer".to_owned(), name),
                    ("reason".to_owned(), r.reason.as_str().to_owned()),
                ])
                .inc();
        }
        self.metrics.prefixes_refused_now.set(refused.len() as i64);
        self.refused = refused.to_vec();
    }
}

/// Where `p` proved to hold its key: endpoints whose probes it answers (the pong's MAC is under the
/// X25519 secret only it and we can compute), and in handshake mode the endpoint of a live session.
fn proven(p: &super::Peer) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = p
        .machine
        .paths
        .iter()
        .filter(|path| path.state == crate::peer::PathState::Alive)
        .map(|path| path.endpoint.ip())
        .collect();
    if p.handshake_mode()
        && p.state() == crate::peer::PeerState::Up
        && let Some(e) = p.endpoint()
    {
        out.push(e.ip());
    }
    out
}

/// The refusals as `meshd status` shows them.
pub fn rows(mesh: &Mesh, refused: &[Refused]) -> serde_json::Value {
    refused
        .iter()
        .map(|r| {
            let name = mesh
                .peers
                .get(&r.peer)
                .map_or_else(|| r.peer.to_string(), |p| p.spec.name.clone());
            serde_json::json!({
                "peer": name,
                "prefix": r.prefix.to_string(),
                "reason": r.reason.as_str(),
            })
        })
        .collect()
}

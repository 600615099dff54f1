//! Merges HybridNetConfig, the Talos facts, derived values and defaults into one [`Config`],
//! recording the source of every value. Precedence: ours > Talos field > derived > default.

mod sections;

use std::path::PathBuf;

use crate::Config;
use crate::hybridnet::Ours;
use crate::model::{ClusterConfig, DEFAULT_DISCOVERY_ENDPOINT, DiscoveryConfig, MachineType};
use crate::read::Ctx;
use crate::source::{Source, Sourced, Sources};
use crate::talos::TalosFacts;

/// Picks the first value present and records where it came from.
pub struct Merger {
    pub sources: Sources,
}

impl Merger {
    /// The first `Some` of `layers` (in precedence order), or `default`.
    pub fn first<T>(
        &mut self,
        key: &str,
        layers: impl IntoIterator<Item = Sourced<T>>,
        default: T,
    ) -> T {
        match layers.into_iter().flatten().next() {
            Some((value, source)) => {
                self.sources.set(key, source);
                value
            }
            None => default,
        }
    }

    /// `Option` flavour of [`Merger::first`]: `None` when no layer has a value.
    pub fn optional<T>(
        &mut self,
        key: &str,
        layers: impl IntoIterator<Item = Sourced<T>>,
    ) -> Option<T> {
        let (value, source) = layers.into_iter().flatten().next()?;
        self.sources.set(key, source);
        Some(value)
    }
}

/// Builds the config. Problems found while deriving values are added to `ctx`.
pub fn merge(ctx: &mut Ctx, talos: TalosFacts, ours: Ours, mut warnings: Vec<String>) -> Config {
    let mut m = Merger {
        sources: Sources::default(),
    };
    let defaults = Config::defaults();
    let state_dir: PathBuf = m.first(
        "stateDir",
        [ours.state_dir.clone()],
        defaults.state_dir.clone(),
    );
    let data_dir: PathBuf = m.first(
        "dataDir",
        [ours.data_dir.clone()],
        defaults.data_dir.clone(),
    );
    let allow_non_local_listen = m.first(
        "allowNonLocalListen",
        [ours.allow_non_local_listen.clone()],
        defaults.allow_non_local_listen,
    );
    let data_dir_source = m.sources.get("dataDir").clone();
    let cluster = merge_cluster(&mut m, &talos);
    let apiprism = sections::apiprism(&mut m, &talos, &ours, &cluster, &defaults.apiprism);
    let meshd = sections::meshd(
        ctx,
        &mut m,
        &talos,
        &ours,
        &cluster,
        &data_dir,
        &data_dir_source,
        &defaults.meshd,
    );
    let dnslocal = sections::dnslocal(
        ctx,
        &mut m,
        &talos,
        &ours,
        &defaults.dnslocal,
        &mut warnings,
    );
    Config {
        state_dir,
        data_dir,
        allow_non_local_listen,
        cluster,
        apiprism,
        meshd,
        dnslocal,
        warnings,
        sources: m.sources,
    }
}

fn merge_cluster(m: &mut Merger, t: &TalosFacts) -> ClusterConfig {
    let discovery_enabled = m.first(
        "cluster.discovery.enabled",
        [t.discovery_enabled.clone()],
        false,
    );
    let default_endpoints = if discovery_enabled {
        vec![DEFAULT_DISCOVERY_ENDPOINT.to_owned()]
    } else {
        Vec::new()
    };
    let endpoints = m.first(
        "cluster.discovery.endpoints",
        [t.discovery_endpoints.clone()],
        default_endpoints,
    );
    let kube_prism = m.first("cluster.kubePrism", [t.kube_prism.clone()], None);
    ClusterConfig {
        machine_type: m.first(
            "cluster.machineType",
            [t.machine_type.clone()],
            MachineType::Unknown,
        ),
        control_plane_endpoint: m.optional("cluster.controlPlaneEndpoint", [t.endpoint.clone()]),
        local_api_server_port: m.first(
            "cluster.localAPIServerPort",
            [t.local_api_port.clone()],
            6443,
        ),
        name: m.optional("cluster.name", [t.cluster_name.clone()]),
        pod_subnets: m.first("cluster.podSubnets", [t.pod_subnets.clone()], Vec::new()),
        service_subnets: m.first(
            "cluster.serviceSubnets",
            [t.service_subnets.clone()],
            Vec::new(),
        ),
        id: m.optional("cluster.id", [t.cluster_id.clone()]),
        secret: m.optional("cluster.secret", [t.cluster_secret.clone()]),
        discovery: DiscoveryConfig {
            enabled: discovery_enabled,
            endpoints: if discovery_enabled {
                endpoints
            } else {
                Vec::new()
            },
            kubernetes_registry: discovery_enabled
                && m.first(
                    "cluster.discovery.kubernetesRegistry",
                    [t.kubernetes_registry.clone()],
                    false,
                ),
        },
        kube_prism,
        host_dns: m.first("cluster.hostDNS", [t.host_dns.clone()], Default::default()),
        nameservers: m.first("cluster.nameservers", [t.nameservers.clone()], Vec::new()),
        kubespan_enabled: m.first(
            "cluster.kubespanEnabled",
            [t.kubespan_enabled.clone()],
            false,
        ),
    }
}

/// The field name inside a Talos source, for "derived from X" labels.
pub fn field_of(source: &Source) -> String {
    match source {
        Source::Talos { field, .. } => field.clone(),
        Source::HybridNet { key, .. } => key.clone(),
        Source::Derived { from } => from.clone(),
        Source::Default => "defaults".to_owned(),
    }
}

//! The Kubernetes registry: our affiliate as annotations on our own Node (Talos's names and formats,
//! so a Talos node and meshd read each other), the other Nodes' annotations as affiliates, and our
//! Node's `spec.podCIDRs` for `advertiseKubernetesNetworks`.
//!
//! A hand-rolled list + watch on `Api<Node>` (not `kube-runtime`'s watcher: the loop is small, keeps the
//! last view while the API is down and reports relists and watch restarts in status and metrics):
//!
//! - list, then watch from the list's `resourceVersion`; every event moves the version on;
//! - the server ending a watch (timeout, restart, load balancer) resumes from the last version;
//! - 410 Gone (as the watch's HTTP status or as an `ERROR` event: history compacted) relists;
//! - any other failure reconnects with backoff from 1 s to 15 s (±20 %), keeping the last view (the
//!   mesh does not change while the API server is away); a new connection re-reads the credentials
//!   (kubelet client certificates rotate);
//! - our annotations are compared with what our Node carries after every list, every event on our
//!   Node and every local change, and a JSON merge patch sets the difference (nothing when equal).
//!
//! Credentials: `KUBECONFIG`, else the in-cluster service account (`KUBERNETES_SERVICE_HOST`), else
//! the first kubelet kubeconfig found ([`KUBELET_KUBECONFIGS`]).

pub mod node;

use std::collections::BTreeMap;

use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Affiliate, Local, Publisher};
use crate::metrics::Metrics;
use hybridnet_state::unix_now;

/// The registry's name in status and in the `registry` metric label.
pub const REGISTRY: &str = "k8s";
/// The one reason this registry drops a record for (the `reason` label of `meshd_discovery_rejected_total`):
/// a Node annotation that does not parse.
pub const REJECTED_ANNOTATION: &str = "annotation";
pub use hybridnet_kube::KUBELET_KUBECONFIGS;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Asked of the server for each watch (it may end it earlier; we resume).
const WATCH_TIMEOUT_SECS: u32 = 290;
/// A watch that ends sooner than this is resumed only after this long.
const QUICK_END: Duration = Duration::from_secs(1);

/// What the Kubernetes client is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The registry proper: read the other Nodes (and publish, see `publish`).
    pub registry: bool,
    /// Write our annotations. Off when Talos's own KubeSpan runs on this node: its Kubernetes registry
    /// writes the same annotations on the same Node, and two writers would undo each other.
    pub publish: bool,
    /// Read our Node's pod CIDRs (`advertiseKubernetesNetworks`).
    pub pod_cidrs: bool,
    /// Our Node's name.
    pub nodename: String,
    /// The cluster's pod subnets: what a peer whose Node has no `spec.podCIDRs` may announce.
    pub pod_subnets: Vec<IpNet>,
}

#[derive(Debug)]
pub(super) struct Registry {
    pub index: usize,
    pub settings: Settings,
    pub local: watch::Receiver<Option<Local>>,
    pub shared: Publisher,
    pub stop: CancellationToken,
    pub metrics: Metrics,
}

enum Ended {
    Stop,
    Failed(String),
}

/// Why a list starts again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relist {
    First,
    Gone,
}

/// The last view of the Nodes, kept across reconnects.
#[derive(Debug, Default)]
struct View {
    nodes: BTreeMap<String, Node>,
    /// Per node: the bad fields last reported (logged and counted once per change).
    bad: BTreeMap<String, Vec<node::Bad>>,
    /// Our Node was missing at the last patch attempt (warned once).
    missing_warned: bool,
    /// What was last handed to the merge (affiliates, our pod CIDRs): an event that changes neither
    /// (a kubelet status update) publishes nothing.
    published: Option<(BTreeMap<String, Affiliate>, Vec<IpNet>, bool)>,
}

fn labels() -> Vec<(String, String)> {
    vec![("registry".to_owned(), REGISTRY.to_owned())]
}

/// Loads the client configuration (see the module docs for the order).
pub async fn client_config() -> Result<kube::Config, String> {
    hybridnet_kube::client_config(None, None).await
}

impl Registry {
    fn set_state(&self, state: &str, error: Option<String>) {
        let i = self.index;
        let state = state.to_owned();
        self.shared.update(|s| {
            if let Some(st) = s.status.get_mut(i) {
                st.state = state;
                if error.is_some() {
                    st.error = error;
                }
            }
        });
    }

    fn count(&self, f: impl FnOnce(&mut super::RegistryStatus)) {
        let i = self.index;
        self.shared.update(|s| {
            if let Some(st) = s.status.get_mut(i) {
                f(st);
            }
        });
    }

    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut view = View::default();
        if self.settings.registry && !self.settings.publish {
            tracing::info!(
                registry = REGISTRY,
                "Talos's own KubeSpan runs on this node and writes these annotations: reading only"
            );
        }
        self.count(|st| {
            st.relists = Some(0);
            st.watch_restarts = Some(0);
        });
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            self.set_state("connecting", None);
            let mut healthy = false;
            match self.session(&mut view, &mut healthy).await {
                Ok(()) | Err(Ended::Stop) => break,
                Err(Ended::Failed(error)) => {
                    if healthy {
                        backoff = BACKOFF_MIN;
                    }
                    tracing::warn!(registry = REGISTRY, %error, retry_in = ?backoff, "Kubernetes API unreachable or failed; keeping the last view");
                    self.metrics.discovery_errors.get_or_create(&labels()).inc();
                    self.metrics
                        .discovery_registry_up
                        .get_or_create(&labels())
                        .set(0);
                    self.shared.update(|s| {
                        if let Some(st) = s.status.get_mut(self.index) {
                            st.state = "backoff".into();
                            st.error = Some(error);
                            st.reconnects += 1;
                        }
                    });
                    let wait = backoff.mul_f64(0.8 + fastrand::f64() * 0.4);
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        self.set_state("stopped", None);
        self.metrics
            .discovery_registry_up
            .get_or_create(&labels())
            .set(0);
    }

    /// One connection: list, then watch (resuming after a closed stream, relisting after 410 Gone)
    /// until stop or failure. `healthy` is set once a list succeeded (the backoff starts over).
    async fn session(&mut self, view: &mut View, healthy: &mut bool) -> Result<(), Ended> {
        let stop = self.stop.clone();
        let fail = Ended::Failed;
        let config = client_config().await.map_err(fail)?;
        let server = config.cluster_url.to_string();
        let client =
            Client::try_from(config).map_err(|e| fail(format!("client for {server}: {e}")))?;
        let api: Api<Node> = Api::all(client);
        // Without the registry only our own Node matters.
        let selector =
            (!self.settings.registry).then(|| format!("metadata.name={}", self.settings.nodename));
        let mut reason = Relist::First;
        loop {
            self.set_state("listing", None);
            let mut lp = ListParams::default();
            if let Some(s) = &selector {
                lp = lp.fields(s);
            }
            let list = tokio::select! {
                () = stop.cancelled() => return Err(Ended::Stop),
                r = api.list(&lp) => r.map_err(|e| fail(format!("list nodes on {server}: {e}")))?,
            };
            *healthy = true;
            if reason == Relist::Gone {
                self.count(|st| st.relists = Some(st.relists.unwrap_or(0) + 1));
                self.metrics
                    .discovery_resyncs
                    .get_or_create(&resync_labels("gone"))
                    .inc();
            }
            let mut version = list.metadata.resource_version.clone().unwrap_or_default();
            view.nodes = list
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name.clone().map(|name| (name, node::slim(n))))
                .collect();
            tracing::info!(registry = REGISTRY, %server, nodes = view.nodes.len(), %version, "Kubernetes nodes listed");
            self.absorb(view, true);
            self.sync_own(&api, view).await?;
            // Watch from `version` until 410 Gone (then relist).
            'watch: loop {
                let mut wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
                if let Some(s) = &selector {
                    wp = wp.fields(s);
                }
                let stream = tokio::select! {
                    () = stop.cancelled() => return Err(Ended::Stop),
                    r = api.watch(&wp, &version) => r,
                };
                let watch_started = std::time::Instant::now();
                let mut stream = match stream {
                    Ok(s) => s.boxed(),
                    Err(kube::Error::Api(status)) if status.code == 410 => {
                        tracing::info!(registry = REGISTRY, %version, "resourceVersion too old (410 Gone): relisting");
                        reason = Relist::Gone;
                        break 'watch;
                    }
                    Err(e) => return Err(fail(format!("watch nodes on {server}: {e}"))),
                };
                self.set_state("watching", None);
                self.metrics
                    .discovery_registry_up
                    .get_or_create(&labels())
                    .set(1);
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return Err(Ended::Stop),
                        changed = self.local.changed() => {
                            if changed.is_err() {
                                return Err(Ended::Stop);
                            }
                            self.sync_own(&api, view).await?;
                            continue;
                        }
                        ev = stream.try_next() => ev,
                    };
                    let ours = match event {
                        Ok(Some(WatchEvent::Added(n) | WatchEvent::Modified(n))) => {
                            bump(&mut version, &n);
                            let name = n.metadata.name.clone().unwrap_or_default();
                            view.nodes.insert(name.clone(), node::slim(n));
                            name == self.settings.nodename
                        }
                        Ok(Some(WatchEvent::Deleted(n))) => {
                            bump(&mut version, &n);
                            let name = n.metadata.name.clone().unwrap_or_default();
                            if view.nodes.remove(&name).is_some() {
                                tracing::info!(registry = REGISTRY, node = %name, "node deleted");
                            }
                            false
                        }
                        Ok(Some(WatchEvent::Bookmark(b))) => {
                            version = b.metadata.resource_version;
                            continue;
                        }
                        Ok(Some(WatchEvent::Error(status))) if status.code == 410 => {
                            tracing::info!(registry = REGISTRY, %version, message = %status.message, "watch expired (410 Gone): relisting");
                            reason = Relist::Gone;
                            break 'watch;
                        }
                        Ok(Some(WatchEvent::Error(status))) => {
                            return Err(fail(format!(
                                "watch error {}: {} {}",
                                status.code, status.reason, status.message
                            )));
                        }
                        Ok(None) => {
                            tracing::debug!(registry = REGISTRY, %version, "watch ended by the server: resuming");
                            self.count(|st| {
                                st.watch_restarts = Some(st.watch_restarts.unwrap_or(0) + 1);
                            });
                            self.metrics
                                .discovery_resyncs
                                .get_or_create(&resync_labels("closed"))
                                .inc();
                            // A server (or proxy) that ends every watch at once is not hammered.
                            if watch_started.elapsed() < QUICK_END {
                                tokio::select! {
                                    () = stop.cancelled() => return Err(Ended::Stop),
                                    () = tokio::time::sleep(QUICK_END) => {}
                                }
                            }
                            continue 'watch;
                        }
                        Err(e) => return Err(fail(format!("watch nodes on {server}: {e}"))),
                    };
                    self.absorb(view, false);
                    if ours {
                        self.sync_own(&api, view).await?;
                    }
                }
            }
        }
    }

    /// Publishes the view: the other Nodes' affiliates (with the registry on) and our pod CIDRs.
    fn absorb(&self, view: &mut View, list: bool) {
        let mut affiliates: BTreeMap<String, Affiliate> = BTreeMap::new();
        let mut own_pod_cidrs: Vec<IpNet> = Vec::new();
        let mut seen_bad: BTreeMap<String, Vec<node::Bad>> = BTreeMap::new();
        let cidrs: BTreeMap<&String, Vec<IpNet>> = view
            .nodes
            .iter()
            .map(|(name, n)| (name, node::pod_cidrs(n).0))
            .collect();
        for (name, n) in &view.nodes {
            if *name == self.settings.nodename {
                if self.settings.pod_cidrs {
                    let (cidrs, bad) = node::pod_cidrs(n);
                    own_pod_cidrs = cidrs;
                    if !bad.is_empty() {
                        seen_bad.insert(name.clone(), bad);
                    }
                }
                continue;
            }
            if !self.settings.registry {
                continue;
            }
            let Some((mut a, bad)) = node::affiliate(n) else {
                continue;
            };
            let others: Vec<IpNet> = cidrs
                .iter()
                .filter(|(other, _)| **other != name)
                .flat_map(|(_, c)| c.iter().copied())
                .collect();
            node::bound(&mut a, n, &self.settings.pod_subnets, &others);
            if !bad.is_empty() {
                seen_bad.insert(name.clone(), bad);
            }
            affiliates.insert(name.clone(), a);
        }
        for (name, bad) in &seen_bad {
            if view.bad.get(name) == Some(bad) {
                continue;
            }
            for b in bad {
                tracing::warn!(registry = REGISTRY, node = %name, problem = %b, "ignoring a malformed node annotation");
                self.metrics
                    .discovery_rejected(REGISTRY, REJECTED_ANNOTATION);
            }
            let n = bad.len() as u64;
            self.count(|st| st.rejected += n);
        }
        view.bad = seen_bad;
        let now = unix_now();
        self.metrics
            .discovery_last_update_seconds
            .get_or_create(&labels())
            .set(now as i64);
        let have_own = view.nodes.contains_key(&self.settings.nodename);
        let next = (affiliates, own_pod_cidrs, have_own);
        if !list && view.published.as_ref() == Some(&next) {
            return;
        }
        view.published = Some(next.clone());
        let (affiliates, own_pod_cidrs, have_own) = next;
        let count = affiliates.len();
        self.metrics
            .discovery_affiliates
            .get_or_create(&labels())
            .set(count as i64);
        let i = self.index;
        let registry = self.settings.registry;
        self.shared.update(move |s| {
            if let Some(st) = s.status.get_mut(i) {
                st.error = None;
                st.last_update = now;
                st.affiliates = count;
            }
            if let Some(m) = s.per_registry.get_mut(i) {
                *m = affiliates;
            }
            s.own_pod_cidrs = own_pod_cidrs;
            if have_own {
                s.own_node_read = true;
            }
            if list && registry {
                s.synced = true;
            }
        });
    }

    /// Brings our Node's annotations in line with our affiliate (one merge patch, only when they
    /// differ). A missing Node is waited for (its ADDED event retries); another failure ends the
    /// session (reconnect, relist, retry).
    async fn sync_own(&self, api: &Api<Node>, view: &mut View) -> Result<(), Ended> {
        if !self.settings.registry || !self.settings.publish {
            return Ok(());
        }
        let Some(local) = self.local.borrow().clone() else {
            return Ok(());
        };
        let name = &self.settings.nodename;
        let Some(current) = view.nodes.get(name) else {
            if !view.missing_warned {
                tracing::warn!(registry = REGISTRY, node = %name, "our Node does not exist (yet): nothing to annotate; waiting for it");
                view.missing_warned = true;
            }
            return Ok(());
        };
        let want = node::annotations(&local);
        let Some(patch) = node::patch(current.metadata.annotations.as_ref(), &want) else {
            return Ok(());
        };
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(updated) => {
                view.missing_warned = false;
                view.nodes.insert(name.clone(), node::slim(updated));
                self.metrics
                    .discovery_updates
                    .get_or_create(&labels())
                    .inc();
                tracing::info!(registry = REGISTRY, node = %name, "our affiliate published as node annotations");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                view.nodes.remove(name);
                tracing::warn!(registry = REGISTRY, node = %name, "our Node does not exist (yet): nothing to annotate; waiting for it");
                view.missing_warned = true;
                Ok(())
            }
            Err(error) => Err(Ended::Failed(format!("annotate our Node {name}: {error}"))),
        }
    }
}

fn resync_labels(reason: &str) -> Vec<(String, String)> {
    vec![
        ("registry".to_owned(), REGISTRY.to_owned()),
        ("reason".to_owned(), reason.to_owned()),
    ]
}

fn bump(version: &mut String, n: &Node) {
    if let Some(v) = n
        .metadata
        .resource_version
        .as_ref()
        .filter(|v| !v.is_empty())
    {
        version.clone_from(v);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

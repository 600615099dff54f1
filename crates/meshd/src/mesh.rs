//! The running mesh: the WireGuard device, its addresses, routes and rules, the prober, and the peers.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridnet_config::{Backend as BackendChoice, Config, Mtu, PublicKey, Topology};
use ipnet::{IpNet, Ipv6Net};

use crate::identity::{self, PrivateKey};
use crate::kubespan;
use crate::metrics::Metrics;
use crate::net::{self, Net};
use crate::peer::{Action, PeerMachine, PeerState, Timing};
use crate::probe::{self, Kind, Probe};
use crate::probing;
use crate::responder::{self, Pong, Responder};
use crate::topology::{self, PathKind, Plan};
use crate::wg::kernel::Kernel;
use crate::wg::userspace::Userspace;
use crate::wg::{self, Actual, PeerStats};
use crate::{Error, plan};

mod apply;
mod backend;
mod publish;
mod specs;
pub(crate) mod trust;

pub use crate::model::{PeerSpec, Source};
pub use backend::Backend;
pub use specs::{filter_candidates, peer_specs, routes_for};

/// WireGuard persistent keepalive on every peer (keeps NAT mappings; KubeSpan uses 25 s too).
pub use crate::plan::KEEPALIVE;
/// Full resync of device and routes even without a change (drift from outside is repaired).
pub const RESYNC: Duration = Duration::from_secs(10);

/// The next probe or allocation nonce from the mesh's counter: unique per sender (a step of the golden
/// ratio's odd constant), unpredictable (mixed with a random word).
fn next_nonce(counter: &mut u64) -> u64 {
    *counter = counter.wrapping_add(0x9e37_79b9_7f4a_7c15);
    *counter ^ fastrand::u64(..)
}

/// One peer.
#[derive(Debug)]
pub struct Peer {
    /// The peer as its source describes it (name, location, source, node ID, addresses, API server port,
    /// refused prefixes): shared with the list kept for re-planning, not a second copy.
    pub spec: Arc<PeerSpec>,
    pub key: PublicKey,
    pub mesh_addr: Ipv6Addr,
    /// Shared with each plan's input (no copy per pass).
    pub allowed_ips: Arc<BTreeSet<IpNet>>,
    /// It has a public address of its own (a relay candidate).
    pub public: bool,
    /// Its last pong said it is a gateway candidate without a path to other locations.
    pub no_uplink: bool,
    /// It answered a version-3 ping (then it is pinged in version 3 only; see [`probe::encode_v2`]).
    pub speaks_v3: bool,
    /// Its clock minus ours at its last version-3 pong, in milliseconds (± half that probe's round trip).
    pub clock_offset_ms: Option<i64>,
    pub machine: PeerMachine,
    pub probe_key: [u8; 32],
    pub stats: PeerStats,
    last_rx_change: Instant,
    /// The receive and transmit counters at the last reading fed to the machine.
    counted: (u64, u64),
    pub last_seen_unix: u64,
    reported_failovers: u64,
    /// KubeSpan-compatible mode: the handshake-driven fallback for a peer that does not answer probes.
    /// Boxed: only KubeSpan-compatible mode has one.
    pub handshake: Option<Box<kubespan::Handshake>>,
    /// When the peer's machine appeared (the fallback starts after [`PROBE_GRACE`] without a pong).
    since: Instant,
    /// Order of first sight (an earlier peer keeps a mesh address a later one claims too).
    pub seniority: u64,
    /// The last WireGuard handshake, from the device's age at the last stats read (the latest seen: a
    /// reading without one keeps it).
    last_handshake_at: Option<Instant>,
}

/// KubeSpan-compatible mode: a peer that has not answered any probe this long after it appeared is run
/// as KubeSpan runs peers (first endpoint, handshakes, round robin).
pub const PROBE_GRACE: Duration = Duration::from_secs(3);

impl Peer {
    /// Whether the peer runs on WireGuard handshakes instead of probes (never answered one).
    pub fn handshake_mode(&self) -> bool {
        self.handshake.is_some() && !self.machine.paths.iter().any(|p| p.last_pong.is_some())
    }

    /// The endpoint WireGuard should use.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        match &self.handshake {
            Some(h) if self.handshake_mode() => h.endpoint(),
            _ => self.machine.active_endpoint(),
        }
    }

    /// The peer's state for status and `allowDownPeerBypass`: KubeSpan's handshake rule for a peer in
    /// handshake mode; else up when its probes say so, or when WireGuard has received from it lately
    /// (see [`TRAFFIC_ALIVE`]). Gateways and relays follow the probes only.
    pub fn state(&self) -> PeerState {
        match &self.handshake {
            Some(h) if self.handshake_mode() => h.state,
            _ if self.by_traffic() => PeerState::Up,
            _ => self.machine.state,
        }
    }
}

/// WireGuard traffic from a peer this recent means it is reachable even when it has never answered a probe
/// (a NATed peer that reaches a public node through a mapping the node cannot probe: WireGuard roams to
/// it). Persistent keepalives (25 s) keep a live session's counter moving.
pub const TRAFFIC_ALIVE: Duration = Duration::from_secs(35);

impl Peer {
    /// Up by WireGuard traffic alone: none of its paths has ever answered a probe (a peer behind a NAT
    /// that maps each destination to its own port), yet WireGuard receives from it. A peer whose probed
    /// path died is down at once, as before.
    pub fn by_traffic(&self) -> bool {
        self.machine.state != crate::peer::PeerState::Up
            && self.machine.paths.iter().all(|p| p.last_pong.is_none())
            && self.stats.rx_bytes > 0
            && self.last_rx_change.elapsed() < TRAFFIC_ALIVE
    }
}

/// The settings that, when changed, need the device to be rebuilt.
#[derive(Clone, Debug, PartialEq)]
struct DeviceKey {
    interface: String,
    listen_port: u16,
    backend: BackendChoice,
    key_file: std::path::PathBuf,
    prefix: Ipv6Net,
}

fn device_key(cfg: &Config) -> DeviceKey {
    DeviceKey {
        interface: cfg.meshd.interface.clone(),
        listen_port: cfg.meshd.listen_port,
        backend: cfg.meshd.backend,
        key_file: cfg.meshd.private_key_file.clone(),
        prefix: cfg
            .meshd
            .ula_prefix
            .unwrap_or_else(identity::default_prefix),
    }
}

/// An MSS clamping check on a blocking thread: whether clamping was on for it, and its outcome.
type ClampTask = tokio::task::JoinHandle<(bool, Result<Option<crate::nft::Outcome>, String>)>;

/// The running mesh.
#[derive(Debug)]
pub struct Mesh {
    pub cfg: Arc<Config>,
    device: DeviceKey,
    /// This node's key, shared with every plan (see [`PrivateKey`]).
    pub key: Arc<PrivateKey>,
    pub public: PublicKey,
    pub index: u32,
    pub backend: Backend,
    net: Net,
    /// The probe socket's receiver thread (answers pings, hands over pongs).
    responder: Responder,
    pub peers: HashMap<PublicKey, Peer>,
    pub prefix: Ipv6Net,
    pub mesh_addr: Ipv6Addr,
    pub mtu: u32,
    pub metrics: Metrics,
    dirty: bool,
    next_resync: Instant,
    /// When WireGuard's counters are read next (every [`probing::STATS_EVERY`]), and when a reading last
    /// counted as evidence.
    next_stats: Instant,
    last_counted: Instant,
    /// The last counter reading failed: no more until a reconcile succeeds.
    stats_failed: bool,
    timing: Arc<Timing>,
    nonce: u64,
    /// A hash of the peer cache as last written (not a copy of it: a few hundred bytes per peer).
    cache_written: Option<u64>,
    /// Peers from the config and the cache (re-read on a config change).
    base: Vec<Arc<PeerSpec>>,
    /// Peers from discovery, and whether a registry has synced since start (then cached discovered
    /// peers are no longer used).
    discovered: Vec<Arc<PeerSpec>>,
    discovery_synced: bool,
    pub last_error: Option<String>,
    pub started: Instant,
    /// TCP MSS clamping (nftables): when to check it next, the check running now (on a blocking thread:
    /// the loop never waits for nf_tables), and the last failure.
    clamp_next: Instant,
    clamp_task: Option<ClampTask>,
    pub clamp_error: Option<String>,
    /// `topology: location`: the plan (from the config) and this node's announced endpoints.
    pub plan: Option<Plan>,
    own_endpoints: Vec<SocketAddr>,
    /// The forwarding sysctls meshd changed (restored on a clean stop).
    sysctls: crate::sysctl::Sysctls,
    /// Where each peer saw our probes come from (version-2 pongs): our reflexive addresses.
    observed: HashMap<PublicKey, SocketAddr>,
    /// [`Mesh::no_uplink`] as of the last poll (pongs carry it; not recomputed per datagram).
    uplink_lost: bool,
    /// Peers in handshake mode that just moved to an endpoint: kicked after the reconcile.
    handshake_kicks: Vec<PublicKey>,
    /// The prefix conflicts of the last reconcile (logged when they change).
    conflicts: Vec<plan::Conflict>,
    /// `topology: location`: each location's active gateway as of the last reconcile (changes are counted).
    gateways: std::collections::BTreeMap<String, Option<PublicKey>>,
    /// The trust screen: this node's underlay subnets, the endpoint addresses it protects, the
    /// refusals of the last reconcile (logged when they change), the next peer's seniority.
    underlay: Vec<IpNet>,
    protected: Vec<IpAddr>,
    refused: Vec<plan::trust::Refused>,
    next_seniority: u64,
    /// What meshd knows of the device and of its routes: the last read with every change applied since
    /// (the device also as each counter reading found it). `None`: the next pass reads it (see `apply`).
    device_known: Option<Actual>,
    routes_known: Option<net::KnownRoutes>,
    /// End-to-end encrypted relaying, this node's side: the allocations it asks its relays for.
    pub relaying: crate::relay::client::Client,
    next_relay_check: Instant,
    /// A grant or a relayed path's pong changed a relayed endpoint or path: the next poll reports it.
    relay_changed: bool,
}

/// How often the relayed peers are re-planned for allocation requests (refreshes and retries are due
/// at whole seconds: this is their resolution).
const RELAY_CHECK: Duration = Duration::from_millis(250);

impl Mesh {
    /// Builds the mesh for `cfg`: key, device, addresses, rules, prober, peers.
    pub async fn start(cfg: Arc<Config>, metrics: Metrics) -> Result<Mesh, Error> {
        let m = &cfg.meshd;
        let device = device_key(&cfg);
        let key = Arc::new(identity::load_or_create(&m.private_key_file)?);
        let public = key.public();
        let prefix = device.prefix;
        let net = Net::new()?;
        let mesh_addr = if m.kubespan_compat {
            compat_address(&net, prefix, &public).await
        } else {
            identity::mesh_address(prefix, &public)
        };
        let (backend, index) = backend::open(&net, &m.interface, m.backend).await?;
        // From here on the link is ours: a start that fails removes it and the rules again.
        let setup = async {
            let specs = peer_specs(&cfg).await;
            let any_v6 = specs
                .iter()
                .flat_map(|p| &p.candidates)
                .any(|c| c.is_ipv6());
            let mtu = match m.mtu {
                Mtu::Fixed(v) => u32::from(v),
                Mtu::Auto => net::auto_mtu(&m.interface, any_v6),
            };
            net.up(index, mtu).await?;
            net.sync_addresses(index, &own_addresses(&cfg, mesh_addr))
                .await?;
            net.ensure_rules().await?;
            let responder =
                responder::start(probe::probe_port(m.listen_port), public, metrics.clone())?;
            let protected = trust::protected_endpoints(&cfg).await;
            Ok::<_, Error>((specs, mtu, responder, protected))
        };
        let (specs, mtu, responder, protected) = match setup.await {
            Ok(done) => done,
            Err(error) => {
                tracing::warn!(%error, "start failed: removing what it made");
                remove_owned(&net, backend, index).await;
                return Err(error);
            }
        };
        tracing::info!(
            interface = %m.interface, backend = backend.name(), %public, %mesh_addr, mtu,
            listen_port = m.listen_port, probe_port = probe::probe_port(m.listen_port),
            "mesh interface up"
        );
        let mut mesh = Mesh {
            device,
            key,
            public,
            index,
            backend,
            net,
            responder,
            peers: HashMap::new(),
            prefix,
            mesh_addr,
            mtu,
            metrics,
            dirty: true,
            next_resync: Instant::now(),
            next_stats: Instant::now(),
            last_counted: Instant::now(),
            stats_failed: false,
            timing: Arc::new(Timing::default()),
            nonce: fastrand::u64(..),
            cache_written: None,
            base: specs.into_iter().map(Arc::new).collect(),
            discovered: Vec::new(),
            discovery_synced: false,
            last_error: None,
            started: Instant::now(),
            clamp_next: Instant::now(),
            clamp_task: None,
            clamp_error: None,
            plan: None,
            own_endpoints: Vec::new(),
            sysctls: crate::sysctl::Sysctls::default(),
            observed: HashMap::new(),
            uplink_lost: false,
            handshake_kicks: Vec::new(),
            conflicts: Vec::new(),
            gateways: std::collections::BTreeMap::new(),
            underlay: Vec::new(),
            protected,
            refused: Vec::new(),
            next_seniority: 0,
            device_known: None,
            routes_known: None,
            relaying: crate::relay::client::Client::default(),
            next_relay_check: Instant::now(),
            relay_changed: false,
            cfg,
        };
        mesh.refresh_underlay().await;
        mesh.own_endpoints = mesh.announced().await;
        mesh.sync_clamp().await;
        let specs = mesh.combined();
        mesh.set_peers(specs, Instant::now());
        Ok(mesh)
    }

    /// Whether `cfg` can be applied to this mesh in place (same device settings).
    pub fn compatible(&self, cfg: &Config) -> bool {
        device_key(cfg) == self.device
    }

    /// Applies a new config with the same device settings: peers, addresses, MTU.
    /// `base`: [`peer_specs`] of `cfg` (resolved beforehand, off the mesh's loop).
    pub async fn update_config(
        &mut self,
        cfg: Arc<Config>,
        base: Vec<PeerSpec>,
    ) -> Result<(), Error> {
        self.base = base.into_iter().map(Arc::new).collect();
        self.forget_cached();
        let specs = self.combined();
        self.cfg = cfg;
        let any_v6 = specs
            .iter()
            .flat_map(|p| &p.candidates)
            .any(|c| c.is_ipv6());
        let m = &self.cfg.meshd;
        self.mtu = match m.mtu {
            Mtu::Fixed(v) => u32::from(v),
            Mtu::Auto => net::auto_mtu(&m.interface, any_v6),
        };
        self.net.up(self.index, self.mtu).await?;
        self.protected = trust::protected_endpoints(&self.cfg).await;
        self.own_endpoints = self.announced().await;
        self.set_peers(specs, Instant::now());
        self.dirty = true;
        self.clamp_next = Instant::now();
        Ok(())
    }

    /// Replaces the discovered peers (`synced`: a registry delivered a full snapshot).
    pub fn set_discovered(&mut self, specs: Vec<PeerSpec>, synced: bool) {
        self.discovered = specs.into_iter().map(Arc::new).collect();
        self.discovery_synced = synced;
        self.forget_cached();
        let all = self.combined();
        self.set_peers(all, Instant::now());
    }

    /// Once a registry has synced, cached peers are never used again ([`Mesh::combined`]): their specs
    /// are not kept (a second spec per discovered peer otherwise).
    fn forget_cached(&mut self) {
        if self.discovery_synced {
            self.base.retain(|s| s.source == Source::Static);
        }
    }

    /// Static peers first, then discovered ones, then (until discovery has synced) cached ones.
    fn combined(&self) -> Vec<Arc<PeerSpec>> {
        let mut out: Vec<Arc<PeerSpec>> = self
            .base
            .iter()
            .filter(|s| s.source == Source::Static)
            .cloned()
            .collect();
        for d in &self.discovered {
            if !out.iter().any(|s| s.key == d.key) {
                out.push(d.clone());
            }
        }
        if !self.discovery_synced {
            for c in self.base.iter().filter(|s| s.source != Source::Static) {
                if !out.iter().any(|s| s.key == c.key) {
                    out.push(c.clone());
                }
            }
        }
        out
    }

    /// This node's endpoints as peers see them: underlay addresses after the filter, plus the announced
    /// extras (what discovery publishes), on the listen port.
    async fn announced(&self) -> Vec<SocketAddr> {
        let m = &self.cfg.meshd;
        let addrs = self
            .net
            .underlay_addresses(self.index)
            .await
            .unwrap_or_default();
        let mut out: Vec<SocketAddr> = m
            .endpoint_filter
            .apply(&addrs)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, m.listen_port))
            .collect();
        out.extend(m.extra_announced_endpoints.iter().copied());
        out
    }

    /// The topology plan for `specs` (`topology: location`), else `None`.
    fn plan_for(&self, specs: &[Arc<PeerSpec>]) -> Option<Plan> {
        if self.cfg.meshd.topology != Topology::Location {
            return None;
        }
        let me = topology::Node {
            key: self.public,
            location: self.cfg.meshd.location.clone(),
            pin: self.cfg.meshd.gateway,
            endpoints: self.own_endpoints.clone(),
        };
        let peers: Vec<topology::Node> = specs
            .iter()
            .map(|s| topology::Node {
                key: s.key,
                location: s.location.clone(),
                // Pins come from static peers (discovery has no field for them: `auto`).
                pin: self
                    .cfg
                    .meshd
                    .peers
                    .iter()
                    .find(|p| p.public_key == s.key)
                    .map_or(topology::Pin::Auto, |p| p.gateway),
                endpoints: s.candidates.clone(),
            })
            .collect();
        Some(topology::plan(&me, &peers))
    }

    fn set_peers(&mut self, specs: Vec<Arc<PeerSpec>>, now: Instant) {
        self.plan = self.plan_for(&specs);
        let mut next = HashMap::new();
        for spec in specs {
            if spec.key == self.public {
                continue;
            }
            // Each machine probes what the plan says (native peers: private endpoints; routed: none).
            let candidates = self
                .plan
                .as_ref()
                .and_then(|plan| plan.peers.get(&spec.key))
                .map_or_else(|| spec.candidates.clone(), |p| p.probe.clone());
            // Its own addresses (discovery) tell whether it is public; a static peer's endpoints are
            // taken as its own.
            let public = if spec.addresses.is_empty() {
                candidates.iter().any(|c| topology::is_public(c.ip()))
            } else {
                spec.addresses.iter().any(|a| topology::is_public(*a))
            };
            let mesh_addr = self.peer_address(&spec);
            let mut allowed: BTreeSet<IpNet> = spec.allowed_ips.iter().copied().collect();
            allowed.insert(IpNet::from(ipnet::Ipv6Net::from(mesh_addr)));
            let allowed = Arc::new(allowed);
            let peer = match self.peers.remove(&spec.key) {
                Some(mut p) => {
                    p.machine.set_candidates(&candidates, now);
                    if let Some(h) = p.handshake.as_mut() {
                        h.set_endpoints(&candidates);
                    }
                    p.mesh_addr = mesh_addr;
                    p.allowed_ips = allowed;
                    p.public = public;
                    p.spec = spec;
                    p
                }
                None => Peer {
                    handshake: self
                        .cfg
                        .meshd
                        .kubespan_compat
                        .then(|| Box::new(kubespan::Handshake::new(&candidates, now))),
                    since: now,
                    seniority: {
                        self.next_seniority += 1;
                        self.next_seniority
                    },
                    last_handshake_at: None,
                    probe_key: probe::key(&self.key.shared(&spec.key)),
                    machine: PeerMachine::new(&candidates, Arc::clone(&self.timing), now),
                    key: spec.key,
                    spec,
                    mesh_addr,
                    allowed_ips: allowed,
                    public,
                    no_uplink: false,
                    speaks_v3: false,
                    clock_offset_ms: None,
                    stats: PeerStats::default(),
                    last_rx_change: now,
                    counted: (0, 0),
                    last_seen_unix: 0,
                    reported_failovers: 0,
                },
            };
            next.insert(peer.key, peer);
        }
        for (_, gone) in self.peers.drain() {
            tracing::info!(peer = %gone.spec.name, "peer removed");
            self.metrics.peer_table.remove(&gone.key);
        }
        self.peers = next;
        let keys = self.peers.values().map(|p| (p.key, p.probe_key)).collect();
        match self.responder.shared.keys.write() {
            Ok(mut k) => *k = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        self.metrics.peers.set(self.peers.len() as i64);
        for source in Source::ALL {
            let n = self
                .peers
                .values()
                .filter(|p| p.spec.source == source)
                .count();
            self.metrics
                .peers_by_source
                .get_or_create(&vec![("source".to_owned(), source.as_str().to_owned())])
                .set(n as i64);
        }
        self.dirty = true;
    }

    /// When [`Mesh::poll`] has something to do next (at most a second away).
    pub fn next_wakeup(&self) -> Instant {
        let cap = Instant::now() + Duration::from_secs(1);
        self.peers
            .values()
            .filter_map(|p| p.machine.next_wakeup())
            .min()
            .map_or(cap, |t| t.min(cap))
            .min(self.next_resync)
            .min(self.next_stats)
    }

    /// Runs the peer machines and applies what they decide. Returns whether a peer changed its state or
    /// endpoint (worth reporting at once).
    pub async fn poll(&mut self, now: Instant) -> bool {
        // Pongs that arrived before now count before any probe is judged missed: after a stall of this
        // loop (a starved CPU) the responder thread has queued them with their arrival times, and judging
        // first would fail over every peer whose pong waits in the queue.
        while let Ok(pong) = self.responder.pongs.try_recv() {
            self.handle_pong(&pong);
        }
        let mut changed = false;
        let mut probes = Vec::new();
        let mut counter = self.nonce;
        // Not in a pass that reconciles: a broken device is repaired first.
        let reconciling = self.dirty || now >= self.next_resync;
        if now >= self.next_stats && !self.stats_failed && !reconciling {
            // WireGuard's counters are the evidence of liveness for peers carrying traffic. A device that
            // does not answer is repaired by a reconcile in this very poll (see `refresh_stats`).
            let started = Instant::now();
            if let Err(error) = self.refresh_stats().await {
                tracing::debug!(%error, "cannot read the device counters");
            }
            self.next_stats = now + probing::stats_interval(started.elapsed());
        }
        let planning = probing::Planning::new(self.plan.as_ref(), &self.timing, |k| {
            self.peers
                .get(k)
                .map_or(PeerState::Unknown, |p| p.machine.state)
        });
        for peer in self.peers.values_mut() {
            // Traffic over WireGuard proves a path; native traffic is out of its sight (see `probing`).
            peer.machine
                .set_need(planning.need(self.plan.as_ref(), &peer.key));
            let actions = peer.machine.poll(now, &mut || next_nonce(&mut counter));
            for action in actions {
                match action {
                    Action::Probe { endpoint, nonce } => probes.push((peer.key, endpoint, nonce)),
                    Action::SetEndpoint(ep) => {
                        changed = true;
                        tracing::info!(peer = %peer.spec.name, endpoint = %ep, failovers = peer.machine.failovers, "active endpoint");
                        self.dirty = true;
                    }
                    Action::State(state) => {
                        changed = true;
                        tracing::info!(peer = %peer.spec.name, state = state.as_str(), "peer state");
                        // Routes (bypass), gateways and relays follow peer states.
                        self.dirty = true;
                    }
                }
            }
        }
        self.nonce = counter;
        // KubeSpan-compatible mode: peers that never answered a probe run on handshakes.
        for peer in self.peers.values_mut() {
            if now.saturating_duration_since(peer.since) < PROBE_GRACE || !peer.handshake_mode() {
                continue;
            }
            // Data received from the peer is as good as a handshake: it arrives only on a working session
            // (a responder's boringtun shows no handshake time until the initiator's first data).
            let received = (peer.stats.rx_bytes > 0).then_some(peer.last_rx_change);
            let last = peer.last_handshake_at.max(received);
            let Some(h) = peer.handshake.as_mut() else {
                continue;
            };
            let before = h.state;
            if let Some(ep) = h.poll(now, last) {
                tracing::info!(peer = %peer.spec.name, endpoint = %ep, "active endpoint (no probe answers: WireGuard handshakes decide, as in KubeSpan)");
                changed = true;
                self.dirty = true;
                // Traffic now, so the session at the new endpoint is proven (or a handshake starts) after
                // the change, even when WireGuard had already roamed there and nothing is reconfigured.
                self.handshake_kicks.push(peer.key);
            }
            if h.state != before {
                tracing::info!(peer = %peer.spec.name, state = h.state.as_str(), "peer state (handshakes)");
                changed = true;
                if self.cfg.meshd.allow_down_peer_bypass {
                    self.dirty = true;
                }
            }
        }
        let lost = self.no_uplink();
        if lost != self.uplink_lost {
            tracing::warn!(
                lost,
                "uplink to the other locations (pongs tell this location's nodes)"
            );
            self.uplink_lost = lost;
            self.responder
                .shared
                .no_uplink
                .store(lost, std::sync::atomic::Ordering::Relaxed);
        }
        for (key, endpoint, nonce) in probes {
            self.send_probe(key, endpoint, nonce).await;
        }
        if now >= self.next_relay_check {
            self.next_relay_check = now + RELAY_CHECK;
            // A relayed endpoint that went, or a relayed path that died or came alive: report at once.
            changed |= self.relay_requests(now);
        }
        if std::mem::take(&mut self.relay_changed) {
            changed = true;
        }
        if self
            .clamp_task
            .as_ref()
            .is_some_and(tokio::task::JoinHandle::is_finished)
        {
            self.collect_clamp().await;
        }
        if now >= self.clamp_next && self.clamp_task.is_none() {
            self.start_clamp();
        }
        if now >= self.next_resync {
            // Our own addresses decide whether we are public (relays) or a gateway candidate: re-read
            // them with every resync, re-plan when they changed.
            if self.refresh_underlay().await {
                self.dirty = true;
            }
            let endpoints = self.announced().await;
            if endpoints != self.own_endpoints {
                tracing::info!(?endpoints, "own endpoints changed");
                self.own_endpoints = endpoints;
                let specs = self.combined();
                self.set_peers(specs, now);
            }
        }
        if self.dirty || now >= self.next_resync {
            match self.reconcile(now >= self.next_resync).await {
                Ok(()) => {
                    self.dirty = false;
                    self.stats_failed = false;
                    self.last_error = None;
                    self.next_resync = now + RESYNC;
                }
                Err(error) => {
                    self.metrics.reconcile_errors.inc();
                    tracing::warn!(%error, "reconcile failed; retrying in 1s");
                    self.last_error = Some(error.to_string());
                    self.next_resync = now + Duration::from_secs(1);
                    self.dirty = false;
                }
            }
        }
        if !self.handshake_kicks.is_empty() {
            let keys = std::mem::take(&mut self.handshake_kicks);
            self.kick_peers(&keys);
        }
        changed
    }

    /// End-to-end encrypted relaying: grants allocations when this node may relay (public, `relay: auto`),
    /// and asks the relay of each relayed peer for one (see [`crate::relay::client`]). Returns whether a
    /// relayed endpoint or a relayed path's state changed.
    fn relay_requests(&mut self, now: Instant) -> bool {
        let own_public = self.own_public();
        let relays = self.cfg.meshd.relay == hybridnet_config::RelayMode::Auto && own_public;
        self.responder
            .shared
            .relay
            .store(relays, std::sync::atomic::Ordering::Relaxed);
        // Only a down peer is relayed: without one, no plan (and no X25519 per peer) is needed.
        let any_down = self
            .peers
            .values()
            .any(|p| p.machine.state == PeerState::Down);
        let wanted: std::collections::BTreeMap<PublicKey, (PublicKey, SocketAddr)> = if own_public
            || !any_down
            || self.cfg.meshd.relay == hybridnet_config::RelayMode::Never
        {
            std::collections::BTreeMap::new()
        } else {
            plan::relays(&self.inputs())
                .into_iter()
                .filter_map(|(peer, relay)| {
                    let at = self.peers.get(&relay)?.machine.active_endpoint()?;
                    Some((peer, (relay, probe::probe_addr(at))))
                })
                .collect()
        };
        let mut counter = self.nonce;
        let (due, changed) = self
            .relaying
            .poll(now, &wanted, || next_nonce(&mut counter));
        self.nonce = counter;
        if changed {
            self.dirty = true;
        }
        for request in due {
            let Some(relay) = self.peers.get(&request.relay) else {
                continue;
            };
            let ask = Probe {
                kind: Kind::Allocate,
                sender: self.public,
                nonce: request.nonce,
                timestamp_us: probe::now_us(),
                observed: None,
                target: Some(request.to),
                flags: 0,
            };
            let alloc = probe::Alloc {
                other: request.peer,
                result: probe::AllocResult::Granted,
                port: 0,
                lifetime_s: 0,
            };
            let datagram = probe::encode_alloc(&ask, &alloc, &relay.probe_key);
            if let Err(error) = self
                .responder
                .socket
                .send_to(&datagram, v6_mapped(request.to))
            {
                tracing::debug!(to = %request.to, %error, "allocation request not sent");
            }
        }
        let path_changed = self.probe_relayed_paths(now);
        self.metrics
            .relay_grants
            .set(i64::try_from(self.relaying.endpoints().len()).unwrap_or(i64::MAX));
        changed || path_changed
    }

    /// Pings each granted relayed path at its relay port, from the probe socket (see
    /// [`crate::relay::client`]); a path that died (or came alive) re-plans. Returns whether one did.
    fn probe_relayed_paths(&mut self, now: Instant) -> bool {
        use crate::relay::client::{Heard, PathState};
        let mut counter = self.nonce;
        let peers = &self.peers;
        // While the counters cannot be read, their last receipt says nothing about the path now.
        let counted = !self.stats_failed;
        let heard = |k: &PublicKey| {
            peers.get(k).map_or_else(Heard::default, |p| Heard {
                last_handshake: p.last_handshake_at,
                last_received: counted.then_some(p.last_rx_change),
            })
        };
        let (pings, failed) = self
            .relaying
            .probe_paths(now, heard, || next_nonce(&mut counter));
        self.nonce = counter;
        for f in &failed {
            self.dirty = true;
            let peer = self.peers.get(&f.peer).map(|p| p.spec.name.clone());
            let relay = self.peers.get(&f.relay).map(|p| p.spec.name.clone());
            if f.reason == PathState::Dead {
                self.metrics.relay_path_failed("no_pongs");
                tracing::warn!(
                    ?peer,
                    ?relay,
                    "relayed path dead (no pongs through the relay)"
                );
            } else {
                self.metrics.relay_path_failed("no_handshake");
                tracing::warn!(
                    ?peer,
                    ?relay,
                    why = f.why,
                    "relayed path carries no WireGuard (its probes answer): the relay is left for this peer"
                );
            }
        }
        for ping in pings {
            let Some(peer) = self.peers.get(&ping.peer) else {
                continue;
            };
            let datagram = probe::encode(&self.ping(ping.nonce, ping.to), &peer.probe_key);
            self.metrics.probes_sent.inc();
            if let Err(error) = self.responder.socket.send_to(&datagram, v6_mapped(ping.to)) {
                tracing::debug!(to = %ping.to, %error, "relayed path probe not sent");
            }
        }
        !failed.is_empty()
    }

    /// A relay's answer to one of our allocation requests.
    fn handle_grant(&mut self, pong: &Pong, alloc: &probe::Alloc) {
        let probe = &pong.probe;
        let now = Instant::now();
        match self.relaying.on_answer(
            now,
            probe.sender,
            pong.from,
            probe.nonce,
            probe.target,
            alloc,
        ) {
            None => self.metrics.dropped("unbound"),
            Some(changed) => {
                let relay = self.peers.get(&probe.sender).map(|p| p.spec.name.clone());
                let peer = self.peers.get(&alloc.other).map(|p| p.spec.name.clone());
                if alloc.result == probe::AllocResult::Granted {
                    if changed {
                        tracing::info!(
                            ?peer,
                            ?relay,
                            port = alloc.port,
                            lifetime_s = alloc.lifetime_s,
                            "relay allocation granted"
                        );
                    }
                } else {
                    tracing::warn!(
                        ?peer,
                        ?relay,
                        reason = alloc.result.as_str(),
                        "relay allocation refused"
                    );
                }
                if changed {
                    self.dirty = true;
                    self.relay_changed = true;
                }
            }
        }
    }

    /// A version-3 ping from this node, stamped now, naming `target` (the address it is sent to).
    fn ping(&self, nonce: u64, target: SocketAddr) -> Probe {
        Probe {
            kind: Kind::Ping,
            sender: self.public,
            nonce,
            timestamp_us: probe::now_us(),
            observed: None,
            target: Some(target),
            flags: 0,
        }
    }

    async fn send_probe(&mut self, key: PublicKey, endpoint: SocketAddr, nonce: u64) {
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let target = probe::probe_addr(endpoint);
        let ping = self.ping(nonce, target);
        let mut datagrams = vec![probe::encode(&ping, &peer.probe_key)];
        if !peer.speaks_v3 {
            // The rolling upgrade: the same ping in version 2 too, until the peer answers in version 3.
            datagrams.push(probe::encode_v2(&ping, &peer.probe_key));
        }
        let to = v6_mapped(target);
        self.metrics.probes_sent.inc();
        let mut sent = Ok(0);
        for datagram in &datagrams {
            sent = sent.and(self.responder.socket.send_to(datagram, to));
        }
        if let Err(error) = sent {
            tracing::debug!(%to, %error, "probe not sent");
            if hybridnet_runtime::limits::is_local_pressure(&error)
                && let Some(peer) = self.peers.get_mut(&key)
            {
                peer.machine.not_sent(nonce);
            }
        }
    }

    /// Waits for a pong from the responder thread and handles it. An error means the thread is gone.
    pub async fn recv(&mut self) -> Result<(), Error> {
        let pong = self
            .responder
            .pongs
            .recv()
            .await
            .ok_or_else(|| Error::Io("the probe responder thread stopped".into()))?;
        self.handle_pong(&pong);
        Ok(())
    }

    /// A gateway candidate that reaches none of the other locations' candidates (while there are some):
    /// its pongs say so, and its location's private nodes pick another gateway (a gateway that is up on
    /// its LAN but cut from the WAN must not hold its location: Kilo's leader does).
    fn no_uplink(&self) -> bool {
        let Some(plan) = &self.plan else {
            return false;
        };
        if !plan.candidate {
            return false;
        }
        let mut remote = plan
            .peers
            .iter()
            .filter(|(_, p)| {
                p.candidate && p.role == topology::Role::Direct && p.location != plan.location
            })
            .peekable();
        if remote.peek().is_none() {
            return false;
        }
        // Down (every path tried), not merely untested: a gateway that is starting is not flagged. A
        // remote candidate reached through a relay (granted, the relayed path not dead) is an uplink.
        let relayed = self.relaying.endpoints();
        remote.all(|(k, _)| {
            self.peers
                .get(k)
                .is_none_or(|p| p.machine.state == crate::peer::PeerState::Down)
                && !relayed.contains_key(k)
        })
    }

    fn handle_pong(&mut self, pong: &Pong) {
        if let Some(alloc) = &pong.alloc {
            self.handle_grant(pong, alloc);
            return;
        }
        let probe = &pong.probe;
        // A pong through a relay answers a probe of the relayed path (bound to the relay port it went to).
        if !pong.v2
            && let Some(changed) =
                self.relaying
                    .on_pong(pong.at, probe.sender, pong.from, probe.nonce, probe.target)
        {
            self.metrics.probes_answered.inc();
            if changed {
                let peer = self.peers.get(&probe.sender).map(|p| p.spec.name.clone());
                tracing::info!(?peer, "relayed path alive (pongs through the relay)");
                self.dirty = true;
                self.relay_changed = true;
            }
            return;
        }
        let Some(peer) = self.peers.get_mut(&probe.sender) else {
            return;
        };
        // Bound to the endpoint it answers: from the address the ping went to, echoing it as the target
        // (under the MAC). A pong for another path's ping, or from elsewhere, is not taken.
        let sent_to = peer.machine.endpoint_of(probe.nonce).map(probe::probe_addr);
        if !probe::bound(sent_to, probe, pong.from, pong.v2) {
            if sent_to.is_some() {
                self.metrics.dropped("unbound");
                tracing::debug!(peer = %peer.spec.name, from = %pong.from, target = ?probe.target, expected = ?sent_to, "pong not bound to its ping's endpoint");
            }
            return;
        }
        let sent = peer.machine.sent_at(probe.nonce);
        if peer.machine.on_pong(probe.nonce, pong.at) {
            peer.speaks_v3 |= !pong.v2;
            // A version-2 pong echoes our own timestamp: no clock of theirs in it.
            if let Some(sent) = sent.filter(|_| !pong.v2) {
                peer.clock_offset_ms = probe::clock_offset_ms(
                    probe.timestamp_us,
                    probe::now_us(),
                    pong.at.elapsed(),
                    pong.at.saturating_duration_since(sent),
                );
            }
            peer.last_seen_unix = hybridnet_state::unix_now();
            self.metrics.probes_answered.inc();
            if let Some(observed) = probe.observed {
                self.observed.insert(peer.key, observed);
            }
            let no_uplink = probe.flags & probe::NO_UPLINK != 0;
            if peer.no_uplink != no_uplink {
                peer.no_uplink = no_uplink;
                tracing::info!(peer = %peer.spec.name, no_uplink, "gateway uplink");
                self.dirty = true;
            }
        }
    }

    /// Everything the desired state depends on, as of now.
    pub fn inputs(&self) -> plan::Inputs {
        let m = &self.cfg.meshd;
        plan::Inputs {
            private_key: self.key.clone(),
            interface: m.interface.clone(),
            mtu: self.mtu,
            listen_port: m.listen_port,
            preshared_key: if m.kubespan_compat {
                self.cfg.cluster.secret.as_ref().map(|s| s.0)
            } else {
                None
            },
            prefix: self.prefix,
            mesh_addr: self.mesh_addr,
            addresses: m.addresses.clone(),
            bypass: m.allow_down_peer_bypass,
            clamp_mss: m.clamp_mss,
            own_public: self.own_public(),
            topology: self.plan.clone(),
            relay: m.relay,
            relays_allowed: m.relays.clone(),
            relay_grants: self.relaying.endpoints(),
            relay_excluded: self.relaying.excluded(Instant::now()),
            peers: self
                .peers
                .values()
                .map(|p| plan::PeerInput {
                    key: p.key,
                    allowed_ips: Arc::clone(&p.allowed_ips),
                    public: p.public,
                    probe_state: p.machine.state,
                    state: self.peer_state(p),
                    active: p.machine.active_endpoint(),
                    endpoint: p.endpoint(),
                    no_uplink: p.no_uplink,
                })
                .collect(),
            trust: self.trust(),
        }
    }

    /// A peer's state for routes and status: [`Peer::state`], except that a relayed peer (or one whose
    /// relayed path died lately) is not up by WireGuard traffic alone (that traffic came through the
    /// relay: its relayed path's probes decide).
    pub fn peer_state(&self, p: &Peer) -> PeerState {
        if p.by_traffic() && self.relaying.involved(&p.key) {
            p.machine.state
        } else {
            p.state()
        }
    }

    /// A peer's state as `meshd status` and the metrics report it, given the plan's `paths`: a peer behind
    /// a gateway is as up as its gateway (its own machine probes nothing), a relayed peer as its relayed
    /// path (granted, not dead) and its relay, any other peer as [`Mesh::peer_state`].
    pub fn reported_state(
        &self,
        p: &Peer,
        paths: &std::collections::BTreeMap<PublicKey, PathKind>,
    ) -> PeerState {
        let reach = |k: &PublicKey| match paths.get(k) {
            Some(PathKind::Relayed { via }) => match self.relaying.path_state(k) {
                Some(s) if !s.is_dead() => self
                    .peers
                    .get(via)
                    .map_or(PeerState::Down, |r| r.machine.state),
                _ => PeerState::Down,
            },
            _ => self
                .peers
                .get(k)
                .map_or(PeerState::Down, |g| g.machine.state),
        };
        match paths.get(&p.key) {
            Some(PathKind::Gateway { via: Some(g) }) if *g == self.public => PeerState::Up,
            Some(PathKind::Gateway { via: Some(g) }) => reach(g),
            Some(PathKind::Gateway { via: None }) => PeerState::Down,
            Some(PathKind::Relayed { .. }) => reach(&p.key),
            _ => self.peer_state(p),
        }
    }

    /// The relay's forwarder (see [`crate::forwarder`]).
    pub fn forwarder(&self) -> &crate::forwarder::Forwarder {
        &self.responder.forwarder
    }

    /// Whether this node grants relay allocations now (public, `meshd.relay: auto`).
    pub fn relays_for_others(&self) -> bool {
        self.responder
            .shared
            .relay
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The desired state of every resource, as of now (see [`plan::plan`]).
    pub fn planned(&self) -> plan::Desired {
        plan::plan(&self.inputs())
    }

    /// What the pongs of public peers say about our NAT (see [`topology::nat`]).
    pub fn nat(&self) -> topology::NatView {
        let own: Vec<IpAddr> = self.own_endpoints.iter().map(SocketAddr::ip).collect();
        let seen: Vec<SocketAddr> = self
            .observed
            .iter()
            .filter(|(k, _)| self.peers.get(k).is_some_and(|p| p.public))
            .map(|(_, a)| *a)
            .collect();
        topology::nat(&own, probe::probe_port(self.cfg.meshd.listen_port), &seen)
    }

    /// Endpoints to announce besides our own addresses: the reflexive address on the WireGuard port, when
    /// the NAT keeps source ports (then the WireGuard port is mapped to itself too).
    pub fn reflexive_endpoints(&self) -> Vec<SocketAddr> {
        let nat = self.nat();
        if nat.kind != topology::NatKind::Preserving {
            return Vec::new();
        }
        nat.reflexive
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.cfg.meshd.listen_port))
            .collect()
    }

    /// Whether this node has a public address of its own (then it relays and is never relayed).
    fn own_public(&self) -> bool {
        self.own_endpoints
            .iter()
            .any(|e| topology::is_public(e.ip()))
    }

    /// TCP MSS clamping: checks meshd's nftables table and rewrites it when it is missing or different
    /// (flushed by someone, left by an older version), or removes it when `clampMSS` is off. A failure
    /// (e.g. a kernel without nf_tables) is logged and shown in the status; the mesh works without it.
    /// At start: the check, waited for (the table is in place before the first packet is forwarded).
    async fn sync_clamp(&mut self) {
        self.start_clamp();
        self.collect_clamp().await;
    }

    /// Starts the check on a blocking thread; [`Mesh::poll`] collects it once it has finished.
    fn start_clamp(&mut self) {
        self.clamp_next = Instant::now() + RESYNC;
        let enabled = self.cfg.meshd.clamp_mss;
        let interface = self.cfg.meshd.interface.clone();
        self.clamp_task = Some(tokio::task::spawn_blocking(move || {
            let result = if enabled {
                crate::nft::check(&interface).map(Some)
            } else {
                crate::nft::remove().map(|()| None)
            };
            (enabled, result.map_err(|e| e.to_string()))
        }));
    }

    /// Takes the running check's result (waiting for it if it has not finished) and records it.
    async fn collect_clamp(&mut self) {
        let Some(task) = self.clamp_task.take() else {
            return;
        };
        let (enabled, result) = match task.await {
            Ok(done) => done,
            Err(join) => (
                self.cfg.meshd.clamp_mss,
                Err(format!("MSS clamping task: {join}")),
            ),
        };
        match result {
            Ok(outcome) => {
                if !enabled {
                    // Removed once; again only after a config change (not a table churn every 10 s).
                    self.clamp_next = Instant::now() + Duration::from_secs(24 * 3600);
                }
                if outcome == Some(crate::nft::Outcome::Installed) {
                    self.metrics.mss_clamp_installs.inc();
                    tracing::info!(table = crate::nft::TABLE, interface = %self.cfg.meshd.interface, "MSS clamping rule installed");
                }
                self.metrics.mss_clamp_ok.set(i64::from(enabled));
                self.metrics.mss_clamp_enabled.set(i64::from(enabled));
                self.clamp_error = None;
            }
            Err(error) => {
                self.metrics.mss_clamp_ok.set(0);
                self.metrics.mss_clamp_enabled.set(i64::from(enabled));
                if self.clamp_error.as_ref() != Some(&error) {
                    tracing::warn!(%error, "MSS clamping (nftables) failed; retrying every 10 s");
                }
                self.clamp_error = Some(error);
            }
        }
    }

    /// A peer added to boringtun (new, or re-added after its device was re-created) has no session, and the
    /// other side may still send on an old one, which nobody can decrypt, until its own keepalive-plus-rekey
    /// timeout (15 s). One datagram through the tunnel to each added peer makes this side initiate a
    /// handshake at once, which replaces the stale session on the other side too. The datagram goes to the
    /// discard port of the peer's mesh address. A peer whose endpoint changed gets one too: with a session
    /// (kept: updates are in place) it goes on that session to the new endpoint, so the other side roams at
    /// once; without one (boringtun then starts the peer afresh, see `vendor/boringtun/HYBRIDNET-PATCH.md`)
    /// it starts the handshake to the new endpoint now rather than at the old one's next retry (5 s).
    fn kick(&self, update: &wg::Update) {
        let keys: Vec<&PublicKey> = update
            .peers
            .iter()
            .filter_map(|op| match op {
                wg::PeerOp::Add(key, config) if config.endpoint.is_some() => Some(key),
                wg::PeerOp::Update {
                    key,
                    endpoint: true,
                    ..
                } => Some(key),
                _ => None,
            })
            .collect();
        let keys: Vec<PublicKey> = keys.into_iter().copied().collect();
        self.kick_peers(&keys);
    }

    /// One datagram through the tunnel to each of `keys` (the discard port of its mesh address): WireGuard
    /// starts a handshake if there is no session, or sends it on the current one.
    fn kick_peers(&self, keys: &[PublicKey]) {
        if keys.is_empty() {
            return;
        }
        let Ok(socket) = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)) else {
            return;
        };
        let _ = socket.set_nonblocking(true);
        for key in keys {
            if let Some(peer) = self.peers.get(key) {
                let _ = socket.send_to(b"hybridnet-meshd-kick", (peer.mesh_addr, 9));
            }
        }
    }

    /// Reads counters from the device (for status and metrics). A device that does not answer (a userspace
    /// device whose link was deleted times out after 5 s) is marked failed, and [`Mesh::poll`] does not
    /// read it again until a reconcile has repaired it; that reconcile comes in the same poll, not at the
    /// next resync: readings that each waited out the timeout would hold the loop, and the repair, back.
    async fn refresh_stats(&mut self) -> Result<(), Error> {
        match self.backend.get().await {
            Ok(mut actual) => {
                self.absorb_stats(&actual);
                // One copy of each peer's allowed IPs (see `wg::share_allowed`).
                let peers = &self.peers;
                wg::share_allowed(&mut actual, |k| peers.get(k).map(|p| &p.allowed_ips));
                // The freshest view of the device for the next change's diff (e.g. where WireGuard
                // roamed a peer to).
                self.device_known = Some(actual);
                Ok(())
            }
            Err(error) => {
                self.stats_failed = true;
                self.dirty = true;
                self.forget_kernel();
                Err(error)
            }
        }
    }

    fn absorb_stats(&mut self, actual: &Actual) {
        let now = Instant::now();
        let counted =
            now.saturating_duration_since(self.last_counted) >= probing::STATS_MIN_SPACING;
        if counted {
            self.last_counted = now;
            self.metrics.counter_reads.inc();
        }
        for (key, (config, stats)) in &actual.peers {
            if let Some(peer) = self.peers.get_mut(key) {
                if stats.rx_bytes != peer.stats.rx_bytes {
                    peer.last_rx_change = now;
                }
                if counted {
                    // Readings closer together than that (a reconcile right after a poll) would see
                    // flowing traffic as stopped. WireGuard roams: its endpoint follows the source of the
                    // peer's packets, so bytes received while the device's endpoint is not our active path
                    // came another way, and prove nothing about the path we send on (found in the QEMU
                    // test: the other VM's traffic over the public path kept a blackholed private path
                    // "alive").
                    let on_active = match (config.endpoint, peer.machine.active_endpoint()) {
                        (Some(device), Some(active)) => {
                            net::unmapped(device) == net::unmapped(active)
                        }
                        _ => true,
                    };
                    peer.machine.on_counters(
                        on_active && stats.rx_bytes != peer.counted.0,
                        stats.tx_bytes != peer.counted.1,
                        now,
                    );
                    peer.counted = (stats.rx_bytes, stats.tx_bytes);
                }
                // Kept across a reading without one: boringtun reports no handshake while its session
                // has expired and the next is under way (an idle session: 180 s to 205 s after the
                // last), where the kernel keeps reporting the last one.
                let read = stats.last_handshake.and_then(|age| now.checked_sub(age));
                peer.last_handshake_at = peer.last_handshake_at.max(read);
                peer.stats = *stats;
            }
        }
    }

    /// A peer's allowed IPs as the WireGuard device holds them, as far as meshd knows (the last read and the
    /// changes applied since; `None` before the first read, or after a failure until the next).
    pub fn device_allowed(&self, key: &PublicKey) -> Option<&BTreeSet<IpNet>> {
        let (config, _) = self.device_known.as_ref()?.peers.get(key)?;
        Some(&config.allowed_ips)
    }

    /// This node's underlay addresses.
    pub async fn underlay_addresses(&self) -> Result<Vec<IpAddr>, Error> {
        self.net.underlay_addresses(self.index).await
    }

    /// Removes what meshd created: its MSS clamping table, its rules, and its link (the kernel link is
    /// deleted; the userspace TUN device goes when the device stops).
    pub async fn shutdown(mut self) {
        self.sysctls.restore();
        self.responder.stop().await;
        // A check still running could write the table again after the removal below.
        if let Some(task) = self.clamp_task.take() {
            let _finished = task.await;
        }
        remove_owned(&self.net, self.backend, self.index).await;
        tracing::info!("mesh removed");
    }
}

impl Mesh {
    /// A peer's mesh address: derived from its key, or in KubeSpan-compatible mode the address it
    /// announced (else the first /128 of its allowed IPs inside the mesh prefix, else derived).
    fn peer_address(&self, spec: &PeerSpec) -> Ipv6Addr {
        if self.cfg.meshd.kubespan_compat {
            let listed = spec.allowed_ips.iter().find_map(|n| match n {
                IpNet::V6(v) if v.prefix_len() == 128 && self.prefix.contains(v) => Some(v.addr()),
                _ => None,
            });
            if let Some(a) = spec.mesh_address.or(listed) {
                return a;
            }
        }
        identity::mesh_address(self.prefix, &spec.key)
    }
}

/// Removes what meshd owns: its MSS clamping table, its rules, and its link (the kernel link is deleted;
/// the userspace TUN device goes when the device stops). Used on stop and after a failed start.
async fn remove_owned(net: &Net, backend: Backend, index: u32) {
    match tokio::task::spawn_blocking(crate::nft::remove).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot remove the MSS clamping table"),
        Err(error) => tracing::warn!(%error, "cannot remove the MSS clamping table"),
    }
    if let Err(error) = net.remove_rules().await {
        tracing::warn!(%error, "cannot remove meshd's rules");
    }
    match backend {
        Backend::Kernel(_) => {
            if let Err(error) = net.delete_link(index).await {
                tracing::warn!(%error, "cannot delete the WireGuard link");
            }
        }
        Backend::Userspace(u) => drop(u),
    }
}

/// This node's KubeSpan-compatible address: the EUI-64 of the first physical NIC's MAC in the prefix, as
/// Talos computes it; without a physical NIC (a container, a network namespace of veths), the first ether
/// link's MAC, and failing that the key-derived address (Talos peers take it from our affiliate either
/// way).
async fn compat_address(net: &Net, prefix: Ipv6Net, public: &PublicKey) -> Ipv6Addr {
    let links = match net.links().await {
        Ok(l) => l,
        Err(error) => {
            tracing::warn!(%error, "cannot list links for the KubeSpan address; using the key-derived one");
            return identity::mesh_address(prefix, public);
        }
    };
    let chosen = kubespan::first_physical_mac(&links).or_else(|| {
        let l = kubespan::first_any_mac(&links);
        if let Some(l) = l {
            tracing::warn!(link = %l.name, "no physical NIC: the KubeSpan address comes from a virtual link's MAC (Talos would have none)");
        }
        l
    });
    match chosen.and_then(|l| kubespan::eui64(prefix, &l.mac).map(|a| (l, a))) {
        Some((l, addr)) => {
            tracing::info!(link = %l.name, %addr, "KubeSpan-compatible address (EUI-64 of the first MAC)");
            addr
        }
        None => {
            tracing::warn!("no MAC for the KubeSpan address; using the key-derived one");
            identity::mesh_address(prefix, public)
        }
    }
}

fn v6_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

/// This node's addresses on the mesh interface: the mesh /128 and the configured ones.
fn own_addresses(cfg: &Config, mesh_addr: Ipv6Addr) -> BTreeSet<IpNet> {
    let mut set: BTreeSet<IpNet> = cfg.meshd.addresses.iter().copied().collect();
    set.insert(IpNet::V6(Ipv6Net::from(mesh_addr)));
    set
}

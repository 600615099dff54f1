//! The running mesh: the WireGuard device, its addresses, routes and rules, the prober, and the peers.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridnet_config::{Backend as BackendChoice, Config, Mtu, PublicKey};
use ipnet::{IpNet, Ipv6Net};
use tokio::net::UdpSocket;

use crate::identity::{self, PrivateKey};
use crate::metrics::{self, Metrics};
use crate::net::{self, Net};
use crate::peer::{Action, PeerMachine, PeerState, Timing};
use crate::probe::{self, Kind, Probe};
use crate::wg::kernel::Kernel;
use crate::wg::userspace::Userspace;
use crate::wg::{self, Actual, Desired, PeerConfig, PeerStats};
use crate::{Error, cache};

/// WireGuard persistent keepalive on every peer (keeps NAT mappings; KubeSpan uses 25 s too).
pub const KEEPALIVE: u16 = 25;
/// A peer whose receive counter has not moved for this long is idle (its active path is probed less).
pub const IDLE_AFTER: Duration = Duration::from_secs(30);
/// Full resync of device and routes even without a change (drift from outside is repaired).
pub const RESYNC: Duration = Duration::from_secs(10);

/// One of the two backends.
#[derive(Debug)]
pub enum Backend {
    Userspace(Box<Userspace>),
    Kernel(Kernel),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Userspace(_) => "userspace",
            Backend::Kernel(_) => "kernel",
        }
    }

    async fn get(&mut self) -> Result<Actual, Error> {
        match self {
            Backend::Userspace(u) => u.get(),
            Backend::Kernel(k) => k.get().await,
        }
    }

    async fn apply(&mut self, update: &wg::Update) -> Result<(), Error> {
        match self {
            Backend::Userspace(u) => u.apply(update),
            Backend::Kernel(k) => k.apply(update).await,
        }
    }
}

/// One peer.
#[derive(Debug)]
pub struct Peer {
    pub name: String,
    pub key: PublicKey,
    pub mesh_addr: Ipv6Addr,
    pub allowed_ips: BTreeSet<IpNet>,
    pub location: Option<String>,
    pub source: String,
    pub machine: PeerMachine,
    pub probe_key: [u8; 32],
    pub stats: PeerStats,
    last_rx_change: Instant,
    pub last_seen_unix: u64,
    reported_failovers: u64,
}

/// A peer as the config (or the cache) describes it.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    pub key: PublicKey,
    pub candidates: Vec<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub location: Option<String>,
    pub source: String,
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

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The running mesh.
#[derive(Debug)]
pub struct Mesh {
    pub cfg: Arc<Config>,
    device: DeviceKey,
    pub key: PrivateKey,
    pub public: PublicKey,
    pub index: u32,
    pub backend: Backend,
    net: Net,
    socket: UdpSocket,
    pub peers: HashMap<PublicKey, Peer>,
    pub prefix: Ipv6Net,
    pub mesh_addr: Ipv6Addr,
    pub mtu: u32,
    pub metrics: Metrics,
    dirty: bool,
    next_resync: Instant,
    timing: Timing,
    nonce: u64,
    cache_written: Option<cache::Cache>,
    pub last_error: Option<String>,
    pub started: Instant,
}

impl Mesh {
    /// Builds the mesh for `cfg`: key, device, addresses, rules, prober, peers.
    pub async fn start(cfg: Arc<Config>, metrics: Metrics) -> Result<Mesh, Error> {
        let m = &cfg.meshd;
        let device = device_key(&cfg);
        let key = identity::load_or_create(&m.private_key_file)?;
        let public = key.public();
        let prefix = device.prefix;
        let mesh_addr = identity::mesh_address(prefix, &public);
        let net = Net::new()?;
        let existing = net.link_index(&m.interface).await?;
        let (backend, index) = match m.backend {
            BackendChoice::Kernel => open_kernel(&net, &m.interface, existing).await?,
            BackendChoice::Userspace => open_userspace(&net, &m.interface, existing).await?,
            BackendChoice::Auto if wg::kernel::available() || existing.is_some() => {
                match open_kernel(&net, &m.interface, existing).await {
                    Ok(opened) => opened,
                    Err(error) if existing.is_none() => {
                        tracing::warn!(%error, "kernel WireGuard unusable; using the userspace backend");
                        open_userspace(&net, &m.interface, None).await?
                    }
                    Err(error) => return Err(error),
                }
            }
            BackendChoice::Auto => open_userspace(&net, &m.interface, existing).await?,
        };
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
        let socket = bind_prober(probe::probe_port(m.listen_port))?;
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
            socket,
            peers: HashMap::new(),
            prefix,
            mesh_addr,
            mtu,
            metrics,
            dirty: true,
            next_resync: Instant::now(),
            timing: Timing::default(),
            nonce: fastrand::u64(..),
            cache_written: None,
            last_error: None,
            started: Instant::now(),
            cfg,
        };
        mesh.set_peers(specs, Instant::now());
        Ok(mesh)
    }

    /// Whether `cfg` can be applied to this mesh in place (same device settings).
    pub fn compatible(&self, cfg: &Config) -> bool {
        device_key(cfg) == self.device
    }

    /// Applies a new config with the same device settings: peers, addresses, MTU.
    pub async fn update_config(&mut self, cfg: Arc<Config>) -> Result<(), Error> {
        let specs = peer_specs(&cfg).await;
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
        self.net
            .sync_addresses(self.index, &own_addresses(&self.cfg, self.mesh_addr))
            .await?;
        self.set_peers(specs, Instant::now());
        self.dirty = true;
        Ok(())
    }

    fn set_peers(&mut self, specs: Vec<PeerSpec>, now: Instant) {
        let mut next = HashMap::new();
        for spec in specs {
            if spec.key == self.public {
                continue;
            }
            let mesh_addr = identity::mesh_address(self.prefix, &spec.key);
            let mut allowed: BTreeSet<IpNet> = spec.allowed_ips.iter().copied().collect();
            allowed.insert(IpNet::from(ipnet::Ipv6Net::from(mesh_addr)));
            let peer = match self.peers.remove(&spec.key) {
                Some(mut p) => {
                    p.machine.set_candidates(&spec.candidates, now);
                    p.name = spec.name;
                    p.allowed_ips = allowed;
                    p.location = spec.location;
                    p.source = spec.source;
                    p
                }
                None => Peer {
                    probe_key: probe::key(&self.key.shared(&spec.key)),
                    machine: PeerMachine::new(&spec.candidates, self.timing, now),
                    name: spec.name,
                    key: spec.key,
                    mesh_addr,
                    allowed_ips: allowed,
                    location: spec.location,
                    source: spec.source,
                    stats: PeerStats::default(),
                    last_rx_change: now,
                    last_seen_unix: 0,
                    reported_failovers: 0,
                },
            };
            next.insert(peer.key, peer);
        }
        for (_, gone) in self.peers.drain() {
            tracing::info!(peer = %gone.name, "peer removed");
            let labels = metrics::peer(&gone.name);
            self.metrics.peer_state.remove(&labels);
            self.metrics.peer_rtt_seconds.remove(&labels);
        }
        self.peers = next;
        self.metrics.peers.set(self.peers.len() as i64);
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
    }

    /// Runs the peer machines and applies what they decide. Returns whether a peer changed its state or
    /// endpoint (worth reporting at once).
    pub async fn poll(&mut self, now: Instant) -> bool {
        let mut changed = false;
        let mut probes = Vec::new();
        let mut counter = self.nonce;
        for peer in self.peers.values_mut() {
            let idle = now.saturating_duration_since(peer.last_rx_change) > IDLE_AFTER;
            peer.machine.set_idle(idle);
            let actions = peer.machine.poll(now, &mut || {
                counter = counter.wrapping_add(0x9e37_79b9_7f4a_7c15);
                counter ^ fastrand::u64(..)
            });
            for action in actions {
                match action {
                    Action::Probe { endpoint, nonce } => probes.push((peer.key, endpoint, nonce)),
                    Action::SetEndpoint(ep) => {
                        changed = true;
                        tracing::info!(peer = %peer.name, endpoint = %ep, failovers = peer.machine.failovers, "active endpoint");
                        self.dirty = true;
                    }
                    Action::State(state) => {
                        changed = true;
                        tracing::info!(peer = %peer.name, state = state.as_str(), "peer state");
                        if self.cfg.meshd.allow_down_peer_bypass {
                            self.dirty = true;
                        }
                    }
                }
            }
        }
        self.nonce = counter;
        for (key, endpoint, nonce) in probes {
            self.send_probe(key, endpoint, nonce).await;
        }
        if self.dirty || now >= self.next_resync {
            match self.reconcile().await {
                Ok(()) => {
                    self.dirty = false;
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
        changed
    }

    async fn send_probe(&mut self, key: PublicKey, endpoint: SocketAddr, nonce: u64) {
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let ping = Probe {
            kind: Kind::Ping,
            sender: self.public,
            nonce,
            timestamp_us: self.started.elapsed().as_micros() as u64,
        };
        let bytes = probe::encode(&ping, &peer.probe_key);
        let to = v6_mapped(probe::probe_addr(endpoint));
        self.metrics.probes_sent.inc();
        if let Err(error) = self.socket.send_to(&bytes, to).await {
            tracing::debug!(%to, %error, "probe not sent");
        }
    }

    /// Waits for a probe datagram and handles it.
    pub async fn recv(&mut self) -> Result<(), Error> {
        let mut buf = [0u8; 128];
        let (n, from) = self
            .socket
            .recv_from(&mut buf)
            .await
            .map_err(|e| Error::Io(format!("probe socket: {e}")))?;
        self.handle_datagram(&buf[..n], from).await;
        Ok(())
    }

    async fn handle_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let Some(probe) = probe::decode(bytes) else {
            self.metrics.probes_rejected.inc();
            return;
        };
        let Some(peer) = self.peers.get_mut(&probe.sender) else {
            self.metrics.probes_rejected.inc();
            return;
        };
        if !probe::verify(bytes, &peer.probe_key) {
            self.metrics.probes_rejected.inc();
            return;
        }
        match probe.kind {
            Kind::Ping => {
                let pong = Probe {
                    kind: Kind::Pong,
                    sender: self.public,
                    ..probe
                };
                let reply = probe::encode(&pong, &peer.probe_key);
                if let Err(error) = self.socket.send_to(&reply, from).await {
                    tracing::debug!(%from, %error, "pong not sent");
                }
            }
            Kind::Pong => {
                if peer.machine.on_pong(probe.nonce, Instant::now()) {
                    peer.last_seen_unix = unix_now();
                    self.metrics.probes_answered.inc();
                }
            }
        }
    }

    fn desired(&self) -> Desired {
        let psk = if self.cfg.meshd.kubespan_compat {
            self.cfg.cluster.secret.as_ref().map(|s| s.0)
        } else {
            None
        };
        Desired {
            private_key: self.key.clone(),
            listen_port: self.cfg.meshd.listen_port,
            fwmark: net::FWMARK,
            peers: self
                .peers
                .values()
                .map(|p| {
                    (
                        p.key,
                        PeerConfig {
                            endpoint: p.machine.active_endpoint(),
                            allowed_ips: p.allowed_ips.clone(),
                            keepalive: Some(KEEPALIVE),
                            preshared_key: psk,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The routes meshd wants in its table.
    pub fn desired_routes(&self) -> BTreeSet<IpNet> {
        routes_for(
            self.prefix,
            self.peers
                .values()
                .map(|p| (p.machine.state, &p.allowed_ips)),
            self.cfg.meshd.allow_down_peer_bypass,
        )
    }

    /// Brings device and routes in line with the peers, incrementally.
    pub async fn reconcile(&mut self) -> Result<(), Error> {
        self.metrics.reconciles.inc();
        let started = Instant::now();
        let desired = self.desired();
        let actual = self.backend.get().await?;
        let update = wg::diff(&desired, &actual);
        if !update.is_empty() {
            tracing::debug!(ops = update.peers.len(), "applying WireGuard changes");
            self.backend.apply(&update).await?;
            self.metrics
                .wireguard_peer_ops
                .inc_by(update.peers.len() as u64);
        }
        self.absorb_stats(&actual);
        let changes = self
            .net
            .sync_routes(self.index, &self.desired_routes())
            .await?;
        self.metrics.route_changes.inc_by(changes as u64);
        self.metrics
            .reconcile_seconds
            .set(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Reads counters from the device (for status and metrics).
    pub async fn refresh_stats(&mut self) -> Result<(), Error> {
        let actual = self.backend.get().await?;
        self.absorb_stats(&actual);
        Ok(())
    }

    fn absorb_stats(&mut self, actual: &Actual) {
        let now = Instant::now();
        for (key, (_, stats)) in &actual.peers {
            if let Some(peer) = self.peers.get_mut(key) {
                if stats.rx_bytes != peer.stats.rx_bytes {
                    peer.last_rx_change = now;
                }
                peer.stats = *stats;
            }
        }
    }

    /// Publishes per-peer metrics.
    pub fn update_metrics(&mut self) {
        let mut up = 0;
        for p in self.peers.values_mut() {
            let l = metrics::peer(&p.name);
            let state = p.machine.state;
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
            for path in &p.machine.paths {
                let labels = vec![
                    ("peer".to_owned(), p.name.clone()),
                    ("endpoint".to_owned(), path.endpoint.to_string()),
                ];
                let active = p.machine.active_endpoint() == Some(path.endpoint);
                self.metrics
                    .peer_active_endpoint
                    .get_or_create(&labels)
                    .set(i64::from(active));
            }
        }
        self.metrics.peers_up.set(up);
    }

    /// Writes the peer cache when it changed.
    pub fn store_cache(&mut self) {
        let mut peers: Vec<cache::CachedPeer> = self
            .peers
            .values()
            .map(|p| {
                let mut endpoints: Vec<String> = Vec::new();
                if let Some(a) = p.machine.active_endpoint() {
                    endpoints.push(a.to_string());
                }
                for path in &p.machine.paths {
                    let s = path.endpoint.to_string();
                    if !endpoints.contains(&s) {
                        endpoints.push(s);
                    }
                }
                cache::CachedPeer {
                    name: p.name.clone(),
                    public_key: p.key.to_string(),
                    endpoints,
                    allowed_ips: p
                        .allowed_ips
                        .iter()
                        .filter(|n| !matches!(n, IpNet::V6(v) if self.prefix.contains(v)))
                        .map(ToString::to_string)
                        .collect(),
                    location: p.location.clone(),
                    source: p.source.clone(),
                    last_seen: 0,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.public_key.cmp(&b.public_key));
        let c = cache::Cache { version: 1, peers };
        if self.cache_written.as_ref() == Some(&c) {
            return;
        }
        let path = cache::path(&self.cfg.data_dir);
        match cache::store(&path, &c) {
            Ok(()) => self.cache_written = Some(c),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot write the peer cache")
            }
        }
    }

    /// This node's underlay addresses.
    pub async fn underlay_addresses(&self) -> Result<Vec<IpAddr>, Error> {
        self.net.underlay_addresses(self.index).await
    }

    /// Removes what meshd created: its rules, and its link (the kernel link is deleted; the userspace
    /// TUN device goes when the device stops).
    pub async fn shutdown(self) {
        if let Err(error) = self.net.remove_rules().await {
            tracing::warn!(%error, "cannot remove meshd's rules");
        }
        match self.backend {
            Backend::Kernel(_) => {
                if let Err(error) = self.net.delete_link(self.index).await {
                    tracing::warn!(%error, "cannot delete the WireGuard link");
                }
            }
            Backend::Userspace(u) => drop(u),
        }
        tracing::info!("mesh removed");
    }
}

/// The routes for the mesh: its prefix, and every peer's allowed IPs outside it, except (with `bypass`,
/// KubeSpan's `allowDownPeerBypass`) those of down peers, whose traffic then takes the underlay. Pure.
pub fn routes_for<'a>(
    prefix: Ipv6Net,
    peers: impl Iterator<Item = (PeerState, &'a BTreeSet<IpNet>)>,
    bypass: bool,
) -> BTreeSet<IpNet> {
    let mut routes = BTreeSet::new();
    routes.insert(IpNet::V6(prefix));
    for (state, allowed) in peers {
        if bypass && state == PeerState::Down {
            continue;
        }
        for net in allowed {
            if !matches!(net, IpNet::V6(n) if prefix.contains(n)) {
                routes.insert(*net);
            }
        }
    }
    routes
}

/// Creates (or adopts) the kernel WireGuard link `name`.
async fn open_kernel(
    net: &Net,
    name: &str,
    existing: Option<u32>,
) -> Result<(Backend, u32), Error> {
    let index = match existing {
        Some(i) => {
            tracing::info!(interface = %name, "adopting the existing WireGuard link");
            i
        }
        None => {
            net.add_wireguard(name).await?;
            net.link_index(name)
                .await?
                .ok_or_else(|| Error::Netlink("the new WireGuard link vanished".into()))?
        }
    };
    Ok((Backend::Kernel(Kernel::connect(name)?), index))
}

/// Starts the embedded userspace device on a new TUN device `name`.
async fn open_userspace(
    net: &Net,
    name: &str,
    existing: Option<u32>,
) -> Result<(Backend, u32), Error> {
    if existing.is_some() {
        return Err(Error::Backend(format!(
            "interface {name} already exists; the userspace backend creates its own TUN device \
             (remove the link, or choose another `meshd.interface`)"
        )));
    }
    let u = Userspace::create(name, 2)?;
    let index = net
        .link_index(name)
        .await?
        .ok_or_else(|| Error::Netlink("the TUN device vanished".into()))?;
    Ok((Backend::Userspace(Box::new(u)), index))
}

fn v6_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

/// The prober's socket: dual-stack UDP on `[::]:port` with meshd's fwmark.
fn bind_prober(port: u16) -> Result<UdpSocket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let fail = |e: std::io::Error| Error::Io(format!("probe socket on port {port}: {e}"));
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    s.set_only_v6(false).map_err(fail)?;
    s.set_mark(net::FWMARK).map_err(fail)?;
    s.set_nonblocking(true).map_err(fail)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())
        .map_err(fail)?;
    UdpSocket::from_std(s.into()).map_err(fail)
}

/// This node's addresses on the mesh interface: the mesh /128 and the configured ones.
fn own_addresses(cfg: &Config, mesh_addr: Ipv6Addr) -> BTreeSet<IpNet> {
    let mut set: BTreeSet<IpNet> = cfg.meshd.addresses.iter().copied().collect();
    set.insert(IpNet::V6(Ipv6Net::from(mesh_addr)));
    set
}

/// The peers from the config and the cache, with candidates filtered by the endpoint filter.
pub async fn peer_specs(cfg: &Config) -> Vec<PeerSpec> {
    let m = &cfg.meshd;
    let mut specs = Vec::new();
    for p in &m.peers {
        let mut addrs = Vec::new();
        for hp in &p.endpoints {
            match hp.socket_addr() {
                Some(a) => addrs.push(a),
                None => {
                    let lookup = tokio::net::lookup_host((hp.host.as_str(), hp.port));
                    match tokio::time::timeout(Duration::from_secs(2), lookup).await {
                        Ok(Ok(found)) => addrs.extend(found),
                        _ => {
                            tracing::warn!(peer = %p.name, endpoint = %hp, "cannot resolve endpoint")
                        }
                    }
                }
            }
        }
        specs.push(PeerSpec {
            name: p.name.clone(),
            key: p.public_key,
            candidates: filter_candidates(&m.endpoint_filter, &addrs),
            allowed_ips: p.allowed_ips.clone(),
            location: p.location.clone(),
            source: "static".into(),
        });
    }
    // Cached peers from other sources.
    let cached = cache::load(&cache::path(&cfg.data_dir));
    for c in cached.peers {
        if c.source == "static" {
            continue;
        }
        let Some(key) = parse_key(&c.public_key) else {
            continue;
        };
        if specs.iter().any(|s| s.key == key) {
            continue;
        }
        let addrs: Vec<SocketAddr> = c.endpoints.iter().filter_map(|e| e.parse().ok()).collect();
        specs.push(PeerSpec {
            name: c.name,
            key,
            candidates: filter_candidates(&m.endpoint_filter, &addrs),
            allowed_ips: c
                .allowed_ips
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            location: c.location,
            source: c.source,
        });
    }
    specs
}

fn parse_key(text: &str) -> Option<PublicKey> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    Some(PublicKey(bytes.try_into().ok()?))
}

/// A peer's candidates after our endpoint filter (Talos semantics, applied to the candidates' IPs), in the
/// peer's order, without duplicates.
pub fn filter_candidates(
    filter: &hybridnet_config::EndpointFilter,
    addrs: &[SocketAddr],
) -> Vec<SocketAddr> {
    let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    let kept = filter.apply(&ips);
    let mut out = Vec::new();
    for a in addrs {
        if kept.contains(&a.ip()) && !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> BTreeSet<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn routes_cover_the_prefix_and_peers_and_bypass_drops_down_peers() {
        let prefix: Ipv6Net = "fd00:1:2:3::/64".parse().unwrap();
        let up = nets(&["10.99.0.2/32", "fd00:1:2:3::2/128", "10.244.2.0/24"]);
        let down = nets(&["10.99.0.3/32", "fd00:1:2:3::3/128"]);
        let peers = || [(PeerState::Up, &up), (PeerState::Down, &down)].into_iter();
        let forced = routes_for(prefix, peers(), false);
        assert_eq!(
            forced,
            nets(&[
                "fd00:1:2:3::/64",
                "10.99.0.2/32",
                "10.244.2.0/24",
                "10.99.0.3/32"
            ]),
            "mesh /128s ride on the /64; a down peer stays routed (secure default)"
        );
        let bypass = routes_for(prefix, peers(), true);
        assert!(!bypass.contains(&"10.99.0.3/32".parse().unwrap()));
        assert!(bypass.contains(&"10.99.0.2/32".parse().unwrap()));
    }

    #[test]
    fn candidates_follow_the_endpoint_filter_in_peer_order() {
        use hybridnet_config::{EndpointFilter, FilterRule};
        let addrs: Vec<SocketAddr> = [
            "192.0.2.12:51821",
            "198.51.100.12:51821",
            "[2001:db8::12]:51821",
            "198.51.100.12:51821",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let rules = |r: &[&str]| {
            EndpointFilter::new(r.iter().map(|x| FilterRule::parse(x).unwrap()).collect()).unwrap()
        };
        // No filter: everything, deduplicated, in order.
        assert_eq!(
            filter_candidates(&EndpointFilter::default(), &addrs),
            addrs[..3].to_vec()
        );
        // Talos semantics: ordered, `!` removes what an earlier rule added.
        let f = rules(&["0.0.0.0/0", "!192.0.2.0/24"]);
        assert_eq!(filter_candidates(&f, &addrs), vec![addrs[1]]);
        let f = rules(&["::/0", "192.0.2.0/24"]);
        assert_eq!(filter_candidates(&f, &addrs), vec![addrs[0], addrs[2]]);
        // A negation before the positive removes nothing.
        let f = rules(&["!192.0.2.0/24", "0.0.0.0/0"]);
        assert_eq!(filter_candidates(&f, &addrs), addrs[..2].to_vec());
    }
}

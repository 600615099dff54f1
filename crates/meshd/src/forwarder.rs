//! The relay's forwarder: runs the allocation table ([`crate::relay::Allocations`]) on real sockets. A
//! public node with `meshd.relay: auto` grants allocations from the probe responder's thread
//! ([`Forwarder::request`]: one UDP port per side, opened there, with meshd's fwmark so relayed datagrams
//! take the underlay) and forwards on a thread of its own: a small single-threaded tokio runtime with one
//! task per relay port. Each datagram goes through [`crate::relay::Allocations::forward`] (only the
//! parties' addresses, WireGuard-shaped, within budget) and out of the other side's port, never through
//! WireGuard: the relay sees ciphertext and the parties' addresses only. Once a second the table expires
//! allocations and their sockets are closed; stopping the forwarder closes every socket.
//!
//! The table is behind a mutex shared with the responder's thread, held only for a table operation (never
//! across a send or a wait): a busy forwarder never delays a pong.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hybridnet_config::PublicKey;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::net;
use crate::relay::{Allocations, Dropped, Grant, Pair, Refused};

/// How often allocations are expired.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Why the forwarder itself did not send a datagram the allocations let through: no socket for the other
/// side's port (its allocation just ended), or the send failed.
const NO_SOCKET: &str = "no-socket";
const SEND_FAILED: &str = "send";
const FORWARDER_DROPS: [&str; 2] = [NO_SOCKET, SEND_FAILED];
/// The largest datagram forwarded (WireGuard's are at most the underlay MTU).
const MAX_DATAGRAM: usize = 65_535;

/// Counters for `meshd status` (the same as the metrics, kept here to be read back).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped: BTreeMap<&'static str, u64>,
    pub requests: BTreeMap<&'static str, u64>,
}

/// One allocation as `meshd status` shows it.
#[derive(Clone, Debug)]
pub struct Row {
    pub pair: Pair,
    pub ports: [u16; 2],
    pub addrs: [Option<SocketAddr>; 2],
}

#[derive(Debug, Default)]
struct State {
    table: Allocations,
    stats: Stats,
}

/// What the responder's thread and the forwarder's thread share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The forwarder's output sockets by relay port (a datagram leaves by the other side's port).
    sockets: Mutex<HashMap<u16, Arc<tokio::net::UdpSocket>>>,
    metrics: Metrics,
    mark: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sockets(&self) -> MutexGuard<'_, HashMap<u16, Arc<tokio::net::UdpSocket>>> {
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dropped(&self, reason: &'static str) {
        *self.state().stats.dropped.entry(reason).or_default() += 1;
        self.metrics.relay_dropped(reason);
    }
}

/// The running forwarder; [`Forwarder::stop`] (or dropping it) closes every relay port.
#[derive(Debug)]
pub struct Forwarder {
    shared: Arc<Shared>,
    /// New relay ports for the forwarder's thread (closed: stop).
    new: Mutex<Option<mpsc::UnboundedSender<(u16, std::net::UdpSocket)>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Forwarder {
    /// Starts the forwarder's thread (it holds no port until an allocation is granted).
    /// `mark`: give relay ports meshd's fwmark (needs `CAP_NET_ADMIN`; off only in unit tests).
    pub fn start(metrics: Metrics, mark: bool) -> Result<Forwarder, crate::Error> {
        // Every drop reason's series from the start, at 0: a series born at its first increment starts
        // at 1, which `increase()` never counts.
        for reason in Dropped::ALL
            .map(Dropped::as_str)
            .iter()
            .chain(&FORWARDER_DROPS)
        {
            metrics.relay_dropped_zero(reason);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            sockets: Mutex::new(HashMap::new()),
            metrics,
            mark,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| crate::Error::Io(format!("relay forwarder runtime: {e}")))?;
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("meshd-relay".to_owned())
                .spawn(move || runtime.block_on(run(shared, rx)))
                .map_err(|e| crate::Error::Io(format!("relay forwarder thread: {e}")))?
        };
        Ok(Forwarder {
            shared,
            new: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// An authenticated allocation request (see [`Allocations::request`]): `requester` asked from `from`
    /// to be relayed to `other`. Opens the pair's two relay ports when it is new.
    pub fn request(
        &self,
        now: Instant,
        requester: PublicKey,
        from: IpAddr,
        other: PublicKey,
        known: impl Fn(&PublicKey) -> bool,
    ) -> Result<Grant, Refused> {
        let mut opened = Vec::new();
        let result = {
            let mut state = self.shared.state();
            let result = state.table.request(now, requester, from, other, known, || {
                match bind(self.shared.mark) {
                    Ok((port, socket)) => {
                        opened.push((port, socket));
                        Some(port)
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot open a relay port");
                        None
                    }
                }
            });
            let label = result.map_or_else(Refused::as_str, |_| "granted");
            *state.stats.requests.entry(label).or_default() += 1;
            self.shared.metrics.relay_request(label);
            self.shared
                .metrics
                .relay_allocations
                .set(i64::try_from(state.table.len()).unwrap_or(i64::MAX));
            result
        };
        let new = self
            .new
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if result.is_ok()
            && let Some(tx) = new.as_ref()
        {
            for socket in opened {
                let _ = tx.send(socket);
            }
        }
        result
    }

    /// Counts a request refused because this node relays nothing.
    pub fn refused_not_relay(&self) {
        *self
            .shared
            .state()
            .stats
            .requests
            .entry("not-relay")
            .or_default() += 1;
        self.shared.metrics.relay_request("not-relay");
    }

    /// The counters and the allocations, for `meshd status`.
    pub fn snapshot(&self) -> (Stats, Vec<Row>) {
        let state = self.shared.state();
        let rows = state
            .table
            .list()
            .into_iter()
            .map(|(pair, ports, addrs)| Row { pair, ports, addrs })
            .collect();
        (state.stats.clone(), rows)
    }

    /// How many relay ports are open now.
    pub fn open_ports(&self) -> usize {
        self.shared.sockets().len()
    }

    /// Closes every relay port and stops the thread.
    pub fn stop(&self) {
        let stopping = self
            .new
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(stopping);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A relay port: dual-stack UDP on an ephemeral port, with meshd's fwmark (the underlay, never the mesh).
fn bind(mark: bool) -> std::io::Result<(u16, std::net::UdpSocket)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    if mark {
        s.set_mark(net::FWMARK)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
    s.set_recv_buffer_size(1 << 20).ok();
    let socket = std::net::UdpSocket::from(s);
    let port = socket.local_addr()?.port();
    Ok((port, socket))
}

/// The forwarder's thread: a task per relay port, the table expired every second; returns (closing
/// everything) when the [`Forwarder`] stops.
async fn run(shared: Arc<Shared>, mut new: mpsc::UnboundedReceiver<(u16, std::net::UdpSocket)>) {
    let mut tasks: HashMap<u16, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(EXPIRE_EVERY);
    loop {
        tokio::select! {
            got = new.recv() => {
                let Some((port, socket)) = got else { break };
                // The allocation may have expired before its socket arrived.
                if !shared.state().table.ports().any(|p| p == port) {
                    continue;
                }
                match tokio::net::UdpSocket::from_std(socket) {
                    Ok(socket) => {
                        let socket = Arc::new(socket);
                        shared.sockets().insert(port, socket.clone());
                        tasks.insert(port, tokio::spawn(forward(shared.clone(), port, socket)));
                    }
                    Err(error) => tracing::warn!(%error, port, "relay port not registered"),
                }
            }
            _ = tick.tick() => {
                let freed = {
                    let mut state = shared.state();
                    let freed = state.table.expire(Instant::now());
                    shared
                        .metrics
                        .relay_allocations
                        .set(i64::try_from(state.table.len()).unwrap_or(i64::MAX));
                    freed
                };
                for port in freed {
                    if let Some(task) = tasks.remove(&port) {
                        task.abort();
                    }
                    shared.sockets().remove(&port);
                    tracing::debug!(port, "relay port closed (allocation expired)");
                }
            }
        }
    }
    for (_, task) in tasks.drain() {
        task.abort();
    }
    shared.sockets().clear();
    let mut state = shared.state();
    state.table = Allocations::default();
    shared.metrics.relay_allocations.set(0);
}

/// One relay port: every datagram through the table, out of the other side's port.
async fn forward(shared: Arc<Shared>, port: u16, socket: Arc<tokio::net::UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(error) => {
                tracing::debug!(%error, port, "relay port");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let src = net::unmapped(src);
        let verdict = shared.state().table.forward(
            Instant::now(),
            port,
            src,
            &buf[..n.min(crate::relay::HEAD)],
            n,
        );
        let out = match verdict {
            Ok(f) => f,
            Err(why) => {
                shared.dropped(why.as_str());
                continue;
            }
        };
        let Some(out_socket) = shared.sockets().get(&out.from_port).cloned() else {
            shared.dropped(NO_SOCKET);
            continue;
        };
        match out_socket.try_send_to(&buf[..n], v6_mapped(out.to)) {
            Ok(_) => {
                let mut state = shared.state();
                state.stats.forwarded_packets += 1;
                state.stats.forwarded_bytes += n as u64;
                drop(state);
                shared.metrics.relay_forwarded_packets.inc();
                shared.metrics.relay_forwarded_bytes.inc_by(n as u64);
            }
            Err(error) => {
                tracing::debug!(%error, to = %out.to, "relayed datagram not sent");
                shared.dropped(SEND_FAILED);
            }
        }
    }
}

fn v6_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

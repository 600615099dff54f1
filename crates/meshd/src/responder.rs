//! The probe socket's receiver on its own OS thread: it answers pings at once and hands pongs (with the
//! time they arrived) to the mesh. Nothing the mesh does (hostname lookups, nftables, UAPI reads, the
//! discovery stop, fsync'd writes) delays an answer: peers declare a path dead after about a second
//! without pongs, so a responder behind slow work would fail every peer over. A thread, not a task: a
//! blocking call on the runtime (boringtun's UAPI read) cannot hold it either.
//!
//! Every datagram is hostile until its MAC passes: one that does not decode or names an unknown sender
//! costs no HMAC; the rest cost one only within [`budget::Budget`]; a ping is answered only once and only
//! inside the timestamp window ([`probe::Replay`]). Drops are counted by reason
//! (`meshd_probes_dropped_total{reason}`).

mod budget;

pub use budget::{SHARED_RATE, SOURCE_RATE};

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hybridnet_config::PublicKey;
use tokio::sync::mpsc;

use crate::Error;
use crate::metrics::Metrics;
use crate::net;
use crate::probe::{self, Kind, Probe};

/// How often the thread looks at its stop flag while no datagram arrives.
const STOP_POLL: Duration = Duration::from_millis(200);

/// A pong that passed its MAC check, when it arrived, and where from.
#[derive(Clone, Debug)]
pub struct Pong {
    pub probe: Probe,
    pub at: Instant,
    pub from: SocketAddr,
    /// A version-2 pong (a peer not upgraded yet: no target to check).
    pub v2: bool,
}

/// The state the thread shares with the mesh.
#[derive(Debug, Default)]
pub struct Shared {
    /// Each peer's probe key (replaced whenever the peers change).
    pub keys: RwLock<HashMap<PublicKey, [u8; 32]>>,
    /// This node is a gateway candidate without an uplink (`NO_UPLINK` in its pongs).
    pub no_uplink: AtomicBool,
    stop: AtomicBool,
}

/// The running responder; dropping it stops the thread (within [`STOP_POLL`]).
#[derive(Debug)]
pub struct Responder {
    pub shared: Arc<Shared>,
    /// For sending probes (same port, so pongs come back to it).
    pub socket: Arc<UdpSocket>,
    pub pongs: mpsc::UnboundedReceiver<Pong>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    /// Stops the thread and waits until it has released the socket (a new mesh binds the same port).
    pub async fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Binds the probe socket (dual-stack UDP on `[::]:port` with meshd's fwmark) and starts the thread.
pub fn start(port: u16, me: PublicKey, metrics: Metrics) -> Result<Responder, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let fail = |e: std::io::Error| Error::Io(format!("probe socket on port {port}: {e}"));
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    s.set_only_v6(false).map_err(fail)?;
    s.set_mark(net::FWMARK).map_err(fail)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())
        .map_err(fail)?;
    s.set_read_timeout(Some(STOP_POLL)).map_err(fail)?;
    // Room for a burst while the thread is not scheduled (a flood of junk must not push real pings out
    // of the queue); capped by net.core.rmem_max, as dnslocal's sockets are.
    s.set_recv_buffer_size(4 << 20).ok();
    // Sends never wait long for buffer space (a full buffer drops the datagram, as a lost one would).
    s.set_write_timeout(Some(Duration::from_millis(20)))
        .map_err(fail)?;
    let socket = Arc::new(UdpSocket::from(s));
    let shared = Arc::new(Shared::default());
    let (tx, pongs) = mpsc::unbounded_channel();
    let thread = {
        let socket = socket.clone();
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("meshd-probe".to_owned())
            .spawn(move || serve(&socket, &shared, me, &metrics, &tx))
            .map_err(|e| Error::Io(format!("probe thread: {e}")))?
    };
    Ok(Responder {
        shared,
        socket,
        pongs,
        thread: Some(thread),
    })
}

fn serve(
    socket: &UdpSocket,
    shared: &Shared,
    me: PublicKey,
    metrics: &Metrics,
    tx: &mpsc::UnboundedSender<Pong>,
) {
    let mut buf = [0u8; 128];
    let mut budget = budget::Budget::new(Instant::now());
    let mut replay = probe::Replay::default();
    // Peers that sent a version-3 ping: their version-2 pings (recorded earlier) are not answered.
    let mut upgraded: std::collections::HashSet<PublicKey> = std::collections::HashSet::new();
    let mut next_prune = Instant::now() + probe::WINDOW;
    while !shared.stop.load(Ordering::Relaxed) {
        let (n, raw_from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "probe socket");
                std::thread::sleep(STOP_POLL);
                continue;
            }
        };
        let at = Instant::now();
        let from = unmapped(raw_from);
        let Some((probe, key)) = check(&buf[..n], from, at, shared, &mut budget, metrics) else {
            metrics.probes_rejected.inc();
            continue;
        };
        let v2 = probe::is_v2(&buf[..n]);
        match probe.kind {
            Kind::Ping => {
                let now_us = probe::now_us();
                let admitted = if v2 {
                    // The rolling upgrade: a version-2 ping has no timestamp to check; it is answered
                    // once (by nonce, for the window) and only until its sender speaks version 3.
                    if upgraded.contains(&probe.sender) {
                        Err("legacy")
                    } else {
                        replay
                            .admit(probe.sender, probe.nonce, now_us, now_us)
                            .map_err(probe::Refusal::as_str)
                    }
                } else if probe.target.is_none() {
                    Err("untargeted")
                } else {
                    upgraded.insert(probe.sender);
                    replay
                        .admit(probe.sender, probe.nonce, probe.timestamp_us, now_us)
                        .map_err(probe::Refusal::as_str)
                };
                if let Err(reason) = admitted {
                    metrics.dropped(reason);
                    metrics.probes_rejected.inc();
                    continue;
                }
                // The pong tells the pinger where its ping came from (its reflexive address) and echoes
                // the target, which binds it to the endpoint the pinger probed.
                let no_uplink = shared.no_uplink.load(Ordering::Relaxed);
                let pong = Probe {
                    kind: Kind::Pong,
                    sender: me,
                    timestamp_us: if v2 { probe.timestamp_us } else { now_us },
                    observed: Some(from),
                    flags: if no_uplink { probe::NO_UPLINK } else { 0 },
                    ..probe
                };
                let reply = if v2 {
                    probe::encode_v2(&pong, &key)
                } else {
                    probe::encode(&pong, &key)
                };
                match socket.send_to(&reply, raw_from) {
                    Ok(_) => {
                        metrics.pings_answered.inc();
                    }
                    Err(error) => tracing::debug!(%from, %error, "pong not sent"),
                }
            }
            Kind::Pong => {
                if tx
                    .send(Pong {
                        probe,
                        at,
                        from,
                        v2,
                    })
                    .is_err()
                {
                    // The mesh is gone.
                    return;
                }
            }
        }
        if at >= next_prune {
            next_prune = at + probe::WINDOW;
            replay.retain(|k| known(shared, k));
            upgraded.retain(|k| known(shared, k));
        }
    }
}

fn known(shared: &Shared, key: &PublicKey) -> bool {
    match shared.keys.read() {
        Ok(keys) => keys.contains_key(key),
        Err(poisoned) => poisoned.into_inner().contains_key(key),
    }
}

/// Decodes and authenticates a datagram: the cheap checks first, the HMAC only within the budget.
fn check(
    bytes: &[u8],
    from: SocketAddr,
    at: Instant,
    shared: &Shared,
    budget: &mut budget::Budget,
    metrics: &Metrics,
) -> Option<(Probe, [u8; 32])> {
    let Some(probe) = probe::decode(bytes) else {
        metrics.dropped("malformed");
        return None;
    };
    let key = match shared.keys.read() {
        Ok(keys) => keys.get(&probe.sender).copied(),
        Err(poisoned) => poisoned.into_inner().get(&probe.sender).copied(),
    };
    let Some(key) = key else {
        metrics.dropped("unknown");
        return None;
    };
    if !budget.allow(from, at) {
        metrics.dropped("throttled");
        return None;
    }
    if !probe::verify(bytes, &key) {
        metrics.dropped("mac");
        return None;
    }
    budget.verified(from, at);
    Some((probe, key))
}

fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

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
//!
//! An allocation request (see [`crate::forwarder`]) is admitted exactly like a ping (MAC, budget,
//! timestamp window, replay list, a target) and answered at once with a grant or a refusal: only a node
//! that may relay ([`Shared::relay`]: public, `meshd.relay: auto`) grants. Grants that answer this node's
//! own requests go to the mesh with the pongs.

mod budget;

pub use budget::{SHARED_RATE, SOURCE_RATE};

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hybridnet_config::PublicKey;
use tokio::sync::mpsc;

use crate::Error;
use crate::forwarder::Forwarder;
use crate::metrics::Metrics;
use crate::net;
use crate::probe::{self, Kind, Probe};
use crate::relay::Refused;

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
    /// A relay's answer to an allocation request (`probe.kind` is [`Kind::Grant`]).
    pub alloc: Option<probe::Alloc>,
}

/// The state the thread shares with the mesh.
#[derive(Debug, Default)]
pub struct Shared {
    /// Each peer's probe key (replaced whenever the peers change).
    pub keys: RwLock<HashMap<PublicKey, [u8; 32]>>,
    /// This node is a gateway candidate without an uplink (`NO_UPLINK` in its pongs).
    pub no_uplink: AtomicBool,
    /// This node grants relay allocations (it has a public address of its own and `meshd.relay: auto`).
    pub relay: AtomicBool,
    stop: AtomicBool,
}

/// The running responder; dropping it stops the thread (within [`STOP_POLL`]).
#[derive(Debug)]
pub struct Responder {
    pub shared: Arc<Shared>,
    /// For sending probes (same port, so pongs come back to it).
    pub socket: Arc<UdpSocket>,
    pub pongs: mpsc::UnboundedReceiver<Pong>,
    /// The relay's forwarder (holds no port until it grants an allocation).
    pub forwarder: Arc<Forwarder>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    /// Stops the thread and waits until it has released the socket (a new mesh binds the same port).
    pub async fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take();
        let forwarder = self.forwarder.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(thread) = thread {
                let _ = thread.join();
            }
            forwarder.stop();
        })
        .await;
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
    let forwarder = Arc::new(Forwarder::start(metrics.clone(), true)?);
    let thread = {
        let socket = socket.clone();
        let shared = shared.clone();
        let forwarder = forwarder.clone();
        std::thread::Builder::new()
            .name("meshd-probe".to_owned())
            .spawn(move || serve(&socket, &shared, me, &metrics, &tx, &forwarder))
            .map_err(|e| Error::Io(format!("probe thread: {e}")))?
    };
    Ok(Responder {
        shared,
        socket,
        pongs,
        forwarder,
        thread: Some(thread),
    })
}

fn serve(
    socket: &UdpSocket,
    shared: &Shared,
    me: PublicKey,
    metrics: &Metrics,
    tx: &mpsc::UnboundedSender<Pong>,
    forwarder: &Forwarder,
) {
    // Larger than any datagram of the protocol (a longer one is refused by its size, not cut to fit).
    let mut buf = [0u8; 512];
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
        let from = crate::net::unmapped(raw_from);
        let Some((probe, alloc, key)) = check(&buf[..n], from, at, shared, &mut budget, metrics)
        else {
            metrics.probes_rejected.inc();
            continue;
        };
        let v2 = probe::is_v2(&buf[..n]);
        match (probe.kind, alloc) {
            (Kind::Allocate, Some(alloc)) => {
                // Admitted like a ping: inside the window, once, with a target.
                let now_us = probe::now_us();
                if let Err(reason) = admit_v3(&mut replay, &probe, now_us) {
                    metrics.dropped(reason);
                    metrics.probes_rejected.inc();
                    continue;
                }
                let answer = grant(shared, forwarder, &probe, &alloc, from, at);
                let reply = Probe {
                    kind: Kind::Grant,
                    sender: me,
                    timestamp_us: now_us,
                    observed: Some(from),
                    flags: 0,
                    ..probe
                };
                if let Err(error) =
                    socket.send_to(&probe::encode_alloc(&reply, &answer, &key), raw_from)
                {
                    tracing::debug!(%from, %error, "allocation answer not sent");
                }
            }
            (Kind::Grant, Some(alloc)) => {
                let pong = Pong {
                    probe,
                    at,
                    from,
                    v2: false,
                    alloc: Some(alloc),
                };
                if tx.send(pong).is_err() {
                    return;
                }
            }
            (Kind::Allocate | Kind::Grant, None) | (Kind::Ping | Kind::Pong, Some(_)) => {
                metrics.dropped("malformed");
            }
            (Kind::Ping, None) => {
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
                } else {
                    if probe.target.is_some() {
                        upgraded.insert(probe.sender);
                    }
                    admit_v3(&mut replay, &probe, now_us)
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
            (Kind::Pong, None) => {
                if tx
                    .send(Pong {
                        probe,
                        at,
                        from,
                        v2,
                        alloc: None,
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

/// The answer to an admitted allocation request: a grant from the forwarder, or why not.
fn grant(
    shared: &Shared,
    forwarder: &Forwarder,
    probe: &Probe,
    alloc: &probe::Alloc,
    from: SocketAddr,
    at: Instant,
) -> probe::Alloc {
    let refused = |result| probe::Alloc {
        other: alloc.other,
        result,
        port: 0,
        lifetime_s: 0,
    };
    if !shared.relay.load(Ordering::Relaxed) {
        forwarder.refused_not_relay();
        return refused(probe::AllocResult::NotRelay);
    }
    match forwarder.request(at, probe.sender, from.ip(), alloc.other, |k| {
        known(shared, k)
    }) {
        Ok(g) => probe::Alloc {
            other: alloc.other,
            result: probe::AllocResult::Granted,
            port: g.port,
            lifetime_s: u32::try_from(g.expires.saturating_duration_since(at).as_secs())
                .unwrap_or(u32::MAX)
                .max(1),
        },
        Err(why) => {
            tracing::debug!(requester = %probe.sender, other = %alloc.other, reason = why.as_str(), "relay allocation refused");
            refused(match why {
                Refused::SelfPair => probe::AllocResult::SelfPair,
                Refused::UnknownParty => probe::AllocResult::UnknownParty,
                Refused::TooMany => probe::AllocResult::TooMany,
                Refused::NoPorts => probe::AllocResult::NoPorts,
            })
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
) -> Option<(Probe, Option<probe::Alloc>, [u8; 32])> {
    let decoded = probe::decode(bytes)
        .map(|p| (p, None))
        .or_else(|| probe::decode_alloc(bytes).map(|(p, a)| (p, Some(a))));
    let Some((probe, alloc)) = decoded else {
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
    Some((probe, alloc, key))
}

/// A version-3 ping or allocation request is answered only with a target (the endpoint it probed), inside
/// the timestamp window and once (`replay` records it).
fn admit_v3(replay: &mut probe::Replay, probe: &Probe, now_us: u64) -> Result<(), &'static str> {
    if probe.target.is_none() {
        return Err("untargeted");
    }
    replay
        .admit(probe.sender, probe.nonce, probe.timestamp_us, now_us)
        .map_err(probe::Refusal::as_str)
}

//! Upstream servers: UDP from random source ports with 0x20 ([`udp`]), persistent pipelined TCP (for the
//! cluster DNS, and for answers truncated over UDP), health (consecutive failures, smoothed RTT) and failover
//! across a pool. An answer is taken only when its ID and question match; anything else is counted
//! (`dnslocal_upstream_mismatched_total`) and the exchange keeps waiting.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::wire;

pub mod udp;

pub use udp::UdpPorts;

/// Consecutive failures after which an upstream counts as down (it is still tried, last).
pub const FALL: u32 = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const TCP_IDLE: Duration = Duration::from_secs(30);
const MAX_PENDING: usize = 4096;

/// Why an exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Refused,
    Io,
    /// Too many exchanges in flight to this upstream (our own limit).
    Busy,
    /// Out of local descriptors, buffers or memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`).
    Local,
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Refused => "refused",
            Failure::Io => "io",
            Failure::Busy => "busy",
            Failure::Local => "local",
        }
    }

    /// Whether the failure says something about the upstream. `Busy` and `Local` are our own limits and
    /// resources: counting them would let a flood of local queries mark healthy upstreams down.
    pub fn blames_upstream(self) -> bool {
        !matches!(self, Failure::Busy | Failure::Local)
    }
}

type AnswerTx = oneshot::Sender<Result<Vec<u8>, Failure>>;
type AnswerRx = oneshot::Receiver<Result<Vec<u8>, Failure>>;
/// Exchanges waiting on one TCP connection: by ID, the question they asked and where the answer goes.
type Pending = Arc<Mutex<HashMap<u16, (Box<[u8]>, AnswerTx)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The end of the question of a message we built (one question at offset 12).
fn question_end(msg: &[u8]) -> usize {
    wire::skip_name(msg, wire::HEADER).map_or(msg.len(), |end| (end + 4).min(msg.len()))
}

/// Registers a pending exchange under a fresh random ID; removes it again on drop.
struct Slot {
    pending: Pending,
    id: u16,
}

impl Slot {
    fn new(pending: &Pending, question: &[u8]) -> Result<(Slot, AnswerRx), Failure> {
        let mut map = lock(pending);
        if map.len() >= MAX_PENDING {
            return Err(Failure::Busy);
        }
        let mut id = fastrand::u16(..);
        while map.contains_key(&id) {
            id = fastrand::u16(..);
        }
        let (tx, rx) = oneshot::channel();
        map.insert(id, (question.into(), tx));
        Ok((
            Slot {
                pending: pending.clone(),
                id,
            },
            rx,
        ))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.pending).remove(&self.id);
    }
}

fn fail_all(pending: &Pending, failure: Failure) {
    for (_, (_, tx)) in lock(pending).drain() {
        let _ = tx.send(Err(failure));
    }
}

/// Hands `msg` to the exchange waiting for it (same ID, same question ignoring case); whether one was.
fn deliver(pending: &Pending, msg: Vec<u8>) -> Result<(), Vec<u8>> {
    let Some(id) = wire::id_of(&msg) else {
        return Err(msg);
    };
    let mut map = lock(pending);
    let matches = map.get(&id).is_some_and(|(question, _)| {
        msg.get(2).is_some_and(|b| b & 0x80 != 0)
            && msg.get(4..6) == Some(&[0, 1])
            && msg
                .get(wire::HEADER..wire::HEADER + question.len())
                .is_some_and(|q| q.eq_ignore_ascii_case(question))
    });
    match map.remove(&id) {
        Some((_, tx)) if matches => {
            let _ = tx.send(Ok(msg));
            Ok(())
        }
        Some(entry) => {
            map.insert(id, entry);
            Err(msg)
        }
        None => Err(msg),
    }
}

async fn wait(rx: AnswerRx) -> Result<Vec<u8>, Failure> {
    rx.await.unwrap_or(Err(Failure::Io))
}

fn io_failure(e: &io::Error) -> Failure {
    if hybridnet_runtime::limits::is_local_pressure(e) {
        Failure::Local
    } else if e.kind() == io::ErrorKind::ConnectionRefused {
        Failure::Refused
    } else {
        Failure::Io
    }
}

/// A persistent, pipelined TCP connection to one upstream, (re)opened on demand.
#[derive(Debug)]
struct TcpClient {
    addr: SocketAddr,
    tx: Mutex<Option<mpsc::Sender<TcpRequest>>>,
    metrics: Metrics,
}

impl TcpClient {
    fn new(addr: SocketAddr, metrics: Metrics) -> TcpClient {
        TcpClient {
            addr,
            tx: Mutex::new(None),
            metrics,
        }
    }

    async fn exchange(&self, msg: &[u8]) -> Result<Vec<u8>, Failure> {
        let (reply, rx) = oneshot::channel();
        let tx = {
            let mut guard = lock(&self.tx);
            match guard.as_ref().filter(|tx| !tx.is_closed()) {
                Some(tx) => tx.clone(),
                None => {
                    let (tx, rx) = mpsc::channel(1024);
                    tokio::spawn(tcp_connection(self.addr, rx, self.metrics.clone()));
                    *guard = Some(tx.clone());
                    tx
                }
            }
        };
        tx.try_send((msg.to_vec(), reply))
            .map_err(|_| Failure::Busy)?;
        wait(rx).await
    }
}

type TcpRequest = (Vec<u8>, AnswerTx);

async fn tcp_connection(addr: SocketAddr, mut rx: mpsc::Receiver<TcpRequest>, metrics: Metrics) {
    let label = addr.to_string();
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refuse_all(&mut rx, io_failure(&e)),
        Err(_) => return refuse_all(&mut rx, Failure::Timeout),
    };
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let pending: Pending = Arc::default();
    let mut reader = tokio::spawn({
        let pending = pending.clone();
        async move {
            loop {
                let mut len = [0u8; 2];
                if rd.read_exact(&mut len).await.is_err() {
                    break;
                }
                let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if rd.read_exact(&mut msg).await.is_err() {
                    break;
                }
                if deliver(&pending, msg).is_err() {
                    metrics.upstream_mismatched(&label);
                }
            }
            fail_all(&pending, Failure::Io);
        }
    });
    loop {
        let request = tokio::select! {
            _ = &mut reader => break,
            r = tokio::time::timeout(TCP_IDLE, rx.recv()) => match r {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break,
            },
        };
        let (mut msg, mut reply) = request;
        if msg.len() < wire::HEADER || msg.len() > usize::from(u16::MAX) {
            let _ = reply.send(Err(Failure::Io));
            continue;
        }
        let Ok((slot, answer)) = Slot::new(&pending, &msg[wire::HEADER..question_end(&msg)]) else {
            let _ = reply.send(Err(Failure::Busy));
            continue;
        };
        msg[..2].copy_from_slice(&slot.id.to_be_bytes());
        let mut frame = (msg.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&msg);
        // The slot lives until the answer comes or the caller gives up.
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                r = wait(answer) => { let _ = reply.send(r); }
                () = reply.closed() => {}
            }
        });
        if wr.write_all(&frame).await.is_err() {
            break;
        }
    }
    reader.abort();
    fail_all(&pending, Failure::Io);
    refuse_all(&mut rx, Failure::Io);
}

fn refuse_all(rx: &mut mpsc::Receiver<TcpRequest>, failure: Failure) {
    rx.close();
    while let Ok((_, reply)) = rx.try_recv() {
        let _ = reply.send(Err(failure));
    }
}

/// One upstream server and its health.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    udp: Option<UdpPorts>,
    tcp: TcpClient,
    fails: AtomicU32,
    srtt_us: AtomicU32,
    label: String,
}

impl Upstream {
    /// `tcp_only`: always TCP (the cluster DNS); otherwise UDP with TCP retry on truncation.
    pub fn new(addr: SocketAddr, tcp_only: bool, metrics: &Metrics) -> Upstream {
        Upstream {
            addr,
            udp: (!tcp_only).then(|| UdpPorts::new(addr)),
            tcp: TcpClient::new(addr, metrics.clone()),
            fails: AtomicU32::new(0),
            srtt_us: AtomicU32::new(0),
            label: addr.to_string(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.fails.load(Ordering::Relaxed) < FALL
    }

    pub fn srtt(&self) -> Duration {
        Duration::from_micros(u64::from(self.srtt_us.load(Ordering::Relaxed)))
    }

    pub fn protocol(&self) -> &'static str {
        if self.udp.is_some() { "udp" } else { "tcp" }
    }

    /// Whether 0x20 case randomisation is used (UDP upstreams that echo case).
    pub fn uses_0x20(&self) -> bool {
        self.udp.as_ref().is_some_and(UdpPorts::uses_0x20)
    }

    async fn exchange(&self, msg: &[u8], metrics: &Metrics) -> Result<Vec<u8>, Failure> {
        let answer = match &self.udp {
            Some(udp) => udp.exchange(msg, question_end(msg), metrics).await?,
            None => return self.tcp.exchange(msg).await,
        };
        if answer.get(2).is_some_and(|b| b & 0x02 != 0) {
            return self.tcp.exchange(msg).await;
        }
        Ok(answer)
    }

    fn record(&self, result: Result<Duration, Failure>, metrics: &Metrics) {
        match result {
            Ok(rtt) => {
                let was_down = !self.is_up();
                self.fails.store(0, Ordering::Relaxed);
                let us = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX);
                let old = self.srtt_us.load(Ordering::Relaxed);
                let new = if old == 0 { us } else { (old / 8) * 7 + us / 8 };
                self.srtt_us.store(new, Ordering::Relaxed);
                metrics.upstream_latency(&self.label, rtt);
                if was_down {
                    tracing::info!(upstream = %self.addr, "upstream is answering again");
                    metrics.upstream_up(&self.label, true);
                }
            }
            Err(failure) if !failure.blames_upstream() => {
                metrics.upstream_error(&self.label, failure.label());
            }
            Err(failure) => {
                metrics.upstream_error(&self.label, failure.label());
                if self.fails.fetch_add(1, Ordering::Relaxed) + 1 == FALL {
                    tracing::warn!(upstream = %self.addr, ?failure, "upstream is down");
                    metrics.upstream_up(&self.label, false);
                }
            }
        }
    }
}

/// The upstreams of one zone.
#[derive(Debug)]
pub struct Pool {
    pub upstreams: Vec<Arc<Upstream>>,
}

impl Pool {
    /// Whether every upstream is down (then a stale answer is served without waiting).
    pub fn all_down(&self) -> bool {
        self.upstreams.iter().all(|u| !u.is_up())
    }

    /// Try order: up before down, then by smoothed RTT (ties keep configuration order).
    fn order(&self) -> Vec<Arc<Upstream>> {
        let mut order = self.upstreams.clone();
        order.sort_by_key(|u| (!u.is_up(), u.srtt() / 2));
        order
    }

    /// Sends `msg` (any ID) to the upstreams in turn until one answers usefully or `deadline` passes.
    /// An answer with a failure rcode is returned only if nothing better came.
    pub async fn exchange(
        &self,
        msg: &[u8],
        deadline: Instant,
        metrics: &Metrics,
    ) -> Result<Vec<u8>, Failure> {
        let order = self.order();
        let mut last = Err(Failure::Timeout);
        for (i, upstream) in order.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let left = u32::try_from(order.len() - i).unwrap_or(1);
            let budget = (deadline - now) / left;
            let started = Instant::now();
            let result = match tokio::time::timeout(budget, upstream.exchange(msg, metrics)).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Timeout),
            };
            match result {
                Ok(answer) => match wire::rcode_of(&answer) {
                    1 | 2 | 4 | 5 => {
                        // It answered (healthy), but another upstream may do better.
                        upstream.record(Ok(started.elapsed()), metrics);
                        last = Ok(answer);
                    }
                    _ => {
                        upstream.record(Ok(started.elapsed()), metrics);
                        return Ok(answer);
                    }
                },
                Err(failure) => {
                    upstream.record(Err(failure), metrics);
                    if last.is_err() {
                        last = Err(failure);
                    }
                }
            }
        }
        last
    }
}

//! The listeners: per listen address, one `SO_REUSEPORT` UDP socket per core, each read by its own thread
//! (the hot path: receive, cache lookup, send, no task switch), and a TCP listener.
//!
//! Draining (restart and reload without lost queries): the kernel spreads datagrams over every socket of
//! a `SO_REUSEPORT` group, so closing a socket loses what sits in its receive queue. A draining socket is
//! first `connect`ed to its own address: Linux then no longer picks it for new datagrams (they go to the
//! new instance's sockets) but keeps what is queued; the thread answers the queue until it stays empty,
//! and only then closes the socket.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hybridnet_runtime::net::reuseport_socket;
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use socket2::{Protocol, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{Action, Engine, Reply};

/// How long a reading thread blocks before it checks for draining.
const POLL: Duration = Duration::from_millis(100);
/// A draining socket closes after its queue stayed empty this long.
const QUIET: Duration = Duration::from_millis(50);
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The idle timeout once the connection table is three quarters full.
const TCP_IDLE_BUSY: Duration = Duration::from_secs(2);
const MAX_TCP_CONNECTIONS: usize = 1024;
/// TCP connections one client address may hold; its least recently active one is closed for a new one.
pub const MAX_TCP_PER_CLIENT: usize = 32;
/// Answers queued per TCP connection (each up to 64 KiB) before its reading pauses.
const TCP_QUEUE: usize = 8;

/// The running listeners of one instance.
#[derive(Debug)]
pub struct Listeners {
    threads: Vec<JoinHandle<()>>,
    draining: Arc<AtomicBool>,
    tcp_stop: CancellationToken,
    tcp_tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One open TCP connection in the [`TcpTable`].
#[derive(Debug)]
struct TcpConn {
    client: IpAddr,
    last_ms: Arc<AtomicU64>,
    stop: CancellationToken,
}

/// The TCP connections of one instance, bounded per client and in all: when a bound is reached, the least
/// recently active connection (of that client, or of all) is closed to make room, so one client holding
/// idle connections cannot lock the others out.
#[derive(Debug, Default)]
pub struct TcpTable {
    conns: Mutex<HashMap<u64, TcpConn>>,
    next: AtomicU64,
    epoch: OnceLock<Instant>,
}

impl TcpTable {
    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    /// Registers a connection from `client`, evicting to stay within the bounds; returns its id, its
    /// activity clock and its stop token.
    fn admit(
        &self,
        client: IpAddr,
        parent: &CancellationToken,
    ) -> (u64, Arc<AtomicU64>, CancellationToken) {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest = |conns: &HashMap<u64, TcpConn>, only: Option<IpAddr>| {
            conns
                .iter()
                .filter(|(_, c)| only.is_none_or(|ip| c.client == ip))
                .min_by_key(|(_, c)| c.last_ms.load(Ordering::Relaxed))
                .map(|(&id, _)| id)
        };
        let mine = conns.values().filter(|c| c.client == client).count();
        if mine >= MAX_TCP_PER_CLIENT
            && let Some(id) = oldest(&conns, Some(client))
            && let Some(c) = conns.remove(&id)
        {
            c.stop.cancel();
        }
        if conns.len() >= MAX_TCP_CONNECTIONS
            && let Some(id) = oldest(&conns, None)
            && let Some(c) = conns.remove(&id)
        {
            c.stop.cancel();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let last_ms = Arc::new(AtomicU64::new(self.now_ms()));
        let stop = parent.child_token();
        conns.insert(
            id,
            TcpConn {
                client,
                last_ms: last_ms.clone(),
                stop: stop.clone(),
            },
        );
        (id, last_ms, stop)
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// The idle timeout now: shorter under pressure.
    fn idle_timeout(&self) -> Duration {
        let n = self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        if n * 4 >= MAX_TCP_CONNECTIONS * 3 {
            TCP_IDLE_BUSY
        } else {
            TCP_IDLE
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Listeners {
    /// Binds UDP (`threads` sockets each) and TCP on every address in `addrs`.
    pub fn bind(
        addrs: &[SocketAddr],
        threads: usize,
        engine: &Arc<Engine>,
    ) -> io::Result<Listeners> {
        let draining = Arc::new(AtomicBool::new(false));
        let tcp_stop = CancellationToken::new();
        let mut sockets = Vec::new();
        let mut tcp = Vec::new();
        for &addr in addrs {
            for _ in 0..threads.max(1) {
                let s = reuseport_socket(addr, Type::DGRAM, Protocol::UDP)?;
                s.set_recv_buffer_size(4 << 20).ok();
                s.set_read_timeout(Some(POLL))?;
                sockets.push((addr, UdpSocket::from(s)));
            }
            let l = reuseport_socket(addr, Type::STREAM, Protocol::TCP)?;
            l.listen(1024)?;
            l.set_nonblocking(true)?;
            tcp.push(TcpListener::from_std(l.into())?);
        }
        let mut listeners = Listeners {
            threads: Vec::new(),
            draining: draining.clone(),
            tcp_stop: tcp_stop.clone(),
            tcp_tasks: Vec::new(),
        };
        for (i, (addr, socket)) in sockets.into_iter().enumerate() {
            let engine = engine.clone();
            let draining = draining.clone();
            let thread = std::thread::Builder::new()
                .name(format!("dnslocal-udp{i}"))
                .spawn(move || udp_loop(&Arc::new(socket), addr, &engine, &draining))?;
            listeners.threads.push(thread);
        }
        let table = Arc::new(TcpTable::default());
        for listener in tcp {
            let task = tokio::spawn(tcp_accept(
                listener,
                engine.clone(),
                table.clone(),
                tcp_stop.clone(),
            ));
            listeners.tcp_tasks.push(task);
        }
        Ok(listeners)
    }

    /// Stops taking new queries, answers what was queued, and returns when every socket is closed.
    pub async fn drain(self) {
        self.draining.store(true, Ordering::SeqCst);
        self.tcp_stop.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        for t in self.tcp_tasks {
            let _ = t.await;
        }
    }
}

/// Datagrams read (and answers sent) per system call.
const BATCH: usize = 32;
const MAX_UDP_QUERY: usize = 4096;

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// One reading thread: `recvmmsg` up to [`BATCH`] queries, answer the hits, `sendmmsg` the answers.
fn udp_loop(
    socket: &Arc<UdpSocket>,
    addr: SocketAddr,
    engine: &Arc<Engine>,
    draining: &AtomicBool,
) {
    let fd = socket.as_raw_fd();
    let mut bufs = vec![[0u8; MAX_UDP_QUERY]; BATCH];
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(1232)).collect();
    let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut received: Vec<(usize, Option<SockaddrStorage>)> = Vec::with_capacity(BATCH);
    let mut replies: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    let mut detached = false;
    loop {
        if !detached && draining.load(Ordering::Relaxed) {
            // Leave the reuseport group for new datagrams; keep the queue.
            let own = socket.local_addr().unwrap_or(addr);
            if let Err(error) = socket.connect(own) {
                tracing::warn!(%error, %addr, "cannot detach the socket for draining; closing it");
                return;
            }
            let _ = socket.set_read_timeout(Some(QUIET));
            detached = true;
        }
        received.clear();
        {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(&mut b[..])])
                .collect();
            match recvmmsg(
                fd,
                &mut recv_headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(msgs) => received.extend(msgs.map(|m| (m.bytes, m.address))),
                Err(Errno::EAGAIN | Errno::EINTR) => {
                    if detached {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    tracing::debug!(%error, %addr, "udp receive failed");
                    if detached {
                        return;
                    }
                    continue;
                }
            }
        }
        replies.clear();
        let mut answered = 0;
        for (i, &(len, peer)) in received.iter().enumerate() {
            let Some(peer_std) = peer.as_ref().and_then(to_std) else {
                continue;
            };
            let query = &bufs[i][..len.min(MAX_UDP_QUERY)];
            let mut action = engine.over_budget(peer_std.ip(), query, &mut outs[answered]);
            if action == Action::Later {
                action = engine.handle(query, false, &mut outs[answered], || {
                    Reply::Udp(socket.clone(), peer_std)
                });
            }
            if action == Action::Send {
                replies.push(peer);
                answered += 1;
            }
        }
        if answered > 0 {
            send_all(fd, socket, &mut send_headers, &outs[..answered], &replies);
        }
    }
}

/// `sendmmsg` the answers; whatever it did not take goes out one by one.
fn send_all(
    fd: std::os::fd::RawFd,
    socket: &UdpSocket,
    headers: &mut MultiHeaders<SockaddrStorage>,
    outs: &[Vec<u8>],
    peers: &[Option<SockaddrStorage>],
) {
    let slices: Vec<[IoSlice<'_>; 1]> = outs.iter().map(|o| [IoSlice::new(o)]).collect();
    let sent = match sendmmsg(fd, headers, slices.iter(), peers, [], MsgFlags::empty()) {
        Ok(results) => results.count(),
        Err(_) => 0,
    };
    for (out, peer) in outs.iter().zip(peers).skip(sent) {
        if let Some(p) = peer.as_ref().and_then(to_std) {
            let _ = socket.send_to(out, p);
        }
    }
}

async fn tcp_accept(
    listener: TcpListener,
    engine: Arc<Engine>,
    table: Arc<TcpTable>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (id, last_ms, conn_stop) = table.admit(peer.ip(), &stop);
                let engine = engine.clone();
                let table = table.clone();
                tokio::spawn(async move {
                    let conn = TcpConnection {
                        engine,
                        table: table.clone(),
                        last_ms,
                        stop: conn_stop,
                    };
                    conn.serve(stream).await;
                    table.remove(id);
                });
            }
            Err(error) => {
                tracing::debug!(%error, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

struct TcpConnection {
    engine: Arc<Engine>,
    table: Arc<TcpTable>,
    last_ms: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl TcpConnection {
    async fn serve(self, stream: TcpStream) {
        let TcpConnection {
            engine,
            table,
            last_ms,
            stop,
        } = self;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        let writer = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let mut frame = Vec::with_capacity(msg.len() + 2);
                frame.extend_from_slice(&(msg.len().min(65535) as u16).to_be_bytes());
                frame.extend_from_slice(&msg);
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let mut out = Vec::new();
        loop {
            let mut len = [0u8; 2];
            let idle = table.idle_timeout();
            let read = tokio::select! {
                () = stop.cancelled() => break,
                r = tokio::time::timeout(idle, rd.read_exact(&mut len)) => r,
            };
            if !matches!(read, Ok(Ok(_))) {
                break;
            }
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            let read = tokio::select! {
                () = stop.cancelled() => break,
                r = tokio::time::timeout(idle, rd.read_exact(&mut msg)) => r,
            };
            if !matches!(read, Ok(Ok(_))) {
                break;
            }
            last_ms.store(table.now_ms(), Ordering::Relaxed);
            if engine.handle(&msg, true, &mut out, || Reply::Tcp(tx.clone())) == Action::Send
                && tx.send(std::mem::take(&mut out)).await.is_err()
            {
                break;
            }
        }
        drop(tx);
        // Answers still in flight hold their own sender; the writer ends when the last one is sent.
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    }
}

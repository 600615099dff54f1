//! Upgrades that cut nothing: a new apiprism instance takes the listening sockets and the established
//! connection pairs of the running one over a Unix socket (`SCM_RIGHTS`) and goes on splicing them.
//!
//! The running instance (the giver) listens on `<stateDir>/apiprism/handoff.sock` (`SOCK_SEQPACKET`, so every
//! message arrives whole with its descriptors). A new instance (the taker) connects there before it binds
//! anything:
//!
//! ```text
//! taker -> giver   TAKE 1
//! giver            stops accepting (new connections wait in the listeners' backlog), pauses every relay
//!                  where its pipe is empty (no byte in flight), waits for them (bounded)
//! giver -> taker   L <listen address>     + the listening socket
//!                  C <upstream address>   + the client socket and the upstream socket   (one per pair)
//!                  END <listeners> <pairs>
//! taker -> giver   DONE
//! ```
//!
//! After `DONE` the giver closes its copies, serves the few pairs it could not pause (half-closed, or a
//! direction blocked on a slow reader) until they end, and stays idle, retired (no status record, no admin
//! endpoint, not ready), until it is stopped: a supervisor that restarts a process that exits (systemd's
//! `Restart=always`, the kubelet) would otherwise start it again, and it would take everything back. Without
//! `DONE` (the taker died, timed out or refused what it got) the giver resumes: accepting again and
//! relaying the paused pairs; nothing was cut.
//!
//! Both sides treat the other as hostile: only a peer with our UID (`SO_PEERCRED`) is served, messages are at
//! most [`MAX_MESSAGE`] bytes with exactly the descriptors their kind carries, received descriptors must be
//! TCP sockets (listening for `L`, connected for `C`), the counts are bounded and checked against `END`, and
//! every step has a timeout.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg, sockopt::PeerCredentials,
};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The handoff socket's file name in `<stateDir>/apiprism/`.
pub const SOCKET: &str = "handoff.sock";
/// The longest message either side accepts.
pub const MAX_MESSAGE: usize = 128;
/// The most listening sockets a taker accepts.
pub const MAX_LISTENERS: usize = 64;
/// How long either side waits for the other's next message.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole exchange, seen from the taker.
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the giver waits for its relays to pause.
pub const PAUSE_BOUND: Duration = Duration::from_secs(2);
/// The most descriptors one `SCM_RIGHTS` message carries (Linux, include/net/scm.h).
const SCM_MAX_FD: usize = 253;
const HELLO: &[u8] = b"TAKE 1";
const DONE: &[u8] = b"DONE";

/// A handoff that failed: the giver resumes, the taker starts afresh.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("handoff peer runs as UID {peer}, not ours ({ours})")]
    Stranger { peer: u32, ours: u32 },
    #[error("handoff protocol: {0}")]
    Protocol(String),
    #[error("handoff: {0}")]
    Io(#[from] io::Error),
}

fn protocol(what: impl Into<String>) -> HandoffError {
    HandoffError::Protocol(what.into())
}

/// An established connection: the client's socket, the upstream's, and the upstream's address.
#[derive(Debug)]
pub struct Pair {
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub addr: SocketAddr,
}

/// The relays' pause switch and the pairs paused for a handoff.
#[derive(Debug, Default)]
pub struct Pausing {
    token: Mutex<CancellationToken>,
    parked: Mutex<Vec<Pair>>,
    parked_notify: tokio::sync::Notify,
}

impl Pausing {
    /// The token a new relay watches.
    pub fn token(&self) -> CancellationToken {
        self.token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Pauses every relay (they park their pairs here).
    pub fn pause(&self) {
        self.token().cancel();
    }

    /// A paused relay's pair.
    pub fn park(&self, pair: Pair) {
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pair);
        self.parked_notify.notify_one();
    }

    /// Returns when a pair has been parked (since the last call).
    pub async fn parked_changed(&self) {
        self.parked_notify.notified().await;
    }

    pub fn parked(&self) -> usize {
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Ends the pause: new relays run again; returns the parked pairs.
    pub fn resume(&self) -> Vec<Pair> {
        *self.token.lock().unwrap_or_else(PoisonError::into_inner) = CancellationToken::new();
        self.take_parked()
    }

    pub fn take_parked(&self) -> Vec<Pair> {
        std::mem::take(&mut *self.parked.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What a taker received.
#[derive(Debug, Default)]
pub struct Taken {
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
    /// (upstream address, client socket, upstream socket).
    pub pairs: Vec<(SocketAddr, OwnedFd, OwnedFd)>,
}

/// Where the handoff socket of a state directory is.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("apiprism").join(SOCKET)
}

fn our_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The peer must run as we do.
fn check_peer(fd: &impl AsFd) -> Result<(), HandoffError> {
    let cred = nix::sys::socket::getsockopt(fd, PeerCredentials).map_err(io::Error::from)?;
    let (peer, ours) = (cred.uid(), our_uid());
    if peer != ours {
        return Err(HandoffError::Stranger { peer, ours });
    }
    Ok(())
}

fn set_timeouts(sock: &Socket, timeout: Duration) -> io::Result<()> {
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))
}

fn send(fd: RawFd, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one message: its payload and the descriptors that came with it (owned from here on).
fn recv(fd: RawFd) -> Result<(Vec<u8>, Vec<OwnedFd>), HandoffError> {
    let mut buf = [0u8; MAX_MESSAGE + 1];
    // Room for as many descriptors as one message can carry (the kernel's `SCM_MAX_FD`), so that a message
    // with too many is seen whole, its descriptors owned (and closed), and refused. With less room the
    // kernel truncates (MSG_CTRUNC) after installing what fits, nix then refuses to show the control
    // messages, and those descriptors leaked into our table: a peer repeating that on the giver's socket
    // filled it.
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let (bytes, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                fds.extend(raw.into_iter().map(own));
            }
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
        if truncated {
            return Err(protocol("message longer than the limit"));
        }
        (msg.bytes, fds)
    };
    if bytes == 0 && fds.is_empty() {
        return Err(protocol("peer closed the handoff socket"));
    }
    Ok((buf[..bytes].to_vec(), fds))
}

/// Takes ownership of a descriptor the kernel just installed for us with `SCM_RIGHTS`.
#[allow(unsafe_code)]
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was installed in our descriptor table by this recvmsg(2) (SCM_RIGHTS); nothing else in
    // the process knows it, so this is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Registers our listening socket with the runtime.
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor: it stays open, and the same, for as long as it is registered.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// A received descriptor must be a TCP socket, listening or not as its message says.
fn check_tcp(fd: &OwnedFd, listening: bool) -> Result<(), HandoffError> {
    let sock = SockRef::from(fd);
    let ok = sock.r#type()? == Type::STREAM
        && matches!(sock.domain()?, d if d == Domain::IPV4 || d == Domain::IPV6)
        && sock.is_listener()? == listening;
    if ok {
        Ok(())
    } else {
        Err(protocol(if listening {
            "an L message without a listening TCP socket"
        } else {
            "a C message without connected TCP sockets"
        }))
    }
}

/// One parsed message from the giver.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Listener(SocketAddr),
    Pair(SocketAddr),
    End { listeners: usize, pairs: usize },
}

/// Parses a giver's message with the number of descriptors it came with.
pub fn parse(payload: &[u8], fds: usize) -> Result<Message, HandoffError> {
    let text = std::str::from_utf8(payload).map_err(|_| protocol("not UTF-8"))?;
    let mut words = text.split(' ');
    let kind = words.next().unwrap_or_default();
    let mut next = |what: &str| {
        words
            .next()
            .ok_or_else(|| protocol(format!("{kind}: missing {what}")))
    };
    let addr = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|_| protocol(format!("{kind}: bad address {s:?}")))
    };
    let count = |s: &str| {
        s.parse::<usize>()
            .map_err(|_| protocol(format!("{kind}: bad count {s:?}")))
    };
    let (message, want_fds) = match kind {
        "L" => (Message::Listener(addr(next("address")?)?), 1),
        "C" => (Message::Pair(addr(next("address")?)?), 2),
        "END" => {
            let listeners = count(next("listeners")?)?;
            let pairs = count(next("pairs")?)?;
            (Message::End { listeners, pairs }, 0)
        }
        _ => return Err(protocol(format!("unknown message {kind:?}"))),
    };
    if words.next().is_some() {
        return Err(protocol(format!("{kind}: trailing words")));
    }
    if fds != want_fds {
        return Err(protocol(format!(
            "{kind}: {fds} descriptors, expected {want_fds}"
        )));
    }
    Ok(message)
}

/// The taker's side, at start and before anything is bound: takes over from the instance that listens on
/// `path`, if any. `Ok(None)`: nobody there (a first start, or the last instance is gone). At most
/// `max_pairs` pairs are accepted. Blocking: run it on a blocking thread.
pub fn take(path: &Path, max_pairs: usize) -> Result<Option<Taken>, HandoffError> {
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    let addr = SockAddr::unix(path)?;
    // Before connecting: a connect(2) to a socket whose backlog is full (a giver that is stopped, or busy
    // with a flood of connections that never say hello) waits for as long as the send timeout, forever
    // by default, and nothing would ever be bound.
    set_timeouts(&sock, STEP_TIMEOUT)?;
    match sock.connect(&addr) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(source) => {
            return Err(HandoffError::Socket {
                path: path.to_owned(),
                source,
            });
        }
    }
    check_peer(&sock)?;
    let fd = sock.as_raw_fd();
    send(fd, HELLO, &[])?;
    let deadline = Instant::now() + TOTAL_TIMEOUT;
    let mut taken = Taken::default();
    loop {
        if Instant::now() > deadline {
            return Err(protocol("the giver took too long"));
        }
        let (payload, mut fds) = recv(fd)?;
        match parse(&payload, fds.len())? {
            Message::Listener(addr) => {
                if taken.listeners.len() >= MAX_LISTENERS {
                    return Err(protocol("too many listeners"));
                }
                let listener = fds.remove(0);
                check_tcp(&listener, true)?;
                taken.listeners.push((addr, listener));
            }
            Message::Pair(addr) => {
                if taken.pairs.len() >= max_pairs {
                    return Err(protocol("more pairs than our connection limit"));
                }
                let upstream = fds.remove(1);
                let client = fds.remove(0);
                check_tcp(&client, false)?;
                check_tcp(&upstream, false)?;
                taken.pairs.push((addr, client, upstream));
            }
            Message::End { listeners, pairs } => {
                if (listeners, pairs) != (taken.listeners.len(), taken.pairs.len()) {
                    return Err(protocol(format!(
                        "END says {listeners} listeners and {pairs} pairs, received {} and {}",
                        taken.listeners.len(),
                        taken.pairs.len()
                    )));
                }
                send(fd, DONE, &[])?;
                return Ok(Some(taken));
            }
        }
    }
}

/// The giver's listening handoff socket. Removes its file when dropped, unless another instance has
/// replaced it.
#[derive(Debug)]
pub struct GiverSocket {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    inode: (u64, u64),
}

impl GiverSocket {
    /// Binds `path` (replacing a stale socket file: a previous instance that is gone, or the one we just
    /// took over from).
    pub fn bind(path: &Path) -> Result<GiverSocket, HandoffError> {
        let err = |source| HandoffError::Socket {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let _lock = lock_dir(path).map_err(err)?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(err)?;
        sock.bind(&SockAddr::unix(path).map_err(err)?)
            .map_err(err)?;
        sock.listen(4).map_err(err)?;
        sock.set_nonblocking(true).map_err(err)?;
        let meta = std::fs::symlink_metadata(path).map_err(err)?;
        Ok(GiverSocket {
            fd: register(OwnedFd::from(sock)).map_err(err)?,
            path: path.to_owned(),
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// The next connection to the handoff socket (check it with [`hello`] before anything else). Cancel-safe.
    pub async fn accept(&self) -> Socket {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                continue;
            };
            match guard.try_io(|fd| Socket::from(fd.get_ref().try_clone()?).accept()) {
                Ok(Ok((conn, _))) => return conn,
                Ok(Err(error)) => tracing::debug!(%error, "handoff accept"),
                Err(_would_block) => {}
            }
        }
    }
}

/// The giver's first step with a new connection: the peer runs as we do and says hello. Blocking.
pub fn hello(conn: &Socket) -> Result<(), HandoffError> {
    check_peer(conn)?;
    conn.set_nonblocking(false)?;
    set_timeouts(conn, STEP_TIMEOUT)?;
    let (payload, fds) = recv(conn.as_raw_fd())?;
    if payload != HELLO || !fds.is_empty() {
        return Err(protocol("no hello"));
    }
    Ok(())
}

impl Drop for GiverSocket {
    /// Removes the socket file if it is still ours. The check and the removal are two steps, so they hold
    /// the directory's lock, as [`GiverSocket::bind`] does while it replaces the file: a giver that retires
    /// (drops this right after `DONE`) while its taker binds would otherwise see its own file, then remove
    /// the taker's, and the next upgrade would find no socket and start afresh (seen in CI). Without the
    /// lock the file stays: a stale socket file is refused at connect and replaced at the next bind.
    fn drop(&mut self) {
        let Ok(_lock) = lock_dir(&self.path) else {
            return;
        };
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An exclusive `flock` on the directory holding the socket file, held while the file is replaced or
/// removed (the directory itself: no lock file to create, plant or clean up). Released when dropped.
fn lock_dir(path: &Path) -> io::Result<Flock<std::fs::File>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = std::fs::File::open(dir)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io::Error::from(errno))
}

/// The giver's side of the exchange after the hello: sends the listeners and the pairs (as raw descriptors:
/// the caller keeps them open until this returns), then waits for `DONE`, all within [`TOTAL_TIMEOUT`]
/// (the relays are paused meanwhile: a taker that reads one message every few seconds must not hold them
/// for longer). Blocking.
pub fn give(
    conn: &Socket,
    listeners: &[(SocketAddr, RawFd)],
    pairs: &[(SocketAddr, RawFd, RawFd)],
) -> Result<(), HandoffError> {
    give_within(conn, listeners, pairs, Instant::now() + TOTAL_TIMEOUT)
}

fn give_within(
    conn: &Socket,
    listeners: &[(SocketAddr, RawFd)],
    pairs: &[(SocketAddr, RawFd, RawFd)],
    deadline: Instant,
) -> Result<(), HandoffError> {
    let fd = conn.as_raw_fd();
    for (addr, listener) in listeners {
        step(conn, deadline)?;
        send(fd, format!("L {addr}").as_bytes(), &[*listener])?;
    }
    for (addr, client, upstream) in pairs {
        step(conn, deadline)?;
        send(fd, format!("C {addr}").as_bytes(), &[*client, *upstream])?;
    }
    step(conn, deadline)?;
    send(
        fd,
        format!("END {} {}", listeners.len(), pairs.len()).as_bytes(),
        &[],
    )?;
    step(conn, deadline)?;
    let (payload, fds) = recv(fd)?;
    if payload != DONE || !fds.is_empty() {
        return Err(protocol("the taker did not confirm"));
    }
    Ok(())
}

/// The next step's timeout: [`STEP_TIMEOUT`], or what is left until `deadline` if less.
fn step(conn: &Socket, deadline: Instant) -> Result<(), HandoffError> {
    let left = deadline.saturating_duration_since(Instant::now());
    // Under a millisecond is over: a timeout that rounds down to zero would mean none at all.
    if left < Duration::from_millis(1) {
        return Err(protocol("the taker took too long"));
    }
    Ok(set_timeouts(conn, left.min(STEP_TIMEOUT))?)
}

#[cfg(test)]
mod tests;

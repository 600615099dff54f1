//! Socket options of the data path (both sides of every connection) and the listeners.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Keepalive: first probe after this much idle time (KubePrism: 30 s) ...
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// ... then every this often ...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ... and the peer is dead after this many unanswered probes.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// Unacknowledged data older than this kills the connection (KubePrism: 30 s).
pub const USER_TIMEOUT: Duration = Duration::from_secs(20);
/// Listen backlog: kubelet and friends reconnect in bursts after a failover.
pub const BACKLOG: i32 = 4096;

/// Keepalive and TCP_USER_TIMEOUT (TCP_NODELAY is set by [`connect`] and [`tune_accepted`]).
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES),
    )?;
    sock.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// An accepted client socket: TCP_NODELAY (no Nagle delay on small HTTP/2 frames), then [`tune`].
pub fn tune_accepted(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    tune(stream)
}

/// Closes with RST instead of FIN when dropped: for connections cut on purpose (their upstream went down),
/// so the client learns at once, and no TIME_WAIT stays behind.
pub fn reset_on_close(stream: &TcpStream) {
    // Best effort: the socket is dropped right after either way.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// A listener with SO_REUSEADDR and SO_REUSEPORT (a new instance can bind before the old one stops), IPv6 only
/// on IPv6 addresses.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    hybridnet_runtime::net::reuseport_listener(addr, BACKLOG)
}

/// Connects to `addr` with TCP_NODELAY set before the SYN.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

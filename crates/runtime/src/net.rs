//! Sockets and lookups the daemons share: one place for `SO_REUSEPORT` binding (how a new instance binds
//! beside the old one) and for host-name lookups with a bound on their time.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hybridnet_config::HostPort;
use socket2::{Domain, Protocol, Socket, Type};

/// A socket bound to `addr` with `SO_REUSEADDR` and `SO_REUSEPORT` (a new instance binds before the old one
/// stops), `IPV6_V6ONLY` on IPv6 addresses (`[::]` never takes IPv4 too), close-on-exec. Blocking; the caller
/// listens (TCP) and sets it non-blocking where a runtime drives it.
pub fn reuseport_socket(addr: SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// A tokio TCP listener on a [`reuseport_socket`], with `backlog`. Needs a tokio runtime.
pub fn reuseport_listener(addr: SocketAddr, backlog: i32) -> io::Result<tokio::net::TcpListener> {
    let socket = reuseport_socket(addr, Type::STREAM, Protocol::TCP)?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// The addresses of `hp`: itself when its host is an IP address, else the system resolver's answer within
/// `timeout` (a lookup that takes longer is an `io::ErrorKind::TimedOut` error: a dead resolver never holds
/// a daemon's loop).
pub async fn resolve(hp: &HostPort, timeout: Duration) -> io::Result<Vec<SocketAddr>> {
    if let Some(addr) = hp.socket_addr() {
        return Ok(vec![addr]);
    }
    match tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((hp.host.as_str(), hp.port)),
    )
    .await
    {
        Ok(found) => Ok(found?.collect()),
        Err(_elapsed) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("lookup of {} timed out after {timeout:?}", hp.host),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_address_needs_no_lookup_and_two_instances_share_a_port() {
        let hp = HostPort {
            host: "127.0.0.1".into(),
            port: 1,
        };
        let found = resolve(&hp, Duration::from_millis(1))
            .await
            .expect("no lookup");
        assert_eq!(
            found,
            vec!["127.0.0.1:1".parse::<SocketAddr>().expect("addr")]
        );

        let first = reuseport_listener("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
        let addr = first.local_addr().expect("local addr");
        let second =
            reuseport_listener(addr, 16).expect("a second instance binds beside the first");
        assert_eq!(second.local_addr().expect("local addr"), addr);
        let v6 = reuseport_socket("[::1]:0".parse().expect("addr"), Type::DGRAM, Protocol::UDP);
        if let Ok(v6) = v6 {
            assert!(v6.only_v6().expect("IPV6_V6ONLY"));
        }
    }
}

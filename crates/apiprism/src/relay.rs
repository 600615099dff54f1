//! The data path: bytes between a client and its upstream with splice(2), socket → pipe → socket, so they never
//! enter user space. Each direction gets its own pipe, created on its first readable event: an idle connection
//! holds no buffer at all, and an active one at most one pipe (64 KiB of kernel pages) per direction.
//!
//! Half-close is kept: when one side sends FIN, the other side's write half is shut down once the pipe is
//! drained, and the opposite direction goes on until it ends too. An error on either side ends both.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;

use nix::fcntl::{SpliceFFlags, splice};
use nix::unistd::pipe2;
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per splice call (the default pipe capacity).
const CHUNK: usize = 64 * 1024;

/// Counts bytes of one direction.
pub type ByteCounter = Counter;

/// Relays both directions until both have ended (Ok) or one failed (Err). Returns (client→upstream,
/// upstream→client) bytes.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    to_upstream: &ByteCounter,
    to_client: &ByteCounter,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(
        pump(client, upstream, to_upstream),
        pump(upstream, client, to_client)
    )
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// One direction: `src` → pipe → `dst`, then shut down `dst`'s write half at EOF.
async fn pump(src: &TcpStream, dst: &TcpStream, counter: &ByteCounter) -> io::Result<u64> {
    let mut pipe: Option<Pipe> = None;
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let p = match &pipe {
            Some(p) => p,
            None => pipe.insert(Pipe::new()?),
        };
        let n = match src.try_io(Interest::READABLE, || {
            splice(src, None, &p.write, None, CHUNK, FLAGS).map_err(io::Error::from)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(&p.read, None, dst, None, left, FLAGS).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        counter.inc_by(n as u64);
    }
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener) -> anyhow::Result<(TcpStream, TcpStream)> {
        let addr = listener.local_addr()?;
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        Ok((a?, b?.0))
    }

    /// client ⇄ [c_side | relay | u_side] ⇄ server, on loopback.
    #[tokio::test]
    async fn relays_both_ways_with_half_close() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (mut client, c_side) = pair(&listener).await?;
        let (u_side, mut server) = pair(&listener).await?;
        let (up, down) = (Counter::default(), Counter::default());
        let relay_task = async { relay(&c_side, &u_side, &up, &down).await };
        let peers = async {
            let big = vec![7u8; 1 << 20];
            client.write_all(&big).await?;
            client.shutdown().await?; // half-close: the server still answers
            let mut got = Vec::new();
            server.read_to_end(&mut got).await?;
            anyhow::ensure!(got == big, "request bytes differ");
            server.write_all(b"answer after the client's FIN").await?;
            server.shutdown().await?;
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await?;
            anyhow::ensure!(answer == b"answer after the client's FIN", "answer differs");
            Ok(())
        };
        let (relayed, peers) = tokio::join!(relay_task, peers);
        peers?;
        assert_eq!(relayed?, (1 << 20, 29));
        assert_eq!((up.get(), down.get()), (1 << 20, 29));
        Ok(())
    }
}

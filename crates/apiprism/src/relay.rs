//! The data path: bytes between a client and its upstream with splice(2), socket → pipe → socket, so they never
//! enter user space. A direction borrows a pipe from a shared pool only while it moves a chunk (the pipe is
//! empty again when the chunk has been written out), so an idle connection holds no buffer and no pipe at
//! all, an active one at most one pipe (64 KiB of kernel pages) per direction, and new connections don't pay
//! for creating pipes.
//!
//! Half-close is kept: when one side sends FIN, the other side's write half is shut down once the pipe is
//! drained, and the opposite direction goes on until it ends too. An error on either side ends both.
//!
//! A relay can be paused (for a handoff to a new instance, `handoff`): each direction stops where its pipe
//! is empty, so every byte read from one socket has been written to the other and the pair can be carried
//! on by another process with nothing lost. A direction that has already ended is not paused: the other one
//! goes on here until it ends too.

use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hybridnet_runtime::limits::is_local_pressure;

use nix::fcntl::{SpliceFFlags, splice};
use nix::unistd::pipe2;
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Bytes moved per splice call, and the capacity of the pool's pipes (the kernel's default is 64 KiB; pages
/// are only held while bytes are in the pipe).
const CHUNK: usize = 256 * 1024;

/// Counts bytes of one direction.
pub type ByteCounter = Counter;

/// A direction that cannot get a pipe for lack of descriptors or memory waits this long and tries again ...
const PIPE_RETRY_WAIT: Duration = Duration::from_millis(10);
/// ... for at most this long: an established connection outlives a flood of local connections.
const PIPE_RETRY_FOR: Duration = Duration::from_secs(30);

/// How a relay ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions ended.
    Ended,
    /// Paused with both directions open and no byte in flight: the pair can be handed over.
    Paused,
}

/// The sockets of one direction and what counts it.
struct Direction<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    counter: &'a ByteCounter,
}

/// Relays both directions until both have ended (`Ended`), one failed (Err), or `pause` is cancelled while
/// both are open (`Paused`). `pressure` counts the times a pipe could not be had for lack of local
/// resources.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    to_upstream: &ByteCounter,
    to_client: &ByteCounter,
    pressure: &Counter,
    pause: &CancellationToken,
) -> io::Result<Outcome> {
    let up = Direction {
        src: client,
        dst: upstream,
        counter: to_upstream,
    };
    let down = Direction {
        src: upstream,
        dst: client,
        counter: to_client,
    };
    let (a, b) = tokio::try_join!(
        pump(&up, pressure, Some(pause)),
        pump(&down, pressure, Some(pause))
    )?;
    match (a, b) {
        (Step::Paused, Step::Paused) => Ok(Outcome::Paused),
        (Step::Eof, Step::Eof) => Ok(Outcome::Ended),
        // One direction ended: the pair is half-closed and stays here until the other ends too.
        (Step::Paused, Step::Eof) => pump(&up, pressure, None).await.map(|_| Outcome::Ended),
        (Step::Eof, Step::Paused) => pump(&down, pressure, None).await.map(|_| Outcome::Ended),
    }
}

/// How one direction stopped.
enum Step {
    /// The source sent FIN (and the destination's write half was shut down).
    Eof,
    /// Paused between chunks.
    Paused,
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Empty pipes ready for use; at most [`POOL_MAX`] are kept.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 64;

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            return Ok(p);
        }
        let (read, write) = pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        // Best effort: a smaller pipe (pipe-max-size, memory accounting) only means more splice calls.
        let size = i32::try_from(CHUNK).unwrap_or(i32::MAX);
        let _ = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size));
        Ok(Pipe { read, write })
    }

    /// [`Pipe::take`], waiting while the process is out of descriptors or memory.
    async fn take_waiting(pressure: &Counter) -> io::Result<Pipe> {
        let deadline = tokio::time::Instant::now() + PIPE_RETRY_FOR;
        loop {
            match Pipe::take() {
                Err(e) if is_local_pressure(&e) && tokio::time::Instant::now() < deadline => {
                    pressure.inc();
                    tokio::time::sleep(PIPE_RETRY_WAIT).await;
                }
                result => return result,
            }
        }
    }

    /// Back to the pool: only an empty pipe (a pipe with bytes left in it is dropped with them).
    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// One direction: `src` → pipe → `dst`, then shut down `dst`'s write half at EOF. Stops between chunks
/// (nothing in the pipe) when `pause` is cancelled.
async fn pump(
    d: &Direction<'_>,
    pressure: &Counter,
    pause: Option<&CancellationToken>,
) -> io::Result<Step> {
    let Direction { src, dst, counter } = *d;
    loop {
        match pause {
            Some(pause) => tokio::select! {
                biased;
                () = pause.cancelled() => return Ok(Step::Paused),
                ready = src.readable() => ready?,
            },
            None => src.readable().await?,
        }
        let pipe = Pipe::take_waiting(pressure).await?;
        let n = match src.try_io(Interest::READABLE, || {
            splice(src, None, &pipe.write, None, CHUNK, FLAGS).map_err(io::Error::from)
        }) {
            Ok(0) => {
                pipe.give_back();
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) => return Err(e),
        };
        drain(&pipe, dst, n).await?;
        pipe.give_back();
        counter.inc_by(n as u64);
    }
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(Step::Eof),
    }
}

/// Writes the `n` bytes in `pipe` to `dst`. On error the pipe is dropped by the caller, bytes and all.
async fn drain(pipe: &Pipe, dst: &TcpStream, n: usize) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || {
            splice(&pipe.read, None, dst, None, left, FLAGS).map_err(io::Error::from)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => left -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
        let pressure = Counter::default();
        let pause = CancellationToken::new();
        let relay_task = async { relay(&c_side, &u_side, &up, &down, &pressure, &pause).await };
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
        assert_eq!(relayed?, Outcome::Ended);
        assert_eq!((up.get(), down.get()), (1 << 20, 29));
        Ok(())
    }

    /// A paused relay leaves every byte in the sockets: a second relay on the same pair (the new instance
    /// after a handoff) carries the stream on without a gap.
    #[tokio::test]
    async fn a_paused_relay_hands_the_pair_over_intact() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (mut client, c_side) = pair(&listener).await?;
        let (u_side, mut server) = pair(&listener).await?;
        let (up, down, pressure) = (Counter::default(), Counter::default(), Counter::default());
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let writer = async {
            // In chunks over some 60 ms, so that the pauses (2 ms apart) come mid-stream: written at once,
            // 4 MiB can go through before the first pause on an idle machine.
            for chunk in data.chunks(64 << 10) {
                client.write_all(chunk).await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client.shutdown().await?;
            Ok::<_, anyhow::Error>(client)
        };
        let reader = async {
            // The reader starts late, so the stream is still in the sockets when the first pause comes
            // (on an idle machine 4 MiB over loopback can end within the first 2 ms, and no pause happens).
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await?;
            server.shutdown().await?; // the relay ends once both directions have
            Ok::<_, anyhow::Error>(got)
        };
        let relays = async {
            let mut outcomes = Vec::new();
            // Pause and resume several times while the bytes flow.
            for _ in 0..5 {
                let pause = CancellationToken::new();
                let stop = pause.clone();
                let (outcome, ()) = tokio::join!(
                    relay(&c_side, &u_side, &up, &down, &pressure, &pause),
                    async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        stop.cancel();
                    }
                );
                let outcome = outcome?;
                outcomes.push(outcome);
                if outcome == Outcome::Ended {
                    return Ok::<_, anyhow::Error>(outcomes);
                }
            }
            let never = CancellationToken::new();
            outcomes.push(relay(&c_side, &u_side, &up, &down, &pressure, &never).await?);
            Ok(outcomes)
        };
        let (w, got, outcomes) = tokio::join!(writer, reader, relays);
        drop(w?);
        let got = got?;
        let outcomes = outcomes?;
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes lost or reordered across pauses");
        assert!(outcomes.contains(&Outcome::Paused), "{outcomes:?}");
        Ok(())
    }
}

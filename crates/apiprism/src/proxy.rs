//! Listeners and client connections: admission (see `admission`), dial with transparent retry, then relay
//! until either side ends or the upstream is taken out of rotation.
//!
//! Local pressure (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) on a dial is never an upstream failure: it is
//! counted as `apiprism_local_pressure_errors_total{op="dial"}`, the dial is retried a few times, and the
//! upstream's health is left alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridnet_runtime::limits::is_local_pressure;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admission::{ClientKey, Permit, Refusal};
use crate::core::Signal;
use crate::handoff::Pair;
use crate::metrics::{Op, ReasonLabels};
use crate::relay::{Outcome, relay};
use crate::shared::Shared;
use crate::sockopt;

/// The bound listeners, reconciled with the config's `listen` list, and the connections handed over by a
/// previous instance.
#[derive(Debug, Default)]
pub struct Listeners {
    running: HashMap<SocketAddr, Bound>,
    tasks: JoinSet<()>,
    /// Listening sockets taken over from a previous instance, used by the next [`Listeners::reconcile`].
    adopted: HashMap<SocketAddr, OwnedFd>,
}

/// One listener: its accept loop's token, and a duplicate of its socket (handed to a new instance, or used to
/// accept again after a handoff that failed).
#[derive(Debug)]
struct Bound {
    token: CancellationToken,
    fd: OwnedFd,
}

/// A non-blocking listener on a duplicate of `fd`.
fn listener_from(fd: &OwnedFd) -> std::io::Result<TcpListener> {
    let std = std::net::TcpListener::from(fd.try_clone()?);
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

impl Listeners {
    /// Binds new addresses (or uses the socket a previous instance handed over) and closes removed ones
    /// (their established connections stay). Returns the bind errors (the other addresses are served).
    pub fn reconcile(
        &mut self,
        want: &[SocketAddr],
        shared: &Arc<Shared>,
        shutdown: &CancellationToken,
    ) -> Vec<(SocketAddr, std::io::Error)> {
        self.running.retain(|addr, bound| {
            let keep = want.contains(addr);
            if !keep {
                tracing::info!(listen = %addr, "listener closed (removed from config)");
                bound.token.cancel();
            }
            keep
        });
        let mut errors = Vec::new();
        for addr in want {
            if self.running.contains_key(addr) {
                continue;
            }
            let (listener, how) = match self.adopted.remove(addr) {
                Some(fd) => (listener_from(&fd), "listening (taken over)"),
                None => (sockopt::listen(*addr), "listening"),
            };
            match listener.and_then(|l| Ok((l.as_fd().try_clone_to_owned()?, l))) {
                Ok((fd, listener)) => {
                    tracing::info!(listen = %addr, "{how}");
                    let token = shutdown.child_token();
                    self.running.insert(
                        *addr,
                        Bound {
                            token: token.clone(),
                            fd,
                        },
                    );
                    self.tasks
                        .spawn(accept_loop(listener, Arc::clone(shared), token));
                }
                Err(error) => errors.push((*addr, error)),
            }
        }
        for (addr, _) in self.adopted.drain() {
            tracing::info!(listen = %addr, "listener taken over but not in the config: closed");
        }
        shared
            .metrics
            .listeners
            .set(i64::try_from(self.running.len()).unwrap_or(0));
        errors
    }

    pub fn bound(&self) -> Vec<SocketAddr> {
        let mut v: Vec<_> = self.running.keys().copied().collect();
        v.sort();
        v
    }

    /// Listening sockets handed over by a previous instance: the next [`Listeners::reconcile`] uses them.
    pub fn offer(&mut self, adopted: Vec<(SocketAddr, OwnedFd)>) {
        self.adopted.extend(adopted);
    }

    /// Relays connections handed over by a previous instance (or paused for a handoff that failed).
    pub fn serve_pairs(&mut self, pairs: Vec<Pair>, shared: &Arc<Shared>) {
        for pair in pairs {
            let key = match pair.client.peer_addr() {
                Ok(peer) => ClientKey::Addr(peer.ip()),
                Err(_) => continue, // gone meanwhile
            };
            let permit = shared.admission.adopt(key);
            self.tasks.spawn(serve(pair, Arc::clone(shared), permit));
        }
    }

    /// Stops every accept loop; the sockets stay open (new connections wait in their backlog).
    pub fn stop_accepting(&self) {
        for bound in self.running.values() {
            bound.token.cancel();
        }
    }

    /// Accepts again on every listener whose loop was stopped (a handoff that failed).
    pub fn resume_accepting(&mut self, shared: &Arc<Shared>, shutdown: &CancellationToken) {
        for (addr, bound) in &mut self.running {
            if !bound.token.is_cancelled() {
                continue;
            }
            match listener_from(&bound.fd) {
                Ok(listener) => {
                    bound.token = shutdown.child_token();
                    self.tasks.spawn(accept_loop(
                        listener,
                        Arc::clone(shared),
                        bound.token.clone(),
                    ));
                }
                Err(error) => tracing::error!(listen = %addr, %error, "cannot accept again"),
            }
        }
    }

    /// The listening sockets, for a handoff (valid while `self` lives).
    pub fn raw_fds(&self) -> Vec<(SocketAddr, RawFd)> {
        self.running
            .iter()
            .map(|(addr, bound)| (*addr, bound.fd.as_raw_fd()))
            .collect()
    }

    /// After a handoff: closes our copies of the listening sockets (the new instance holds them).
    pub fn release(&mut self) {
        self.stop_accepting();
        self.running.clear();
    }

    pub async fn stop(mut self) {
        for bound in self.running.values() {
            bound.token.cancel();
        }
        while self.tasks.join_next().await.is_some() {}
    }
}

/// How long an accept loop waits after an accept failed for lack of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// A dial that fails for lack of local resources is retried this often, this long apart.
const LOCAL_RETRIES: u32 = 5;
const LOCAL_RETRY_WAIT: Duration = Duration::from_millis(20);

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    let mut conns = JoinSet::new();
    let admission = Arc::clone(&shared.admission);
    loop {
        if admission.slots().full() {
            // Every slot is taken: leave new connections in the kernel's backlog until one ends.
            shared.metrics.accept_paused.inc();
            tracing::debug!(listen = ?listener.local_addr().ok(), "connection limit reached: accepting paused");
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    () = admission.wait_for_slot() => break,
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
            if token.is_cancelled() {
                break;
            }
        }
        tokio::select! {
            () = token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match admission.admit(ClientKey::Addr(peer.ip())) {
                    Ok(permit) => {
                        conns.spawn(handle(stream, Arc::clone(&shared), permit));
                    }
                    Err(refusal) => refuse(&shared, &stream, refusal),
                },
                Err(error) if is_local_pressure(&error) => {
                    shared.local_pressure(Op::accept, &error);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    // The listener is closed; connections go on until their upstream or the daemon stops them.
    while conns.join_next().await.is_some() {}
}

/// Closes a connection that was not admitted, with RST (the client learns at once; no TIME_WAIT).
fn refuse(shared: &Shared, stream: &TcpStream, refusal: Refusal) {
    shared
        .metrics
        .refused
        .get_or_create(&ReasonLabels {
            reason: refusal.as_str(),
        })
        .inc();
    tracing::debug!(peer = ?stream.peer_addr().ok(), reason = refusal.as_str(), "client connection refused");
    sockopt::reset_on_close(stream);
}

/// True when the client is gone already (closed or reset before sending a byte): a connection that waited
/// in the backlog through a flood is not worth an upstream dial.
fn client_gone(client: &TcpStream) -> bool {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(client).peek(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// One client connection.
async fn handle(client: TcpStream, shared: Arc<Shared>, permit: Permit) {
    shared.metrics.connections.inc();
    if client_gone(&client) {
        tracing::debug!("client gone before its connection was served");
        return;
    }
    if let Err(error) = sockopt::tune_accepted(&client) {
        tracing::debug!(%error, "client socket options");
    }
    let (upstream, addr) = match dial(&shared).await {
        Ok(dialled) => dialled,
        Err(DialError::Unreachable) => {
            shared.metrics.rejected.inc();
            tracing::warn!("no upstream reachable: client connection closed");
            return;
        }
        Err(DialError::LocalPressure) => {
            shared
                .metrics
                .refused
                .get_or_create(&ReasonLabels {
                    reason: "local_pressure",
                })
                .inc();
            sockopt::reset_on_close(&client);
            return;
        }
    };
    serve(
        Pair {
            client,
            upstream,
            addr,
        },
        shared,
        permit,
    )
    .await;
}

/// Relays an established pair until it ends, its upstream is taken out of rotation (then both sides are
/// reset), or a handoff pauses it (then it is parked for the handoff, still open).
async fn serve(pair: Pair, shared: Arc<Shared>, _permit: Permit) {
    let Pair {
        client,
        upstream,
        addr,
    } = pair;
    let Some(token) = shared.table().open(addr) else {
        return; // removed while we dialled, or not an upstream of ours (handed over)
    };
    let m = &shared.metrics;
    let h = shared.handles(addr);
    m.active.inc();
    h.connections.inc();
    h.active.inc();
    let pressure = shared
        .metrics
        .local_pressure
        .get_or_create(&crate::metrics::OpLabels { op: Op::relay })
        .clone();
    let pause = shared.pausing.token();
    let paused = tokio::select! {
        result = relay(&client, &upstream, &h.to_upstream, &h.to_client, &pressure, &pause) => match result {
            Ok(Outcome::Paused) => true,
            Ok(Outcome::Ended) => false,
            Err(error) => {
                tracing::debug!(upstream = %addr, %error, "connection ended with an error");
                sockopt::reset_on_close(&client);
                false
            }
        },
        () = token.cancelled() => {
            tracing::debug!(upstream = %addr, "connection closed: upstream down or removed");
            sockopt::reset_on_close(&client);
            sockopt::reset_on_close(&upstream);
            false
        }
    };
    shared.table().close(addr);
    m.active.dec();
    h.active.dec();
    if paused {
        shared.pausing.park(Pair {
            client,
            upstream,
            addr,
        });
    }
}

/// Why a client could not be given an upstream.
enum DialError {
    /// Every upstream in the plan failed.
    Unreachable,
    /// We ran out of descriptors or memory: no upstream is to blame.
    LocalPressure,
}

/// Dials the plan's upstreams in order until one answers. Each failure is a passive health signal, except
/// a local one (out of descriptors or memory), which is retried a few times and then gives up without
/// blaming any upstream.
async fn dial(shared: &Shared) -> Result<(TcpStream, SocketAddr), DialError> {
    // Waiting for a slot is not part of any attempt's timeout. The semaphore is never closed.
    let _slot = shared
        .dials
        .acquire()
        .await
        .map_err(|_closed| DialError::LocalPressure)?;
    let plan = shared.plan();
    let mut failed: Option<SocketAddr> = None;
    let mut local_retries = LOCAL_RETRIES;
    for attempt in plan {
        if let Some(prev) = failed.take() {
            shared.table().failover(prev);
            shared.metrics.failovers.inc();
            shared.handles(prev).failovers.inc();
        }
        let (start, result) = loop {
            let start = Instant::now();
            match tokio::time::timeout(attempt.timeout, sockopt::connect(attempt.addr)).await {
                Ok(Err(error)) if is_local_pressure(&error) => {
                    shared.local_pressure(Op::dial, &error);
                    if local_retries == 0 {
                        return Err(DialError::LocalPressure);
                    }
                    local_retries -= 1;
                    tokio::time::sleep(LOCAL_RETRY_WAIT).await;
                }
                result => break (start, result),
            }
        };
        match result {
            Ok(Ok(stream)) => {
                shared.observe(attempt.addr, Ok(start.elapsed()), Signal::Dial);
                if let Err(error) = sockopt::tune(&stream) {
                    tracing::debug!(%error, "upstream socket options");
                }
                return Ok((stream, attempt.addr));
            }
            Ok(Err(error)) => {
                tracing::debug!(upstream = %attempt.addr, %error, "dial failed, trying the next upstream");
                shared.observe_failed_dial(attempt.addr, error.to_string(), start);
            }
            Err(_) => {
                tracing::debug!(upstream = %attempt.addr, timeout = ?attempt.timeout, "dial timed out, trying the next upstream");
                let error = format!("dial timed out after {:?}", attempt.timeout);
                shared.observe_failed_dial(attempt.addr, error, start);
            }
        }
        failed = Some(attempt.addr);
    }
    Err(DialError::Unreachable)
}

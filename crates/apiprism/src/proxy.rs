//! Listeners and client connections: admission (see `admission`), dial with transparent retry, then relay
//! until either side ends or the upstream is taken out of rotation.
//!
//! Local pressure (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) on a dial is never an upstream failure: it is
//! counted as `apiprism_local_pressure_errors_total{op="dial"}`, the dial is retried a few times, and the
//! upstream's health is left alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridnet_runtime::limits::is_local_pressure;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admission::{ClientKey, Permit, Refusal};
use crate::core::Signal;
use crate::metrics::{Op, ReasonLabels};
use crate::relay::relay;
use crate::shared::Shared;
use crate::sockopt;

/// The bound listeners, reconciled with the config's `listen` list.
#[derive(Debug, Default)]
pub struct Listeners {
    running: HashMap<SocketAddr, CancellationToken>,
    tasks: JoinSet<()>,
}

impl Listeners {
    /// Binds new addresses and closes removed ones (their established connections stay). Returns the bind
    /// errors (the other addresses are served).
    pub fn reconcile(
        &mut self,
        want: &[SocketAddr],
        shared: &Arc<Shared>,
        shutdown: &CancellationToken,
    ) -> Vec<(SocketAddr, std::io::Error)> {
        self.running.retain(|addr, token| {
            let keep = want.contains(addr);
            if !keep {
                tracing::info!(listen = %addr, "listener closed (removed from config)");
                token.cancel();
            }
            keep
        });
        let mut errors = Vec::new();
        for addr in want {
            if self.running.contains_key(addr) {
                continue;
            }
            match sockopt::listen(*addr) {
                Ok(listener) => {
                    tracing::info!(listen = %addr, "listening");
                    let token = shutdown.child_token();
                    self.running.insert(*addr, token.clone());
                    self.tasks
                        .spawn(accept_loop(listener, Arc::clone(shared), token));
                }
                Err(error) => errors.push((*addr, error)),
            }
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

    pub async fn stop(mut self) {
        for token in self.running.values() {
            token.cancel();
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
async fn handle(client: TcpStream, shared: Arc<Shared>, _permit: Permit) {
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
    let Some(token) = shared.table().open(addr) else {
        return; // removed while we dialled
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
    tokio::select! {
        result = relay(&client, &upstream, &h.to_upstream, &h.to_client, &pressure) => {
            if let Err(error) = result {
                tracing::debug!(upstream = %addr, %error, "connection ended with an error");
                sockopt::reset_on_close(&client);
            }
        }
        () = token.cancelled() => {
            tracing::debug!(upstream = %addr, "connection closed: upstream down or removed");
            sockopt::reset_on_close(&client);
            sockopt::reset_on_close(&upstream);
        }
    }
    shared.table().close(addr);
    m.active.dec();
    h.active.dec();
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

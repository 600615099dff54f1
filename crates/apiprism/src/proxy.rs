//! Listeners and client connections: dial with transparent retry, then relay until either side ends or the
//! upstream is taken out of rotation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::core::Signal;
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

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    conns.spawn(handle(stream, Arc::clone(&shared)));
                }
                Err(error) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    // The listener is closed; connections go on until their upstream or the daemon stops them.
    while conns.join_next().await.is_some() {}
}

/// One client connection.
async fn handle(client: TcpStream, shared: Arc<Shared>) {
    shared.metrics.connections.inc();
    if let Err(error) = sockopt::tune_accepted(&client) {
        tracing::debug!(%error, "client socket options");
    }
    let Some((upstream, addr)) = dial(&shared).await else {
        shared.metrics.rejected.inc();
        tracing::warn!("no upstream reachable: client connection closed");
        return;
    };
    let Some(token) = shared.table().open(addr) else {
        return; // removed while we dialled
    };
    let m = &shared.metrics;
    let h = shared.handles(addr);
    m.active.inc();
    h.connections.inc();
    h.active.inc();
    tokio::select! {
        result = relay(&client, &upstream, &h.to_upstream, &h.to_client) => {
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

/// Dials the plan's upstreams in order until one answers. Each failure is a passive health signal.
async fn dial(shared: &Shared) -> Option<(TcpStream, SocketAddr)> {
    let plan = shared.plan();
    let mut failed: Option<SocketAddr> = None;
    for attempt in plan {
        if let Some(prev) = failed.take() {
            shared.table().failover(prev);
            shared.metrics.failovers.inc();
            shared.handles(prev).failovers.inc();
        }
        let start = Instant::now();
        let result = tokio::time::timeout(attempt.timeout, sockopt::connect(attempt.addr)).await;
        match result {
            Ok(Ok(stream)) => {
                shared.observe(attempt.addr, Ok(start.elapsed()), Signal::Dial);
                if let Err(error) = sockopt::tune(&stream) {
                    tracing::debug!(%error, "upstream socket options");
                }
                return Some((stream, attempt.addr));
            }
            Ok(Err(error)) => {
                tracing::debug!(upstream = %attempt.addr, %error, "dial failed, trying the next upstream");
                shared.observe(attempt.addr, Err(error.to_string()), Signal::Dial);
            }
            Err(_) => {
                tracing::debug!(upstream = %attempt.addr, timeout = ?attempt.timeout, "dial timed out, trying the next upstream");
                let error = format!("dial timed out after {:?}", attempt.timeout);
                shared.observe(attempt.addr, Err(error), Signal::Dial);
            }
        }
        failed = Some(attempt.addr);
    }
    None
}

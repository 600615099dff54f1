//! The admin HTTP endpoint: `GET /metrics` (Prometheus text), `/healthz` (200 while the process serves),
//! `/readyz` (200 once the daemon reports ready, 503 before).
//!
//! The listener is bound with `SO_REUSEPORT`, so a new instance of a daemon can start while the old one
//! still runs, and it follows the config: a new `admin` address is bound before the old one is closed.
//!
//! Its resources are bounded, whoever connects: at most [`MAX_CONNECTIONS`] connections at once (beyond that
//! new ones wait in the kernel's backlog), request headers must arrive within [`HEADER_READ_TIMEOUT`], a
//! connection's read buffer stays under [`MAX_BUF`], and a connection lives at most [`MAX_LIFETIME`]. A burst
//! of half-sent requests costs a few hundred KiB, not tens of MiB.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::context::Readiness;
use crate::metrics::SharedRegistry;

/// Admin connections served at once; a scraper and a few `curl`s need far fewer.
pub const MAX_CONNECTIONS: usize = 32;
/// Request headers must be complete within this long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest read buffer of a connection (hyper's minimum is 8 KiB); requests are small GETs.
pub const MAX_BUF: usize = 16 * 1024;
/// A connection (keep-alive included) is closed after this long.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub registry: SharedRegistry,
    pub ready: Arc<Readiness>,
}

/// Binds the admin listener (`SO_REUSEADDR`, `SO_REUSEPORT`; see [`crate::net::reuseport_listener`]).
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    crate::net::reuseport_listener(addr, 128)
}

/// Serves the admin endpoint on the address `addr` yields, rebinding when it changes, until `shutdown`.
pub async fn serve(
    mut addr: watch::Receiver<SocketAddr>,
    state: AdminState,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut current = *addr.borrow_and_update();
    let mut listener = bind_reuseport(current)?;
    tracing::info!(addr = %current, "admin endpoint listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut accept_error_logged: Option<std::time::Instant> = None;
    loop {
        // At the connection cap, leave new connections in the backlog until one ends.
        let permit = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => return Ok(()),
            },
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = addr.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let next = *addr.borrow_and_update();
                if next == current {
                    continue;
                }
                match bind_reuseport(next) {
                    Ok(l) => {
                        tracing::info!(from = %current, to = %next, "admin endpoint moved");
                        listener = l;
                        current = next;
                    }
                    Err(error) => {
                        tracing::error!(addr = %next, %error, "cannot bind the new admin address; keeping the old one");
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(&state, &req)) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .max_buf_size(MAX_BUF)
                            .serve_connection(TokioIo::new(stream), service);
                        match tokio::time::timeout(MAX_LIFETIME, conn).await {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => tracing::debug!(%error, "admin connection ended with an error"),
                            Err(_) => tracing::debug!("admin connection closed after its lifetime"),
                        }
                    });
                }
                Err(error) => {
                    // EMFILE and the like: back off briefly instead of spinning, and log now and then.
                    if accept_error_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                        accept_error_logged = Some(std::time::Instant::now());
                        tracing::warn!(%error, "admin accept failed (logged at most every 5 s)");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, state.registry.encode());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.ready.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let state = AdminState {
            registry: SharedRegistry::default(),
            ready: Arc::default(),
        };
        let (_tx, rx) = watch::channel(addr);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(rx, state.clone(), shutdown.clone()));
        let mut health = String::new();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                health = get(addr, "/healthz").await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        state.ready.set_both();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.contains("# EOF"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
        task.await.expect("join").expect("serve");
    }
}

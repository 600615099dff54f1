//! What the in-process HTTP stand-ins share (the discovery service, the Kubernetes API): a listener made in
//! a test's namespace, served by a current-thread runtime on a thread of its own, plain or over TLS, over
//! HTTP/1.1 or HTTP/2, until the [`HttpStandin`] is dropped (every connection closes with the runtime).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The HTTP version a stand-in speaks (the real servers' choice: gRPC is HTTP/2; the Kubernetes API
/// stand-in serves HTTP/1.1, which client-go also speaks).
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    Http1,
    Http2,
}

/// A running stand-in's runtime; stopped (every connection closed) on drop.
#[derive(Debug)]
pub struct HttpStandin {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpStandin {
    /// Serves `listener` with `handle(peer, request)`, after `tls`'s handshake when given (a client that
    /// fails it gets nothing). `every_second`, when given, runs once a second beside the server (expiry
    /// of the state, as the real server's own timers).
    pub fn spawn<H, F, B>(
        listener: std::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        protocol: Protocol,
        every_second: Option<Box<dyn Fn() + Send>>,
        handle: H,
    ) -> HttpStandin
    where
        H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("stand-in runtime: {e}"));
            rt.block_on(serve(
                listener,
                tls,
                protocol,
                every_second,
                handle,
                stopped,
            ));
        });
        HttpStandin {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for HttpStandin {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve<H, F, B>(
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    protocol: Protocol,
    every_second: Option<Box<dyn Fn() + Send>>,
    handle: H,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let listener = tokio::net::TcpListener::from_std(listener)
        .unwrap_or_else(|e| panic!("stand-in listener: {e}"));
    if let Some(tick) = every_second {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick();
            }
        });
    }
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                let (tls, handle) = (tls.clone(), handle.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let response = handle(peer, req);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    match tls {
                        None => serve_connection(protocol, TokioIo::new(tcp), svc).await,
                        // A client that does not trust the test CA (or, where one is asked for, has no
                        // certificate from it) fails here.
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_connection(protocol, TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        }
    }
}

async fn serve_connection<I, S, B>(protocol: Protocol, io: I, svc: S)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let _ = match protocol {
        Protocol::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
        }
        Protocol::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await
        }
    };
}

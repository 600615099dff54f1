//! Pieces the apiprism root tests share: a stand-in API server process in a namespace, and a kubelet-like
//! client (one long watch that reconnects when cut, and bursts of new connections) running on a thread in
//! another namespace while a scenario runs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use super::{Watch, fetch_name};

/// One stand-in API server process (`apiprism-standin`, at `bin`: tests pass
/// `env!("CARGO_BIN_EXE_apiprism-standin")`) in `netns`, serving as `name` on `addr` with the PKI in `pki`.
/// Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Standin {
    child: Child,
}

impl Standin {
    pub fn start(
        netns: &crate::Netns,
        bin: &str,
        name: &str,
        addr: SocketAddr,
        pki: &Path,
    ) -> std::io::Result<Standin> {
        let child = netns
            .command(bin)
            .args([name, &addr.to_string(), &pki.display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        // Killed on every early return below.
        let mut standin = Standin { child };
        let stdout = standin
            .child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("standin: no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("listening") {
            return Err(std::io::Error::other(format!("standin {name}: {line:?}")));
        }
        Ok(standin)
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the kubelet-like client saw.
#[derive(Debug, Default)]
pub struct ClientLog {
    /// Watch connected, with the server that streams its events.
    pub connected: Vec<(Instant, String)>,
    /// Watch cut or failed to open.
    pub cut: Vec<(Instant, String)>,
    /// New connections: (start, end, server or error).
    pub requests: Vec<(Instant, Instant, Result<String, String>)>,
}

pub fn lock(log: &Mutex<ClientLog>) -> MutexGuard<'_, ClientLog> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the client loads apiprism besides its watch: `burst` new connections at once, every `every`, each
/// given up after `timeout`.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub burst: usize,
    pub every: Duration,
    pub timeout: Duration,
}

/// One watch that reconnects when cut, and bursts of new connections, until `stop`.
pub async fn kubelet(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    load: Load,
    log: &Mutex<ClientLog>,
    stop: &AtomicBool,
) {
    let watch = async {
        while !stop.load(Ordering::SeqCst) {
            let mut w = match Watch::open(addr, &tls).await {
                Ok(w) => w,
                Err(e) => {
                    lock(log).cut.push((Instant::now(), format!("open: {e}")));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match w.next().await {
                Ok(server) => lock(log).connected.push((Instant::now(), server)),
                Err(e) => {
                    lock(log).cut.push((Instant::now(), e));
                    continue;
                }
            }
            while !stop.load(Ordering::SeqCst) {
                // A quiet stream (blackholed, or relays paused for a handoff) is not a cut: apiprism
                // decides.
                if let Ok(Err(e)) = tokio::time::timeout(Duration::from_millis(200), w.next()).await
                {
                    lock(log).cut.push((Instant::now(), e));
                    break;
                }
            }
        }
    };
    let bursts = async {
        while !stop.load(Ordering::SeqCst) {
            let one = || async {
                let start = Instant::now();
                let result = fetch_name(addr, &tls, load.timeout).await;
                lock(log).requests.push((start, Instant::now(), result));
            };
            join_all((0..load.burst).map(|_| one())).await;
            tokio::time::sleep(load.every).await;
        }
    };
    tokio::join!(watch, bursts);
}

/// Runs `futures` concurrently on this task until all are done (a burst of connections; they borrow the
/// log, so not spawned).
async fn join_all<F: Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut futures: Vec<Option<Pin<Box<F>>>> = futures.map(|f| Some(Box::pin(f))).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in &mut futures {
            if let Some(f) = slot {
                if f.as_mut().poll(cx).is_ready() {
                    *slot = None;
                } else {
                    pending = true;
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
}

/// Runs [`kubelet`] on a thread in the network namespace `netns` (by name) while `scenario` runs on this
/// thread; stops the client when the scenario returns and gives back both results.
pub fn beside<T, E: From<std::io::Error>>(
    netns: &str,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    load: Load,
    scenario: impl FnOnce(&Mutex<ClientLog>) -> Result<T, E>,
) -> Result<(T, ClientLog), E> {
    let log = Mutex::new(ClientLog::default());
    let stop = AtomicBool::new(false);
    let path = format!("/run/netns/{netns}");
    let result = std::thread::scope(|scope| {
        let client = scope.spawn(|| -> std::io::Result<()> {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(kubelet(addr, tls, load, &log, &stop));
            Ok(())
        });
        let result = scenario(&log);
        stop.store(true, Ordering::SeqCst);
        client
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        result
    });
    let log = log.into_inner().unwrap_or_else(PoisonError::into_inner);
    Ok((result?, log))
}

//! Active health checks: one task per upstream, so all upstreams are checked in parallel and a blackholed one
//! never delays the others. A TCP connect by default; a TLS handshake when a TLS server name is configured.
//!
//! Pacing: every `interval`; right away after a failure that has not yet taken the upstream down (to confirm
//! within one timeout), after a quarter interval after a success of a down upstream (to confirm its recovery),
//! and at once when a client's dial to it failed.
//!
//! A check that cannot even start for lack of local descriptors or memory says nothing about the upstream:
//! it is counted (`apiprism_local_pressure_errors_total{op="probe"}`) and tried again shortly, and the
//! upstream's state is left alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use hybridnet_runtime::limits::is_local_pressure;

use crate::core::{Signal, State};
use crate::metrics::Op;
use crate::shared::Shared;
use crate::{sockopt, tls};

/// How probes are done; follows the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    /// `Some`: complete a TLS handshake with this server name, not only a TCP connect.
    pub tls_server_name: Option<String>,
    /// The cluster CA that discovered upstreams' certificates must verify against (see `vetting`).
    pub cluster_ca_file: std::path::PathBuf,
}

/// The name a discovered API server's certificate is verified for when `tlsServerName` is not set:
/// kubeadm and Talos put it (with `kubernetes.default`...) in every API server certificate.
pub const VERIFY_NAME: &str = "kubernetes";

impl ProbeSettings {
    /// How a discovered upstream is checked: a verified handshake for this name against this CA.
    pub fn verify(&self) -> Verify<'_> {
        Verify {
            name: self.tls_server_name.as_deref().unwrap_or(VERIFY_NAME),
            ca_file: &self.cluster_ca_file,
        }
    }
}

/// A TLS check whose certificate must verify (discovered upstreams).
#[derive(Clone, Copy, Debug)]
pub struct Verify<'a> {
    pub name: &'a str,
    pub ca_file: &'a std::path::Path,
}

/// The running probe tasks.
#[derive(Debug)]
pub struct Prober {
    tasks: HashMap<SocketAddr, CancellationToken>,
    set: JoinSet<()>,
    settings: watch::Sender<ProbeSettings>,
}

impl Prober {
    pub fn new(settings: ProbeSettings) -> Prober {
        Prober {
            tasks: HashMap::new(),
            set: JoinSet::new(),
            settings: watch::Sender::new(settings),
        }
    }

    pub fn set_settings(&self, settings: ProbeSettings) {
        self.settings.send_if_modified(|s| {
            let changed = *s != settings;
            *s = settings;
            changed
        });
    }

    /// Starts checking `addr`; `verified`: with a TLS handshake that verifies against the cluster CA (an
    /// upstream discovered through meshd's members only), so one whose certificate stops verifying goes
    /// down.
    pub fn add(
        &mut self,
        addr: SocketAddr,
        shared: &Arc<Shared>,
        shutdown: &CancellationToken,
        verified: bool,
    ) {
        if self.tasks.contains_key(&addr) {
            return;
        }
        let token = shutdown.child_token();
        self.tasks.insert(addr, token.clone());
        let kick = shared.register_kick(addr);
        let settings = self.settings.subscribe();
        let shared = Arc::clone(shared);
        self.set.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = probe_loop(addr, shared, settings, kick, verified) => {}
            }
        });
    }

    pub fn remove(&mut self, addr: SocketAddr, shared: &Shared) {
        if let Some(token) = self.tasks.remove(&addr) {
            token.cancel();
        }
        shared.forget_kick(addr);
    }

    /// Reaps finished tasks (they only finish when cancelled).
    pub fn reap(&mut self) {
        while self.set.try_join_next().is_some() {}
    }

    pub async fn stop(mut self) {
        for token in self.tasks.values() {
            token.cancel();
        }
        while self.set.join_next().await.is_some() {}
    }
}

/// Quick checks of a newly added upstream, once it answers (see [`probe_loop`]).
const WARM_UP_CHECKS: u32 = 3;
const WARM_UP_INTERVAL: Duration = Duration::from_millis(50);
/// A check that failed for lack of local resources is tried again after this long.
const LOCAL_RETRY_WAIT: Duration = Duration::from_millis(100);

/// Why a check failed.
#[derive(Debug)]
enum Failure {
    /// The upstream did not answer as it should: a health signal.
    Upstream(String),
    /// We are out of descriptors or memory: not a health signal.
    Local(std::io::Error),
}

async fn probe_loop(
    addr: SocketAddr,
    shared: Arc<Shared>,
    settings: watch::Receiver<ProbeSettings>,
    kick: Arc<tokio::sync::Notify>,
    verified: bool,
) {
    // A new upstream's first connect often pays for a neighbour lookup, so its first RTT sample can keep it
    // out of the near-best set. A few quick checks after it is added settle its smoothed RTT in a fraction
    // of a second instead of several intervals.
    let mut warm_up = WARM_UP_CHECKS;
    loop {
        let s = settings.borrow().clone();
        let timeout = shared
            .table()
            .get(addr)
            .map_or(s.timeout, |u| u.attempt_timeout(s.timeout));
        let started = Instant::now();
        let check = if verified {
            Check::Verified(s.verify())
        } else {
            s.tls_server_name.as_deref().map_or(Check::Tcp, Check::Tls)
        };
        let result = match probe(addr, timeout, check).await {
            Ok(rtt) => Ok(rtt),
            Err(Failure::Upstream(error)) => Err(error),
            Err(Failure::Local(error)) => {
                shared.local_pressure(Op::probe, &error);
                tokio::time::sleep(LOCAL_RETRY_WAIT).await;
                continue;
            }
        };
        let ok = result.is_ok();
        let Some(state) = shared.observe(addr, result, Signal::Probe) else {
            return; // removed
        };
        let wait = match (ok, state) {
            (false, State::Unknown | State::Up) => Duration::from_millis(20),
            (true, State::Up) if warm_up > 0 => {
                warm_up -= 1;
                WARM_UP_INTERVAL.min(s.interval)
            }
            (true, State::Down) => s.interval / 4,
            _ => s.interval.saturating_sub(started.elapsed()),
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = kick.notified() => {}
        }
    }
}

/// What one check does.
#[derive(Clone, Copy, Debug)]
pub enum Check<'a> {
    Tcp,
    /// A TLS handshake with this server name (certificate not verified).
    Tls(&'a str),
    /// A TLS handshake whose certificate verifies.
    Verified(Verify<'a>),
}

/// One check for `vetting`: `Ok(connect time)` or what went wrong (local pressure included).
pub async fn check(
    addr: SocketAddr,
    timeout: Duration,
    check: Check<'_>,
) -> Result<Duration, String> {
    probe(addr, timeout, check).await.map_err(|f| match f {
        Failure::Upstream(e) => e,
        Failure::Local(e) => e.to_string(),
    })
}

/// One check: `Ok(connect time)` or what went wrong.
async fn probe(addr: SocketAddr, timeout: Duration, check: Check<'_>) -> Result<Duration, Failure> {
    let start = Instant::now();
    let stream = match tokio::time::timeout(timeout, sockopt::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if is_local_pressure(&e) => return Err(Failure::Local(e)),
        Ok(Err(e)) => return Err(Failure::Upstream(e.to_string())),
        Err(_) => {
            return Err(Failure::Upstream(format!(
                "connect timed out after {timeout:?}"
            )));
        }
    };
    let rtt = start.elapsed();
    let left = timeout.saturating_sub(rtt);
    match check {
        Check::Tcp => {
            // RST on close: no TIME_WAIT per probe (go-loadbalancer uses SO_LINGER for the same reason).
            sockopt::reset_on_close(&stream);
            Ok(rtt)
        }
        Check::Verified(v) => {
            let handshake = tls::verified_handshake(stream, v.name, v.ca_file);
            match tokio::time::timeout(left, handshake).await {
                Ok(Ok(())) => Ok(rtt),
                Ok(Err(e)) => Err(Failure::Upstream(format!(
                    "TLS check against the cluster CA for {:?}: {e}",
                    v.name
                ))),
                Err(_) => Err(Failure::Upstream(format!(
                    "TLS check timed out after {timeout:?}"
                ))),
            }
        }
        Check::Tls(name) => match tokio::time::timeout(left, tls::handshake(stream, name)).await {
            Ok(Ok(())) => Ok(rtt),
            Ok(Err(e)) => Err(Failure::Upstream(format!("TLS handshake: {e}"))),
            Err(_) => Err(Failure::Upstream(format!(
                "TLS handshake timed out after {timeout:?}"
            ))),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    /// A server config presenting `cert` with `key`.
    fn server_config(
        cert: &rcgen::Certificate,
        key: &rcgen::KeyPair,
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        Ok(Arc::new(config))
    }

    fn tls_server_config() -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
        server_config(&cert, &key)
    }

    /// A TCP-only probe passes a server that accepts and hangs up; the TLS probe needs a TLS server.
    #[tokio::test]
    async fn tls_probe_needs_a_tls_handshake() -> anyhow::Result<()> {
        let plain = TcpListener::bind("127.0.0.1:0").await?;
        let plain_addr = plain.local_addr()?;
        tokio::spawn(async move {
            while let Ok((s, _)) = plain.accept().await {
                drop(s);
            }
        });
        let tls = TcpListener::bind("127.0.0.1:0").await?;
        let tls_addr = tls.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls_server_config()?);
        tokio::spawn(async move {
            while let Ok((s, _)) = tls.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(s).await {
                        let mut buf = [0u8; 16];
                        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                    }
                });
            }
        });
        let t = Duration::from_secs(2);
        assert!(probe(plain_addr, t, Check::Tcp).await.is_ok());
        let err = probe(plain_addr, t, Check::Tls("localhost")).await;
        assert!(err.is_err(), "{err:?}");
        assert!(probe(tls_addr, t, Check::Tls("localhost")).await.is_ok());
        Ok(())
    }

    /// A TLS server on loopback with a certificate for `names` signed by a new CA; returns its address
    /// and the CA (PEM).
    pub(crate) async fn ca_signed_server(names: &[&str]) -> anyhow::Result<(SocketAddr, String)> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names)?.signed_by(&key, &ca)?;
        let config = server_config(&cert, &key)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(s).await {
                        let mut buf = [0u8; 16];
                        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                    }
                });
            }
        });
        Ok((addr, ca.pem()))
    }

    /// A discovered upstream passes only with a certificate that verifies against the cluster CA for
    /// the checked name; a TCP listener, another CA, another name or a missing CA file fail.
    #[tokio::test]
    async fn the_verified_check_needs_the_cluster_ca_and_the_name() -> anyhow::Result<()> {
        let (good, ca) = ca_signed_server(&["kubernetes", "kubernetes.default"]).await?;
        let (other, other_ca) = ca_signed_server(&["kubernetes"]).await?;
        let dir = std::env::temp_dir().join(format!("apiprism-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, &ca)?;
        let t = Duration::from_secs(2);
        let v = |name| {
            Check::Verified(Verify {
                name,
                ca_file: &ca_file,
            })
        };
        assert!(check(good, t, v("kubernetes")).await.is_ok());
        let err = check(good, t, v("evil.example")).await;
        assert!(
            err.as_ref().is_err_and(|e| e.contains("cluster CA")),
            "{err:?}"
        );
        // Signed by another CA (a hostile node's own): refused.
        let err = check(other, t, v("kubernetes")).await;
        assert!(err.is_err(), "{err:?}");
        assert_ne!(ca, other_ca);
        // Plain TCP: refused.
        let plain = TcpListener::bind("127.0.0.1:0").await?;
        let plain_addr = plain.local_addr()?;
        tokio::spawn(async move {
            while let Ok((s, _)) = plain.accept().await {
                drop(s);
            }
        });
        assert!(check(plain_addr, t, v("kubernetes")).await.is_err());
        // No CA file: nothing verifies.
        std::fs::remove_file(&ca_file)?;
        let err = check(good, t, v("kubernetes")).await;
        assert!(err.as_ref().is_err_and(|e| e.contains("ca.crt")), "{err:?}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

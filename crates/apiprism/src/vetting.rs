//! Discovered upstreams get traffic only after a TLS check against the cluster CA. meshd's members record
//! lists every node that announces itself as a control plane (a Talos affiliate with an API server port,
//! a Node with the control-plane label and `api-server-port`): any node can, so a hostile one could put
//! itself in every node's API path. An upstream that only a member names is held back until a TLS
//! handshake verifies its certificate against `apiprism.clusterCAFile` for the name apiprism checks
//! (`apiprism.tlsServerName`, else `kubernetes`); then it joins the table, where its health checks keep
//! verifying (a certificate that stops verifying takes it down). Configured upstreams (the control-plane
//! endpoint, `localhost`, `apiprism.endpoints`) keep plain checks: they are the operator's.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::health::{self, Check, ProbeSettings};
use crate::upstreams::MEMBER;

/// The vetting of discovered upstreams.
#[derive(Debug, Default)]
pub struct Vetting {
    passed: Arc<Mutex<HashSet<SocketAddr>>>,
    tasks: HashMap<SocketAddr, CancellationToken>,
    settings: Option<ProbeSettings>,
    /// Notified when an upstream passed (the control loop then reconciles).
    pub changed: Arc<Notify>,
}

fn lock(set: &Mutex<HashSet<SocketAddr>>) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
    set.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Vetting {
    /// What of `desired` may get traffic now: upstreams with a configured source, and discovered ones
    /// that passed; a check runs for each discovered one that has not. The second value: the admitted
    /// upstreams that only members name (their health checks verify too).
    pub fn admit(
        &mut self,
        desired: Vec<(SocketAddr, String)>,
        settings: &ProbeSettings,
        shutdown: &CancellationToken,
    ) -> (Vec<(SocketAddr, String)>, HashSet<SocketAddr>) {
        if self.settings.as_ref() != Some(settings) {
            // Another CA file or name: everything discovered is checked again.
            for (_, token) in self.tasks.drain() {
                token.cancel();
            }
            lock(&self.passed).clear();
            self.settings = Some(settings.clone());
        }
        let configured: HashSet<SocketAddr> = desired
            .iter()
            .filter(|(_, s)| !s.starts_with(MEMBER))
            .map(|(a, _)| *a)
            .collect();
        let discovered: HashSet<SocketAddr> = desired
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| !configured.contains(a))
            .collect();
        self.tasks.retain(|addr, token| {
            let keep = discovered.contains(addr);
            if !keep {
                token.cancel();
            }
            keep
        });
        let ok: HashSet<SocketAddr> = {
            let mut p = lock(&self.passed);
            p.retain(|a| discovered.contains(a));
            p.clone()
        };
        for addr in discovered.iter().filter(|a| !ok.contains(a)) {
            if self.tasks.contains_key(addr) {
                continue;
            }
            let token = shutdown.child_token();
            self.tasks.insert(*addr, token.clone());
            let (addr, settings) = (*addr, settings.clone());
            let (passed, changed) = (Arc::clone(&self.passed), Arc::clone(&self.changed));
            tokio::spawn(async move {
                tokio::select! {
                    () = token.cancelled() => {}
                    () = vet(addr, &settings) => {
                        lock(&passed).insert(addr);
                        changed.notify_one();
                    }
                }
            });
        }
        let admitted = desired
            .into_iter()
            .filter(|(a, _)| configured.contains(a) || ok.contains(a))
            .collect();
        (admitted, ok)
    }
}

/// Checks `addr` every interval until its certificate verifies (logged once per distinct failure).
async fn vet(addr: SocketAddr, settings: &ProbeSettings) {
    let mut last: Option<String> = None;
    loop {
        match health::check(addr, settings.timeout, Check::Verified(settings.verify())).await {
            Ok(_) => {
                tracing::info!(upstream = %addr, "discovered API server verified against the cluster CA: it gets traffic");
                return;
            }
            Err(error) => {
                if last.as_ref() != Some(&error) {
                    tracing::warn!(upstream = %addr, %error, "discovered API server held back: no traffic until its certificate verifies against the cluster CA");
                    last = Some(error);
                }
            }
        }
        tokio::time::sleep(settings.interval).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::health::tests::ca_signed_server;

    /// A discovered upstream is admitted once its certificate verifies; one whose does not never is; a
    /// configured one at once.
    #[tokio::test]
    async fn discovered_upstreams_wait_for_a_verified_check() -> anyhow::Result<()> {
        let (good, ca) = ca_signed_server(&["kubernetes"]).await?;
        let (hostile, _) = ca_signed_server(&["kubernetes"]).await?;
        let dir = std::env::temp_dir().join(format!("apiprism-vetting-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ca.crt"), &ca)?;
        let settings = ProbeSettings {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(1),
            tls_server_name: None,
            cluster_ca_file: dir.join("ca.crt"),
        };
        let configured: SocketAddr = "192.0.2.1:6443".parse()?;
        let desired = vec![
            (configured, "192.0.2.1:6443".to_owned()),
            (good, format!("{MEMBER}cp-1")),
            (hostile, format!("{MEMBER}evil")),
        ];
        let shutdown = CancellationToken::new();
        let mut v = Vetting::default();
        let (admitted, verified) = v.admit(desired.clone(), &settings, &shutdown);
        assert_eq!(admitted, vec![desired[0].clone()]);
        assert!(verified.is_empty());
        tokio::time::timeout(Duration::from_secs(5), v.changed.notified()).await?;
        let (admitted, verified) = v.admit(desired.clone(), &settings, &shutdown);
        assert_eq!(admitted, vec![desired[0].clone(), desired[1].clone()]);
        assert_eq!(verified, [good].into_iter().collect());
        // The hostile one keeps failing: still out after a few more intervals.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (admitted, _) = v.admit(desired.clone(), &settings, &shutdown);
        assert!(!admitted.iter().any(|(a, _)| *a == hostile));
        shutdown.cancel();
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}

//! The Kubernetes client configuration meshd's Kubernetes registry and dnslocal's cluster-zone authority
//! share: the credentials a node has, tried in one order.
//!
//! 1. a kubeconfig the daemon's config names (e.g. `dnslocal.kubeconfig`), then `KUBECONFIG`;
//! 2. the in-cluster service account (`KUBERNETES_SERVICE_HOST`: the DaemonSet);
//! 3. the kubelet's kubeconfig ([`hybridnet_config::KUBELET_KUBECONFIGS`]: kubeadm, Talos, k3s), so a node
//!    uses the kubelet's own credentials (NodeRestriction limits them to its own Node).

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use hybridnet_config::KUBELET_KUBECONFIGS;

/// The API server connect timeout: a dead API server must not hold a registry or a watch for long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Loads the client configuration: `explicit` (a kubeconfig from the daemon's config, named `setting` in
/// errors), else the order in the module docs. Errors name the file and what is wrong with it.
pub async fn client_config(
    explicit: Option<&Path>,
    setting: Option<&str>,
) -> Result<kube::Config, String> {
    let env = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty());
    let mut config = if let Some(path) = explicit {
        from_file(path).await?
    } else if let Some(path) = env {
        // `KUBECONFIG` may list several files (merged, as kubectl does).
        let shown = format!("KUBECONFIG={}", PathBuf::from(&path).display());
        let kc = kube::config::Kubeconfig::from_env()
            .map_err(|e| format!("{shown}: {e}"))?
            .ok_or_else(|| format!("{shown}: nothing to read"))?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("{shown}: {e}"))?
    } else if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        kube::Config::incluster().map_err(|e| format!("in-cluster service account: {e}"))?
    } else if let Some(path) = KUBELET_KUBECONFIGS.iter().find(|p| Path::new(p).exists()) {
        from_file(Path::new(path)).await?
    } else {
        return Err(format!(
            "no Kubernetes credentials: set {}KUBECONFIG, run in a pod with a service account, or provide a \
             kubelet kubeconfig ({})",
            setting.map(|s| format!("{s} or ")).unwrap_or_default(),
            KUBELET_KUBECONFIGS.join(", ")
        ));
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    Ok(config)
}

async fn from_file(path: &Path) -> Result<kube::Config, String> {
    let shown = path.display().to_string();
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| format!("{shown}: {e}"))?;
    kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| format!("{shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broken_kubeconfig_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("hybridnet-kube-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("kubeconfig");
        std::fs::write(&path, "clusters: [ {").expect("write");
        let error = client_config(Some(&path), Some("dnslocal.kubeconfig"))
            .await
            .expect_err("broken YAML");
        assert!(error.contains(&path.display().to_string()), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

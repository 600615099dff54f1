//! Config files for tests: our `HybridNetConfig` document, optionally after Talos documents.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::DaemonKind;

/// A `HybridNetConfig` document with the keys the daemons have today; change fields, then [`ConfigDoc::render`].
/// Per-node state and data directories are required: namespaces share the filesystem.
///
/// The default addresses are on the lab segment (192.0.2.0/24): upstreams must be routable for dnslocal to
/// become ready (it connects its upstream sockets), so a lone namespace needs [`Netns::add_lab_link`].
///
/// [`Netns::add_lab_link`]: crate::Netns::add_lab_link
#[derive(Clone, Debug)]
pub struct ConfigDoc {
    pub state_dir: PathBuf,
    pub data_dir: PathBuf,
    pub apiprism_listen: Vec<String>,
    pub apiprism_endpoints: Vec<String>,
    pub apiprism_admin: SocketAddr,
    pub meshd_interface: String,
    pub meshd_listen_port: u16,
    pub meshd_location: String,
    pub meshd_admin: SocketAddr,
    pub dnslocal_listen: Vec<String>,
    pub cluster_domain: String,
    pub cluster_dns: Vec<String>,
    /// Where dnslocal forwards everything else; set, so the host's /etc/resolv.conf does not matter.
    pub dnslocal_upstreams: Vec<String>,
    pub dnslocal_admin: SocketAddr,
    /// Documents (Talos machine config) put before ours, without the trailing `---`.
    pub preamble: Option<String>,
    /// Extra lines appended verbatim inside our document (top level), e.g. to inject an error.
    pub extra: String,
    /// Extra `key: value` pairs inside the `apiprism` mapping (e.g. `clusterCAFile: /path`).
    pub apiprism_extra: Vec<(String, String)>,
}

impl ConfigDoc {
    /// The defaults the lab uses, with state and data under `root` (`<root>/state`, `<root>/data`).
    pub fn new(root: &Path) -> ConfigDoc {
        ConfigDoc {
            state_dir: root.join("state"),
            data_dir: root.join("data"),
            apiprism_listen: vec!["127.0.0.1:7445".into()],
            apiprism_endpoints: vec!["192.0.2.1:6443".into()],
            apiprism_admin: DaemonKind::Apiprism.default_admin(),
            meshd_interface: "hybridnet0".into(),
            meshd_listen_port: 51821,
            meshd_location: "lab".into(),
            meshd_admin: DaemonKind::Meshd.default_admin(),
            dnslocal_listen: vec!["169.254.20.10:53".into()],
            cluster_domain: "cluster.local".into(),
            cluster_dns: vec!["192.0.2.53:53".into()],
            dnslocal_upstreams: vec!["192.0.2.1:53".into()],
            dnslocal_admin: DaemonKind::Dnslocal.default_admin(),
            preamble: None,
            extra: String::new(),
            apiprism_extra: Vec::new(),
        }
    }

    /// The admin address this document gives `kind`.
    pub fn admin(&self, kind: DaemonKind) -> SocketAddr {
        match kind {
            DaemonKind::Apiprism => self.apiprism_admin,
            DaemonKind::Meshd => self.meshd_admin,
            DaemonKind::Dnslocal => self.dnslocal_admin,
        }
    }

    pub fn set_admin(&mut self, kind: DaemonKind, addr: SocketAddr) {
        match kind {
            DaemonKind::Apiprism => self.apiprism_admin = addr,
            DaemonKind::Meshd => self.meshd_admin = addr,
            DaemonKind::Dnslocal => self.dnslocal_admin = addr,
        }
    }

    /// The YAML file text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(preamble) = &self.preamble {
            out.push_str(preamble.trim_end());
            out.push_str("\n---\n");
        }
        // `writeln!` into a String cannot fail.
        let _ = writeln!(
            out,
            "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: {}\ndataDir: {}",
            quote(&self.state_dir.display().to_string()),
            quote(&self.data_dir.display().to_string()),
        );
        let more: String = self
            .apiprism_extra
            .iter()
            .map(|(k, v)| format!(", {k}: {}", quote(v)))
            .collect();
        let _ = writeln!(
            out,
            "apiprism: {{listen: {}, endpoints: {}, admin: {}{more}}}",
            list(&self.apiprism_listen),
            list(&self.apiprism_endpoints),
            quote(&self.apiprism_admin.to_string()),
        );
        let _ = writeln!(
            out,
            "meshd: {{interface: {}, listenPort: {}, location: {}, admin: {}}}",
            quote(&self.meshd_interface),
            self.meshd_listen_port,
            quote(&self.meshd_location),
            quote(&self.meshd_admin.to_string()),
        );
        let _ = writeln!(
            out,
            "dnslocal: {{listen: {}, clusterDomain: {}, clusterDNS: {}, upstreams: {}, admin: {}}}",
            list(&self.dnslocal_listen),
            quote(&self.cluster_domain),
            list(&self.cluster_dns),
            list(&self.dnslocal_upstreams),
            quote(&self.dnslocal_admin.to_string()),
        );
        out.push_str(&self.extra);
        out
    }
}

fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn list(items: &[String]) -> String {
    format!(
        "[{}]",
        items
            .iter()
            .map(|s| quote(s))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

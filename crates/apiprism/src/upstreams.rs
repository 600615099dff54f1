//! The desired upstream set: the config's upstreams (the control-plane endpoint, this node's API server on
//! control planes, the static `endpoints`) and the control-plane members meshd publishes, resolved and
//! deduplicated.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hybridnet_config::HostPort;
use hybridnet_state::Members;

use crate::core::dedup;

/// How long one name lookup may take; a slow resolver must not stall the control loop.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The source of an upstream a member of meshd's record names: `member <name>`.
pub const MEMBER: &str = "member ";
/// Hostnames are looked up again this often (an endpoint's DNS name may move).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Resolves config upstreams, keeping the last good answer of a name whose lookup fails.
#[derive(Debug, Default)]
pub struct Resolver {
    last_good: HashMap<HostPort, Vec<SocketAddr>>,
}

impl Resolver {
    /// The upstreams to run now: `(address, source)`, deduplicated.
    pub async fn desired(
        &mut self,
        configured: &[HostPort],
        members: Option<&Members>,
    ) -> Vec<(SocketAddr, String)> {
        let mut entries = Vec::new();
        for hp in configured {
            for addr in self.resolve(hp).await {
                entries.push((addr, hp.to_string()));
            }
        }
        self.last_good.retain(|hp, _| configured.contains(hp));
        if let Some(members) = members {
            entries.extend(member_upstreams(members));
        }
        dedup(entries, is_local)
    }

    async fn resolve(&mut self, hp: &HostPort) -> Vec<SocketAddr> {
        if let Some(addr) = hp.socket_addr() {
            return vec![addr];
        }
        // `localhost` is this node's API server: 127.0.0.1, never whatever the resolver says first
        // (KubePrism issues #8115/#9156: `localhost` resolving to ::1 where the API server is IPv4 only).
        if hp.host.eq_ignore_ascii_case("localhost") {
            return vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), hp.port)];
        }
        match hybridnet_runtime::net::resolve(hp, RESOLVE_TIMEOUT).await {
            Ok(mut addrs) => {
                addrs.dedup();
                if self.last_good.get(hp) != Some(&addrs) {
                    tracing::info!(endpoint = %hp, ?addrs, "resolved");
                }
                self.last_good.insert(hp.clone(), addrs.clone());
                addrs
            }
            Err(error) => self.keep(hp, error.to_string()),
        }
    }

    fn keep(&self, hp: &HostPort, error: String) -> Vec<SocketAddr> {
        let kept = self.last_good.get(hp).cloned().unwrap_or_default();
        tracing::warn!(endpoint = %hp, %error, ?kept, "cannot resolve: keeping the last good addresses");
        kept
    }
}

/// True when any configured upstream is a hostname (then it is re-resolved periodically).
pub fn has_hostnames(configured: &[HostPort]) -> bool {
    configured
        .iter()
        .any(|hp| hp.socket_addr().is_none() && !hp.host.eq_ignore_ascii_case("localhost"))
}

/// The API servers among meshd's members, with their names as source.
pub fn member_upstreams(members: &Members) -> Vec<(SocketAddr, String)> {
    let mut out = Vec::new();
    for m in members.members.iter().filter(|m| m.control_plane) {
        let Some(port) = m.api_server_port.filter(|p| *p != 0) else {
            continue;
        };
        for ip in m
            .addresses
            .iter()
            .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        {
            out.push((SocketAddr::new(*ip, port), format!("{MEMBER}{}", m.name)));
        }
    }
    out
}

/// Whether `ip` is one of this node's addresses (it can be bound).
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hybridnet_state::Member;

    fn hp(host: &str, port: u16) -> HostPort {
        HostPort {
            host: host.into(),
            port,
        }
    }

    #[tokio::test]
    async fn configured_and_members_are_merged() {
        let members = Members {
            members: vec![
                Member {
                    name: "cp-1".into(),
                    addresses: vec!["192.0.2.11".parse().expect("ip")],
                    control_plane: true,
                    api_server_port: Some(6443),
                    ..Default::default()
                },
                Member {
                    name: "worker".into(),
                    addresses: vec!["192.0.2.20".parse().expect("ip")],
                    control_plane: false,
                    api_server_port: Some(6443),
                    ..Default::default()
                },
            ],
        };
        let mut r = Resolver::default();
        let got = r
            .desired(
                &[hp("localhost", 6443), hp("192.0.2.11", 6443)],
                Some(&members),
            )
            .await;
        let addrs: Vec<String> = got.iter().map(|(a, s)| format!("{a} {s}")).collect();
        assert_eq!(
            addrs,
            [
                "127.0.0.1:6443 localhost:6443",
                "192.0.2.11:6443 192.0.2.11:6443",
                "192.0.2.11:6443 member cp-1",
            ]
        );
        assert!(!has_hostnames(&[hp("localhost", 1), hp("10.0.0.1", 1)]));
        assert!(has_hostnames(&[hp("api.example", 443)]));
    }
}

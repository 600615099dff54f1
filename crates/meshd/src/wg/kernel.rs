//! The kernel backend: a `wireguard` link configured over generic netlink (`WG_CMD_GET_DEVICE` /
//! `WG_CMD_SET_DEVICE`). Peers are updated in place (`WGPEER_F_UPDATE_ONLY`, `WGPEER_F_REPLACE_ALLOWEDIPS`):
//! an endpoint change keeps the session, so no handshake is needed after a failover. One set request per
//! changed peer: the cost of a change does not grow with the number of peers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use genetlink::GenetlinkHandle;
use hybridnet_config::PublicKey;
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::{Actual, PeerConfig, PeerOp, PeerStats, Update};
use crate::Error;

/// Whether the kernel has WireGuard (the module is loaded or built in, or can be loaded).
pub fn available() -> bool {
    std::path::Path::new("/sys/module/wireguard").exists()
        || std::fs::read_to_string("/proc/modules")
            .map(|m| m.lines().any(|l| l.starts_with("wireguard ")))
            .unwrap_or(false)
        || modules_dir_has_wireguard()
}

fn modules_dir_has_wireguard() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let dep = format!("/lib/modules/{}/modules.dep", release.trim());
    std::fs::read_to_string(dep)
        .map(|d| d.lines().any(|l| l.contains("/wireguard.ko")))
        .unwrap_or(false)
}

/// A kernel WireGuard link, configured over generic netlink.
pub struct Kernel {
    name: String,
    handle: GenetlinkHandle,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").field("name", &self.name).finish()
    }
}

fn gerr(what: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Backend(format!("wireguard netlink {what}: {e}"))
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.network()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

fn peer_attrs(
    key: &PublicKey,
    config: &PeerConfig,
    add: bool,
    ep: bool,
    ips: bool,
    ka: bool,
) -> WireguardPeer {
    let mut attrs = vec![WireguardPeerAttribute::PublicKey(key.0)];
    let mut flags = WireguardPeerFlags::empty();
    if !add {
        flags |= WireguardPeerFlags::UpdateOnly;
    }
    if add && let Some(psk) = config.preshared_key {
        attrs.push(WireguardPeerAttribute::PresharedKey(psk));
    }
    if (ep || add)
        && let Some(e) = config.endpoint
    {
        attrs.push(WireguardPeerAttribute::Endpoint(e));
    }
    if ka || add {
        attrs.push(WireguardPeerAttribute::PersistentKeepalive(
            config.keepalive.unwrap_or(0),
        ));
    }
    if ips || add {
        flags |= WireguardPeerFlags::ReplaceAllowedIps;
        attrs.push(WireguardPeerAttribute::AllowedIps(
            config.allowed_ips.iter().map(allowed_ip).collect(),
        ));
    }
    attrs.push(WireguardPeerAttribute::Flags(flags));
    WireguardPeer(attrs)
}

impl Kernel {
    /// Connects to the kernel's WireGuard family for link `name` (which must exist).
    pub fn connect(name: &str) -> Result<Kernel, Error> {
        let (conn, handle, _) = genetlink::new_connection()
            .map_err(|e| Error::Backend(format!("generic netlink: {e}")))?;
        tokio::spawn(conn);
        Ok(Kernel {
            name: name.to_owned(),
            handle,
        })
    }

    async fn send(
        &mut self,
        attributes: Vec<WireguardAttribute>,
        cmd: WireguardCmd,
        dump: bool,
    ) -> Result<Vec<WireguardMessage>, Error> {
        let mut msg = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd,
            attributes,
        }));
        msg.header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        msg.finalize();
        let mut stream = self
            .handle
            .request(msg)
            .await
            .map_err(|e| gerr("request")(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(reply) = stream.next().await {
            let reply = reply.map_err(|e| gerr("decode")(e.to_string()))?;
            match reply.payload {
                NetlinkPayload::InnerMessage(genl) => out.push(genl.payload),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(gerr("reply")(e.to_string()));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    pub async fn get(&mut self) -> Result<Actual, Error> {
        let name = self.name.clone();
        let replies = self
            .send(
                vec![WireguardAttribute::IfName(name)],
                WireguardCmd::GetDevice,
                true,
            )
            .await?;
        let mut actual = Actual::default();
        for message in replies {
            for attr in message.attributes {
                match attr {
                    WireguardAttribute::PublicKey(k) if k != [0; 32] => {
                        actual.public_key = Some(PublicKey(k))
                    }
                    WireguardAttribute::ListenPort(p) => actual.listen_port = p,
                    WireguardAttribute::Fwmark(m) => actual.fwmark = m,
                    WireguardAttribute::Peers(peers) => {
                        for peer in peers {
                            let (key, config, stats) = parse_peer(peer);
                            if let Some(key) = key {
                                // A peer's allowed IPs may be split over several messages.
                                let entry = actual
                                    .peers
                                    .entry(key)
                                    .or_insert((PeerConfig::default(), PeerStats::default()));
                                Arc::make_mut(&mut entry.0.allowed_ips)
                                    .extend(config.allowed_ips.iter().copied());
                                if config.endpoint.is_some() {
                                    entry.0.endpoint = config.endpoint;
                                }
                                if config.keepalive.is_some() {
                                    entry.0.keepalive = config.keepalive;
                                }
                                if stats != PeerStats::default() {
                                    entry.1 = stats;
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(actual)
    }

    pub async fn apply(&mut self, update: &Update) -> Result<(), Error> {
        let name = self.name.clone();
        let mut device = vec![WireguardAttribute::IfName(name.clone())];
        if let Some(k) = update.private_key {
            device.push(WireguardAttribute::PrivateKey(k));
        }
        if let Some(p) = update.listen_port {
            device.push(WireguardAttribute::ListenPort(p));
        }
        if let Some(m) = update.fwmark {
            device.push(WireguardAttribute::Fwmark(m));
        }
        if device.len() > 1 {
            self.send(device, WireguardCmd::SetDevice, false).await?;
        }
        for op in &update.peers {
            let peer = match op {
                PeerOp::Add(key, config) => peer_attrs(key, config, true, true, true, true),
                PeerOp::Remove(key) => WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(key.0),
                    WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                ]),
                PeerOp::Update {
                    key,
                    config,
                    endpoint,
                    allowed_ips,
                    keepalive,
                } => peer_attrs(key, config, false, *endpoint, *allowed_ips, *keepalive),
            };
            self.send(
                vec![
                    WireguardAttribute::IfName(name.clone()),
                    WireguardAttribute::Peers(vec![peer]),
                ],
                WireguardCmd::SetDevice,
                false,
            )
            .await?;
        }
        Ok(())
    }
}

fn parse_peer(peer: WireguardPeer) -> (Option<PublicKey>, PeerConfig, PeerStats) {
    let mut key = None;
    let mut config = PeerConfig::default();
    let mut stats = PeerStats::default();
    for attr in peer.0 {
        match attr {
            WireguardPeerAttribute::PublicKey(k) => key = Some(PublicKey(k)),
            WireguardPeerAttribute::Endpoint(e) => config.endpoint = Some(e),
            WireguardPeerAttribute::PersistentKeepalive(k) => {
                config.keepalive = Some(k).filter(|k| *k != 0)
            }
            WireguardPeerAttribute::RxBytes(b) => stats.rx_bytes = b,
            WireguardPeerAttribute::TxBytes(b) => stats.tx_bytes = b,
            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                stats.last_handshake =
                    Some(now.saturating_sub(Duration::from_secs(t.seconds as u64)));
            }
            WireguardPeerAttribute::AllowedIps(ips) => {
                let mut set = BTreeSet::new();
                for ip in ips {
                    let mut addr = None;
                    let mut cidr = None;
                    for a in ip.0 {
                        match a {
                            WireguardAllowedIpAttr::IpAddr(x) => addr = Some(x),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                            _ => {}
                        }
                    }
                    if let (Some(a), Some(c)) = (addr, cidr)
                        && let Ok(n) = IpNet::new(a, c)
                    {
                        set.insert(n);
                    }
                }
                config.allowed_ips = std::sync::Arc::new(set);
            }
            _ => {}
        }
    }
    (key, config, stats)
}

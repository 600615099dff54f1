//! Checks across values: what is fine alone but not together.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use crate::Config;
use crate::error::{Issue, IssueKind};
use crate::model::{TALOS_HOST_DNS, TALOS_HOST_DNS_FORWARD, TALOS_HOST_DNS_FORWARD_V6};
use crate::read::Ctx;
use crate::source::Source;

fn push(ctx: &mut Ctx, config: &Config, key: &str, kind: IssueKind, message: String) {
    let pos = match config.sources.get(key) {
        Source::HybridNet { pos, .. } | Source::Talos { pos, .. } => Some(*pos),
        _ => None,
    };
    ctx.issues.push(Issue::new(
        &ctx.origin,
        pos,
        kind,
        format!("`{key}`: {message}"),
    ));
}

/// Runs every cross-field check, adding issues to `ctx`.
pub fn validate(ctx: &mut Ctx, c: &Config) {
    check_dnslocal_listen(ctx, c);
    check_apiprism(ctx, c);
    check_admin(ctx, c);
    check_local_listen(ctx, c);
    check_peers(ctx, c);
    for (key, d) in [
        (
            "apiprism.healthCheck.interval",
            c.apiprism.health_check.interval,
        ),
        (
            "apiprism.healthCheck.timeout",
            c.apiprism.health_check.timeout,
        ),
        ("apiprism.dialTimeout", c.apiprism.dial_timeout),
    ] {
        if d.is_zero() {
            push(
                ctx,
                c,
                key,
                IssueKind::Value,
                "must be more than zero".into(),
            );
        }
    }
    if c.dnslocal.cache.max_ttl.is_zero() {
        push(
            ctx,
            c,
            "dnslocal.cache.maxTTL",
            IssueKind::Value,
            "must be more than zero".into(),
        );
    }
    check_dnslocal_forward(ctx, c);
}

fn check_dnslocal_forward(ctx: &mut Ctx, c: &Config) {
    let zones: Vec<&str> = c.dnslocal.forward.iter().map(|f| f.zone.as_str()).collect();
    for (i, zone) in zones.iter().enumerate() {
        if zones[..i].contains(zone) {
            push(
                ctx,
                c,
                "dnslocal.forward",
                IssueKind::Conflict,
                format!("zone `{zone}` is listed twice"),
            );
        }
    }
}

fn check_dnslocal_listen(ctx: &mut Ctx, c: &Config) {
    if c.dnslocal.listen.is_empty() {
        push(
            ctx,
            c,
            "dnslocal.listen",
            IssueKind::Value,
            "expected at least one address".into(),
        );
    }
    for addr in &c.dnslocal.listen {
        let ip = addr.ip();
        if [
            TALOS_HOST_DNS,
            TALOS_HOST_DNS_FORWARD,
            TALOS_HOST_DNS_FORWARD_V6,
        ]
        .contains(&ip)
        {
            let message = format!(
                "{addr} is Talos's host DNS address (machined's DNS cache listens there); \
                 use another address such as 169.254.20.10:53"
            );
            push(ctx, c, "dnslocal.listen", IssueKind::Conflict, message);
        } else if ip.is_unspecified() && addr.port() == 53 && c.cluster.host_dns.enabled {
            let message = format!(
                "{addr} would take port 53 on every address, including Talos's host DNS (hostDNS is enabled); \
                 listen on a dedicated address instead"
            );
            push(ctx, c, "dnslocal.listen", IssueKind::Conflict, message);
        }
    }
}

fn check_apiprism(ctx: &mut Ctx, c: &Config) {
    if c.apiprism.listen.is_empty() {
        push(
            ctx,
            c,
            "apiprism.listen",
            IssueKind::Value,
            "expected at least one address".into(),
        );
    }
    let Some(kp) = &c.cluster.kube_prism else {
        return;
    };
    for addr in &c.apiprism.listen {
        let v4 = matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback() || ip.is_unspecified());
        if v4 && addr.port() == kp.port {
            let message = format!(
                "{addr} collides with Talos's own KubePrism on 127.0.0.1:{}; use another port (7455) or disable KubePrism",
                kp.port
            );
            push(ctx, c, "apiprism.listen", IssueKind::Conflict, message);
        }
    }
}

fn check_admin(ctx: &mut Ctx, c: &Config) {
    let admins: [(&str, SocketAddr); 3] = [
        ("apiprism.admin", c.apiprism.admin),
        ("meshd.admin", c.meshd.admin),
        ("dnslocal.admin", c.dnslocal.admin),
    ];
    for (i, (key, addr)) in admins.iter().enumerate() {
        if let Some((other, _)) = admins[..i].iter().find(|(_, a)| a == addr) {
            push(
                ctx,
                c,
                key,
                IssueKind::Conflict,
                format!("{addr} is also `{other}`: each daemon needs its own admin address"),
            );
        }
    }
}

/// Loopback or link-local: reachable from this node (or its link) only.
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unicast_link_local()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_link_local())
        }
    }
}

/// `apiprism.listen` and the admin addresses stay on loopback or link-local unless `allowNonLocalListen`:
/// apiprism on a routable address is an open relay to the API servers.
fn check_local_listen(ctx: &mut Ctx, c: &Config) {
    if c.allow_non_local_listen {
        return;
    }
    let mut addrs: Vec<(&str, SocketAddr, &str)> = c
        .apiprism
        .listen
        .iter()
        .map(|a| {
            (
                "apiprism.listen",
                *a,
                "apiprism would relay anyone who reaches it to the API servers",
            )
        })
        .collect();
    for (key, addr) in [
        ("apiprism.admin", c.apiprism.admin),
        ("meshd.admin", c.meshd.admin),
        ("dnslocal.admin", c.dnslocal.admin),
    ] {
        addrs.push((
            key,
            addr,
            "the admin endpoint would be reachable from other hosts",
        ));
    }
    for (key, addr, why) in addrs {
        if !is_local(addr.ip()) {
            push(
                ctx,
                c,
                key,
                IssueKind::Conflict,
                format!(
                    "{addr} is not a loopback or link-local address: {why}; set `allowNonLocalListen: true` to allow it"
                ),
            );
        }
    }
}

fn check_peers(ctx: &mut Ctx, c: &Config) {
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    for peer in &c.meshd.peers {
        if !names.insert(peer.name.as_str()) {
            push(
                ctx,
                c,
                "meshd.peers",
                IssueKind::Value,
                format!("peer name `{}` appears twice", peer.name),
            );
        }
        if !keys.insert(peer.public_key) {
            push(
                ctx,
                c,
                "meshd.peers",
                IssueKind::Value,
                format!("public key of `{}` appears twice", peer.name),
            );
        }
    }
}

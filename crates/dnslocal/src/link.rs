//! The dummy link that holds the listen addresses (`interface.create`), through `ip` (iproute2).
//!
//! Only what this instance created is removed on exit, and nothing while another instance still serves the
//! addresses (a restart overlaps the old and the new instance).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;

use crate::Error;

/// What [`Link::setup`] created.
#[derive(Debug, Default)]
pub struct Link {
    name: String,
    created_link: bool,
    added: Vec<IpAddr>,
}

fn ip(args: &[&str]) -> Result<String, Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::Link(format!("cannot run ip {}: {e}", args.join(" "))))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Link(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether `addr` is assigned to any link in this namespace.
fn assigned(addr: IpAddr) -> Result<bool, Error> {
    let family = if addr.is_ipv4() { "-4" } else { "-6" };
    let out = ip(&[family, "-o", "addr", "show"])?;
    let needle = format!(" {addr}/");
    Ok(out.lines().any(|l| l.contains(&needle)))
}

/// Creates `name` as a dummy link; on kernels without dummy links (`CONFIG_DUMMY` unset), as an empty
/// bridge, which holds addresses just as well.
fn create(name: &str) -> Result<&'static str, Error> {
    match ip(&["link", "add", name, "type", "dummy"]) {
        Ok(_) => Ok("dummy"),
        Err(Error::Link(e)) if e.contains("Unknown device type") => {
            tracing::warn!(
                link = name,
                "this kernel has no dummy links: using an empty bridge instead"
            );
            ip(&["link", "add", name, "type", "bridge"])?;
            Ok("bridge")
        }
        Err(e) => Err(e),
    }
}

impl Link {
    /// Creates link `name` (type dummy) unless it exists, brings it up, and adds each listen address that
    /// is not assigned anywhere yet (as a host route: /32 or /128).
    pub fn setup(name: &str, listen: &[SocketAddr]) -> Result<Link, Error> {
        let mut link = Link {
            name: name.to_owned(),
            ..Link::default()
        };
        match ip(&["-d", "link", "show", "dev", name]) {
            // A dummy link of our configured name is dnslocal's (an earlier instance made it): adopt it.
            Ok(details) => {
                link.created_link = details.contains("dummy") || details.contains("bridge_id")
            }
            Err(_) => {
                let kind = create(name)?;
                link.created_link = true;
                tracing::info!(
                    link = name,
                    kind,
                    "created the link for the listen addresses"
                );
            }
        }
        ip(&["link", "set", name, "up"])?;
        let mut ips: Vec<IpAddr> = listen
            .iter()
            .map(SocketAddr::ip)
            .filter(|a| !a.is_unspecified() && !a.is_loopback())
            .collect();
        ips.dedup();
        for addr in ips {
            if assigned(addr)? {
                continue;
            }
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            let cidr = format!("{addr}/{prefix}");
            let mut args = vec!["addr", "add", &cidr, "dev", name];
            if addr.is_ipv6() {
                args.push("nodad");
            }
            ip(&args)?;
            tracing::info!(link = name, %addr, "added listen address");
            link.added.push(addr);
        }
        Ok(link)
    }

    /// Removes what [`Link::setup`] created, unless another process still serves one of `listen` (then
    /// the addresses stay for it).
    pub fn teardown(self, listen: &[SocketAddr]) {
        if self.added.is_empty() && !self.created_link {
            return;
        }
        // A plain bind (no SO_REUSEPORT) fails while another instance holds the port.
        if let Some(busy) = listen.iter().find(|a| UdpSocket::bind(a).is_err()) {
            tracing::info!(%busy, "another instance serves the listen addresses: leaving the link as it is");
            return;
        }
        for addr in &self.added {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            if let Err(error) = ip(&[
                "addr",
                "del",
                &format!("{addr}/{prefix}"),
                "dev",
                &self.name,
            ]) {
                tracing::warn!(%error, "cannot remove a listen address");
            }
        }
        if self.created_link {
            if let Err(error) = ip(&["link", "del", &self.name]) {
                tracing::warn!(%error, "cannot remove the dummy link");
            } else {
                tracing::info!(link = %self.name, "removed the dummy link");
            }
        }
    }
}

//! The link that holds the listen addresses (`interface.create`), over rtnetlink.
//!
//! A dummy link, or an empty bridge on kernels built without dummy links (`CONFIG_DUMMY` unset): both hold
//! local addresses just as well. dnslocal marks the link it creates with the alias [`OWNER_MARK`]
//! (`IFLA_IFALIAS`); a link of the configured name with that mark is dnslocal's (an earlier instance made
//! it) and is adopted. Any other link of that name (a `cni0`, an administrator's dummy) is someone else's:
//! dnslocal neither adds addresses to it nor deletes it, and fails naming it. Only what dnslocal made is
//! removed on exit, and nothing while another instance still serves the addresses (a restart overlaps the
//! old and the new instance).

use std::net::{IpAddr, SocketAddr, UdpSocket};

use futures_util::TryStreamExt as _;
use hybridnet_nft::netlink_errno;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkDummy, LinkUnspec};

use crate::Error;

/// The alias dnslocal puts on the link it creates.
pub const OWNER_MARK: &str = "hybridnet-dnslocal";

fn alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(s) => Some(s.as_str()),
        _ => None,
    })
}

fn nl(what: &'static str) -> impl Fn(rtnetlink::Error) -> Error {
    move |e| Error::Link(format!("{what}: {e}"))
}

/// What [`Link::setup`] owns.
#[derive(Debug)]
pub struct Link {
    handle: Handle,
    name: String,
    index: u32,
    owned_link: bool,
    added: Vec<IpAddr>,
}

fn kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}

async fn get_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl("get link")(e)),
    }
}

/// Creates `name` as a dummy link, or as an empty bridge where the kernel has no dummy links.
async fn create(handle: &Handle, name: &str) -> Result<&'static str, Error> {
    match handle
        .link()
        .add(LinkDummy::new(name).build())
        .execute()
        .await
    {
        Ok(()) => Ok("dummy"),
        Err(e) if netlink_errno(&e) == Some(libc::EOPNOTSUPP) => {
            tracing::warn!(
                link = name,
                "this kernel has no dummy links: using an empty bridge instead"
            );
            handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(nl("add bridge link"))?;
            Ok("bridge")
        }
        Err(e) => Err(nl("add dummy link")(e)),
    }
}

async fn assigned(handle: &Handle) -> Result<Vec<IpAddr>, Error> {
    let mut out = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(nl("get addresses"))? {
        out.extend(address_of(&msg));
    }
    Ok(out)
}

impl Link {
    /// Creates (or adopts) link `name`, brings it up, and adds each listen address that is not assigned
    /// anywhere yet, as a host address (/32, /128 without duplicate address detection).
    pub async fn setup(name: &str, listen: &[SocketAddr]) -> Result<Link, Error> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::Link(format!("netlink: {e}")))?;
        tokio::spawn(conn);
        let owned_link = match get_link(&handle, name).await? {
            Some(link) if alias(&link) == Some(OWNER_MARK) => true,
            Some(link) => {
                return Err(Error::Link(format!(
                    "link {name} (index {}, kind {}) exists but dnslocal did not create it (dnslocal marks \
                     its links with the alias \"{OWNER_MARK}\"): dnslocal leaves it alone; remove it or set \
                     another `interface.name`",
                    link.header.index,
                    kind(&link).map_or_else(|| "none".to_owned(), ToString::to_string),
                )));
            }
            None => {
                let kind = create(&handle, name).await?;
                tracing::info!(
                    link = name,
                    kind,
                    "created the link for the listen addresses"
                );
                true
            }
        };
        let index = get_link(&handle, name)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| Error::Link(format!("link {name} vanished")))?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .alias(OWNER_MARK)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("set link up"))?;
        let mut link = Link {
            handle,
            name: name.to_owned(),
            index,
            owned_link,
            added: Vec::new(),
        };
        link.add(listen).await?;
        Ok(link)
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds each listen address that is not assigned anywhere yet, as a host address (/32, /128 without
    /// duplicate address detection).
    pub async fn add(&mut self, listen: &[SocketAddr]) -> Result<(), Error> {
        let have = assigned(&self.handle).await?;
        let mut ips: Vec<IpAddr> = listen
            .iter()
            .map(SocketAddr::ip)
            .filter(|a| !a.is_unspecified() && !a.is_loopback() && !have.contains(a))
            .collect();
        ips.sort();
        ips.dedup();
        for addr in ips {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            let mut req = self.handle.address().add(self.index, addr, prefix);
            if addr.is_ipv6() {
                req.message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            match req.execute().await {
                Ok(()) => {
                    tracing::info!(link = %self.name, %addr, "added listen address");
                    self.added.push(addr);
                }
                Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(nl("add address")(e)),
            }
        }
        Ok(())
    }

    /// The link's addresses for which `keep` holds (as the kernel reports them, ready to delete).
    async fn addresses(&self, keep: impl Fn(IpAddr) -> bool) -> Vec<AddressMessage> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute();
        let mut found = Vec::new();
        while let Ok(Some(msg)) = stream.try_next().await {
            if address_of(&msg).is_some_and(&keep) {
                found.push(msg);
            }
        }
        found
    }

    /// Removes the addresses of `gone` (listen addresses no longer configured) from the link: any of them on a
    /// link of dnslocal's own, only those it added on another.
    pub async fn remove(&mut self, gone: &[IpAddr]) {
        let doomed = self
            .addresses(|a| gone.contains(&a) && (self.owned_link || self.added.contains(&a)))
            .await;
        for msg in doomed {
            let addr = address_of(&msg);
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {
                    tracing::info!(link = %self.name, ?addr, "removed a listen address no longer configured")
                }
                Err(error) => tracing::warn!(%error, ?addr, "cannot remove a listen address"),
            }
        }
        self.added.retain(|a| !gone.contains(a));
    }

    /// Removes what [`Link::setup`] made, unless another process still serves one of `listen` (then it all
    /// stays for that process).
    pub async fn teardown(self, listen: &[SocketAddr]) {
        if self.added.is_empty() && !self.owned_link {
            return;
        }
        // A plain bind (no SO_REUSEPORT) fails while another instance holds the port.
        if let Some(busy) = listen.iter().find(|a| UdpSocket::bind(a).is_err()) {
            tracing::info!(%busy, "another instance serves the listen addresses: leaving the link as it is");
            return;
        }
        if self.owned_link {
            match self.handle.link().del(self.index).execute().await {
                Ok(()) => tracing::info!(link = %self.name, "removed the link"),
                Err(error) => tracing::warn!(%error, "cannot remove the link"),
            }
            return;
        }
        for msg in self.addresses(|a| self.added.contains(&a)).await {
            if let Err(error) = self.handle.address().del(msg).execute().await {
                tracing::warn!(%error, "cannot remove a listen address");
            }
        }
    }
}

//! The two WireGuard backends behind one interface, and how each is opened.

use hybridnet_config::Backend as BackendChoice;

use super::{Error, Kernel, Net, Userspace};
use crate::net;
use crate::wg::{self, Actual};

/// One of the two backends.
#[derive(Debug)]
pub enum Backend {
    Userspace(Box<Userspace>),
    Kernel(Kernel),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Userspace(_) => "userspace",
            Backend::Kernel(_) => "kernel",
        }
    }

    pub(super) async fn get(&mut self) -> Result<Actual, Error> {
        match self {
            Backend::Userspace(u) => u.get(),
            Backend::Kernel(k) => k.get().await,
        }
    }

    pub(super) async fn apply(&mut self, update: &wg::Update) -> Result<(), Error> {
        match self {
            Backend::Userspace(u) => u.apply(update),
            Backend::Kernel(k) => k.apply(update).await,
        }
    }
}

/// Opens the backend `choice` on link `name`: creates the link and marks it ([`net::OWNER_MARK`]), or
/// adopts a kernel WireGuard link meshd created earlier (a restart after a crash). A link of that name
/// without meshd's mark is someone else's: it is left alone and the start fails naming it.
pub(super) async fn open(
    net: &Net,
    name: &str,
    choice: BackendChoice,
) -> Result<(Backend, u32), Error> {
    let existing = net.link(name).await?;
    if let Some(link) = &existing
        && !link.ours()
    {
        return Err(foreign(name, link));
    }
    let existing = existing.map(|l| l.index);
    match choice {
        BackendChoice::Kernel => open_kernel(net, name, existing).await,
        BackendChoice::Userspace => open_userspace(net, name, existing).await,
        BackendChoice::Auto if wg::kernel::available() || existing.is_some() => {
            match open_kernel(net, name, existing).await {
                Ok(opened) => Ok(opened),
                Err(error) if existing.is_none() => {
                    tracing::warn!(%error, "kernel WireGuard unusable; using the userspace backend");
                    open_userspace(net, name, None).await
                }
                Err(error) => Err(error),
            }
        }
        BackendChoice::Auto => open_userspace(net, name, existing).await,
    }
}

/// The error for a link of our name that meshd did not create.
pub(super) fn foreign(name: &str, link: &net::LinkState) -> Error {
    Error::Foreign(format!(
        "interface {name} (index {}, kind {}, alias {}) exists but meshd did not create it (meshd marks \
         its links with the alias \"{}\"): meshd leaves it alone; remove it or set another \
         `meshd.interface`",
        link.index,
        link.kind.as_deref().unwrap_or("none"),
        link.alias.as_deref().unwrap_or("none"),
        net::OWNER_MARK,
    ))
}

/// Re-creates the link of a running backend after it was deleted from outside: a new kernel WireGuard
/// link (the generic netlink handle addresses it by name), or a new userspace device. Returns the new
/// index; the device starts empty and the next diff configures it in full.
pub(super) async fn recreate(net: &Net, name: &str, backend: &mut Backend) -> Result<u32, Error> {
    match backend {
        Backend::Kernel(_) => {
            let (_, index) = open_kernel(net, name, None).await?;
            Ok(index)
        }
        Backend::Userspace(_) => {
            let (fresh, index) = open_userspace(net, name, None).await?;
            // The old device's TUN is gone; dropping it stops its threads.
            drop(std::mem::replace(backend, fresh));
            Ok(index)
        }
    }
}

/// Creates (or adopts) the kernel WireGuard link `name`.
pub(super) async fn open_kernel(
    net: &Net,
    name: &str,
    existing: Option<u32>,
) -> Result<(Backend, u32), Error> {
    let index = match existing {
        Some(i) => {
            tracing::info!(interface = %name, "adopting the existing WireGuard link");
            i
        }
        None => {
            net.add_wireguard(name).await?;
            let index = net
                .link_index(name)
                .await?
                .ok_or_else(|| Error::Netlink("the new WireGuard link vanished".into()))?;
            net.mark(index).await?;
            index
        }
    };
    Ok((Backend::Kernel(Kernel::connect(name)?), index))
}

/// Starts the embedded userspace device on a new TUN device `name`.
pub(super) async fn open_userspace(
    net: &Net,
    name: &str,
    existing: Option<u32>,
) -> Result<(Backend, u32), Error> {
    if existing.is_some() {
        return Err(Error::Backend(format!(
            "interface {name} already exists; the userspace backend creates its own TUN device \
             (remove the link, or choose another `meshd.interface`)"
        )));
    }
    let u = Userspace::create(name, 2)?;
    let index = net
        .link_index(name)
        .await?
        .ok_or_else(|| Error::Netlink("the TUN device vanished".into()))?;
    net.mark(index).await?;
    Ok((Backend::Userspace(Box::new(u)), index))
}

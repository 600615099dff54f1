//! The two WireGuard backends behind one interface, and how each is opened.

use super::{Error, Kernel, Net, Userspace};
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
            net.link_index(name)
                .await?
                .ok_or_else(|| Error::Netlink("the new WireGuard link vanished".into()))?
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
    Ok((Backend::Userspace(Box::new(u)), index))
}

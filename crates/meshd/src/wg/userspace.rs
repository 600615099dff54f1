//! The embedded userspace backend: boringtun's device (its own threads, a multi-queue TUN device),
//! configured over the WireGuard UAPI text protocol like any userspace WireGuard.
//!
//! The API is served on a private socket pair (boringtun's `uapi_fd`), not on
//! `/var/run/wireguard/<iface>.sock`: nothing on the filesystem can collide between nodes that share it
//! (network namespaces, containers), boringtun installs no SIGINT/SIGTERM handlers of its own (it does in
//! socket mode), and the device stops when meshd closes its end (also when meshd dies: the TUN device,
//! its routes and its addresses go with it). The price: `wg show` cannot see the device; `meshd status`
//! shows the same peer table.

use std::io::BufReader;
use std::os::fd::IntoRawFd as _;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use boringtun::device::{DeviceConfig, DeviceHandle};

use super::uapi;
use super::{Actual, Update};
use crate::Error;

/// A running boringtun device and our end of its API stream.
pub struct Userspace {
    name: String,
    api: BufReader<UnixStream>,
    // Dropped after `api` (fields drop in order): closing the stream first makes the device exit.
    _device: DeviceHandle,
}

impl std::fmt::Debug for Userspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userspace")
            .field("name", &self.name)
            .finish()
    }
}

impl Userspace {
    /// Creates the TUN device `name` and starts boringtun on it.
    pub fn create(name: &str, threads: usize) -> Result<Userspace, Error> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| Error::Backend(format!("socketpair: {e}")))?;
        ours.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| Error::Backend(e.to_string()))?;
        let config = DeviceConfig {
            n_threads: threads.max(1),
            use_connected_socket: false,
            use_multi_queue: true,
            uapi_fd: theirs.into_raw_fd(),
        };
        let device = DeviceHandle::new(name, config).map_err(|e| {
            Error::Backend(format!("cannot start the userspace device {name}: {e}"))
        })?;
        Ok(Userspace {
            name: name.to_owned(),
            api: BufReader::new(ours),
            _device: device,
        })
    }

    pub fn get(&mut self) -> Result<Actual, Error> {
        // The answer holds the private key: zeroed once parsed.
        let text = zeroize::Zeroizing::new(
            uapi::exchange(&mut self.api, uapi::GET)
                .map_err(|e| Error::Backend(format!("{} get: {e}", self.name)))?,
        );
        uapi::parse_get(&text).map_err(|e| Error::Backend(format!("{} get: {e}", self.name)))
    }

    pub fn apply(&mut self, update: &Update) -> Result<(), Error> {
        for body in uapi::render_set(update) {
            let body = zeroize::Zeroizing::new(body);
            uapi::exchange(&mut self.api, &body)
                .map_err(|e| Error::Backend(format!("{} set: {e}", self.name)))?;
        }
        Ok(())
    }
}

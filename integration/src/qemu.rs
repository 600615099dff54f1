//! QEMU node tests: boot Debian's kernel with a small initramfs (busybox-static, the kernel modules a test
//! needs, our static binaries, an `/init` script), several VMs on one QEMU socket network, and read what
//! they print on their serial console.
//!
//! No KVM here: QEMU runs with TCG (`-cpu max`, so the x86 crypto modules WireGuard depends on load). The
//! initramfs is built by `hack/qemu/build-initramfs.sh`. Everything that is missing makes the test fail
//! with the package to install (never skip): qemu-system-x86, linux-image-amd64, busybox-static, kmod,
//! cpio.
//!
//! ```no_run
//! use hybridnet_integration::qemu::{Kernel, Vm};
//! let kernel = Kernel::find();
//! # let overlay = std::path::Path::new("/tmp/overlay");
//! let initrd = kernel.initramfs(std::path::Path::new("/tmp/initrd.gz"), overlay, &["wireguard", "virtio_net", "virtio_pci"]);
//! let port = hybridnet_integration::qemu::free_port();
//! let a = Vm::builder(&kernel, &initrd, "/tmp/a.console").append("hn.node=1").listen(port, 1).start();
//! let b = Vm::builder(&kernel, &initrd, "/tmp/b.console").append("hn.node=2").connect(port, 2).start();
//! a.wait_for("HN-RESULT", std::time::Duration::from_secs(120)).unwrap();
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Timeout, wait_until};

/// A kernel image and its version (for its modules).
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub version: String,
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Panics unless every tool the QEMU tests need is installed, naming the Debian packages.
pub fn require_tools() {
    let mut missing = Vec::new();
    for (cmd, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("modprobe", "kmod"),
        ("cpio", "cpio"),
        ("gzip", "gzip"),
    ] {
        if !have(cmd) {
            missing.push(pkg);
        }
    }
    if !missing.is_empty() {
        panic!(
            "QEMU tests need these Debian packages: apt-get install -y --no-install-recommends {} linux-image-amd64",
            missing.join(" ")
        );
    }
}

impl Kernel {
    /// The newest `/boot/vmlinuz-*` with modules in `/lib/modules` (`$HYBRIDNET_QEMU_KERNEL` overrides the
    /// image; its version is taken from the file name). Panics when there is none.
    pub fn find() -> Kernel {
        require_tools();
        let from_env = std::env::var_os("HYBRIDNET_QEMU_KERNEL").map(PathBuf::from);
        let mut images: Vec<PathBuf> = match from_env {
            Some(p) => vec![p],
            None => std::fs::read_dir("/boot")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| {
                            p.file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        images.sort();
        for image in images.into_iter().rev() {
            let name = image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let version = name.trim_start_matches("vmlinuz-").to_owned();
            if Path::new("/lib/modules").join(&version).is_dir() {
                return Kernel { image, version };
            }
        }
        panic!(
            "no kernel for the QEMU tests: install one with its modules (apt-get install -y linux-image-amd64) \
             or set HYBRIDNET_QEMU_KERNEL=/boot/vmlinuz-<version>"
        );
    }

    /// Builds `out` from `overlay` (which must hold an executable `init`) and the modules `modules` need.
    pub fn initramfs(&self, out: &Path, overlay: &Path, modules: &[&str]) -> PathBuf {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/qemu/build-initramfs.sh");
        let output = Command::new("sh")
            .arg(&script)
            .arg(out)
            .arg(&self.version)
            .arg(overlay)
            .args(modules)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        if !output.status.success() {
            panic!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        out.to_owned()
    }
}

/// A free TCP port on 127.0.0.1 (for a QEMU socket network).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

/// How a [`Vm`] starts.
#[derive(Debug)]
pub struct VmBuilder {
    kernel: Kernel,
    initrd: PathBuf,
    console: PathBuf,
    append: String,
    netdevs: Vec<String>,
    memory_mb: u32,
    netns: Option<String>,
}

impl VmBuilder {
    /// Extra kernel command line (after `console=ttyS0 panic=-1 quiet`).
    pub fn append(mut self, args: &str) -> Self {
        self.append.push(' ');
        self.append.push_str(args);
        self
    }

    /// A NIC on a socket network that listens on `127.0.0.1:port` (start this VM first). `mac_last` is the
    /// last byte of its MAC (52:54:00:12:34:xx).
    pub fn listen(mut self, port: u16, mac_last: u8) -> Self {
        self.netdevs
            .push(format!("socket,listen=127.0.0.1:{port}|{mac_last}"));
        self
    }

    /// A NIC on the socket network another VM listens on.
    pub fn connect(mut self, port: u16, mac_last: u8) -> Self {
        self.netdevs
            .push(format!("socket,connect=127.0.0.1:{port}|{mac_last}"));
        self
    }

    /// A NIC on QEMU's user-mode network (slirp): the guest is 10.0.2.15/24 by convention, and reaches the
    /// loopback of the namespace QEMU runs in (see [`VmBuilder::netns`]) at 10.0.2.2 and its resolver at
    /// 10.0.2.3.
    pub fn user_net(mut self, mac_last: u8) -> Self {
        self.netdevs.push(format!("user|{mac_last}"));
        self
    }

    /// Runs QEMU inside this network namespace (`ip netns exec`), so a user-mode network's 10.0.2.2 is that
    /// namespace's loopback, never the host's.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    pub fn memory(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }

    pub fn start(self) -> Vm {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
        ])
        .args(["-m", &self.memory_mb.to_string()])
        .arg("-kernel")
        .arg(&self.kernel.image)
        .arg("-initrd")
        .arg(&self.initrd)
        .args([
            "-append",
            &format!("console=ttyS0 panic=-1 quiet{}", self.append),
        ])
        .arg("-serial")
        .arg(format!("file:{}", self.console.display()))
        .args(["-monitor", "none"]);
        for (i, nd) in self.netdevs.iter().enumerate() {
            let (spec, mac) = nd.split_once('|').unwrap_or((nd, "1"));
            let mac: u8 = mac.parse().unwrap_or(1);
            cmd.args(["-netdev", &format!("{spec},id=n{i}")]).args([
                "-device",
                &format!("virtio-net-pci,netdev=n{i},mac=52:54:00:12:34:{mac:02x}"),
            ]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));
        Vm {
            child,
            console: self.console,
        }
    }
}

/// A running VM; killed on drop (its console is printed when the test failed).
#[derive(Debug)]
pub struct Vm {
    child: Child,
    console: PathBuf,
}

impl Vm {
    pub fn builder(kernel: &Kernel, initrd: &Path, console: impl Into<PathBuf>) -> VmBuilder {
        VmBuilder {
            kernel: kernel.clone(),
            initrd: initrd.to_owned(),
            console: console.into(),
            append: String::new(),
            netdevs: Vec::new(),
            memory_mb: 512,
            netns: None,
        }
    }

    /// What the VM printed on its serial console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until a console line contains `needle`; returns that line.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, Timeout> {
        wait_until(
            timeout,
            format!("the VM console to show {needle:?}"),
            || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Ok(Err(format!(
                        "qemu exited ({status}); console:\n{}",
                        self.console()
                    )));
                }
                self.console()
                    .lines()
                    .find(|l| l.contains(needle))
                    .map(|l| Ok(l.to_owned()))
                    .ok_or_else(|| "not yet".to_owned())
            },
        )?
        .map_err(|last| Timeout {
            what: format!("the VM console to show {needle:?}"),
            waited: timeout,
            last,
            gave_up: true,
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- console {} ---\n{}",
                self.console.display(),
                self.console()
            );
        }
    }
}

//! Network namespaces and the multi-node "lab network" built from them.

use std::ffi::OsStr;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

use crate::root::{ip, require_root};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace named `hn-<pid>-<n>` with loopback up; deleted on drop.
///
/// Processes still running in it keep the namespace alive until they exit, so drop the [`crate::Daemon`]s
/// first (declare the `Netns` before them: locals drop in reverse order).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace; panics (after [`require_root`]) if that fails.
    pub fn new() -> Netns {
        require_root();
        let name = format!(
            "hn-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(error) = ip(&["netns", "add", &name]) {
            panic!("cannot create network namespace {name}: {error}");
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`; panics with the command and its stderr if it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        if let Err(error) = ip(&full) {
            panic!("{error}");
        }
    }

    /// Adds link `lab0` holding `192.0.2.10/24` and `2001:db8::10/64`, so a lone namespace routes the lab
    /// segment (a daemon can connect sockets to 192.0.2.x) while nothing leaves it. `lab0` is one end of a
    /// veth pair whose other end (`lab0peer`, no address) stays in the namespace; a veth, because this
    /// kernel may have no `dummy` link type.
    pub fn add_lab_link(&self) {
        self.ip(&[
            "link", "add", "lab0", "type", "veth", "peer", "name", "lab0peer",
        ]);
        self.ip(&["addr", "add", "192.0.2.10/24", "dev", "lab0"]);
        self.ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8::10/64",
            "dev",
            "lab0",
            "nodad",
        ]);
        self.ip(&["link", "set", "lab0peer", "up"]);
        self.ip(&["link", "set", "lab0", "up"]);
    }

    /// A command that runs `program` in this namespace (`ip netns exec NAME program ...`). `ip netns exec`
    /// execs the program, so the child's pid is the program's pid. It also gives the program its own mount
    /// namespace (with `/sys` for this network namespace).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args[0] args[1..]` in the namespace and waits; panics if it cannot be started.
    pub fn exec(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("exec needs a program");
        self.command(program)
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    /// Runs `nft -f -` with `rules` in the namespace; panics (naming the rules) when nft refuses them.
    pub fn nft(&self, rules: &str) {
        use std::io::Write as _;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("nft: {e}"));
        if let Some(stdin) = child.stdin.as_mut() {
            stdin
                .write_all(rules.as_bytes())
                .unwrap_or_else(|e| panic!("writing to nft in {}: {e}", self.name));
        }
        let status = child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for nft in {}: {e}", self.name));
        assert!(status.success(), "nft -f failed on:\n{rules}");
    }

    /// Starts `args` in the namespace without waiting (stdio inherited unless the caller builds the command
    /// with [`Netns::command`] instead).
    pub fn spawn(&self, args: &[&str]) -> Child {
        let (program, rest) = args.split_first().expect("spawn needs a program");
        self.command(program)
            .args(rest)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} in {}: {e}", self.name))
    }

    /// Runs `f` on a new thread that has entered this namespace, so the sockets `f` opens live there.
    /// Only the network namespace changes (the filesystem is shared).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
        enter_named(&self.name, f)
    }

    /// Plugs `node` into `bridge` (a bridge in this namespace): a veth pair, `port` here as a bridge port,
    /// `name` in `node` holding `cidr` (IPv4), both ends up.
    pub fn plug(&self, bridge: &str, port: &str, node: &Netns, name: &str, cidr: &str) {
        self.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            name,
            "netns",
            node.name(),
        ]);
        self.ip(&["link", "set", port, "master", bridge, "up"]);
        node.ip(&["addr", "add", cidr, "dev", name]);
        node.ip(&["link", "set", name, "up"]);
    }

    /// A non-blocking TCP listener on `addr` inside the namespace (SO_REUSEADDR, backlog 128), for the
    /// stand-in servers.
    pub fn tcp_listener(
        &self,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<std::net::TcpListener> {
        self.enter(|| {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(128)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(std::net::TcpListener::from(s))
        })?
    }
}

/// [`Netns::enter`] by namespace name.
pub(crate) fn enter_named<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let handle = File::open(format!("/run/netns/{name}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {error}");
        }
    }
}

/// An IPv4 /24 and an IPv6 /64 from the documentation ranges; node `i` (from 1) gets host number `10 + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub v4: [u8; 3],
    pub v6: [u16; 4],
}

/// The three documentation segments: 192.0.2.0/24 + 2001:db8::/64 (the default), 198.51.100.0/24 +
/// 2001:db8:0:1::/64, 203.0.113.0/24 + 2001:db8:0:2::/64.
pub const SEGMENTS: [Segment; 3] = [
    Segment {
        v4: [192, 0, 2],
        v6: [0x2001, 0xdb8, 0, 0],
    },
    Segment {
        v4: [198, 51, 100],
        v6: [0x2001, 0xdb8, 0, 1],
    },
    Segment {
        v4: [203, 0, 113],
        v6: [0x2001, 0xdb8, 0, 2],
    },
];

impl Segment {
    pub fn v4_host(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.v4[0], self.v4[1], self.v4[2], host)
    }

    pub fn v6_host(&self, host: u16) -> Ipv6Addr {
        let [a, b, c, d] = self.v6;
        Ipv6Addr::new(a, b, c, d, 0, 0, 0, host)
    }
}

/// One node of a [`LabNet`]: its namespace, with `eth0` on the segment.
#[derive(Debug)]
pub struct LabNode {
    /// 1-based.
    pub index: u8,
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// Makes room for `entries` more neighbour (ARP and NDP) entries on this machine.
///
/// The kernel's neighbour tables are shared by every network namespace (`arp_tbl` and `nd_tbl` in
/// net/ipv4/arp.c and net/ipv6/ndisc.c; `gc_thresh*` are only writable from the initial namespace), and
/// the default `gc_thresh3` of 1024 is a hard cap: above it `neigh_alloc` fails ("neighbor table
/// overflow" in the kernel log) and packets to unresolved neighbours are dropped. A lab of 32 nodes on
/// two underlays needs about 2,000 entries, so without this its probes vanish in the kernel and peers
/// look down. The limits are raised (never lowered) and stay raised: they are the settings large
/// Kubernetes nodes run with, and lowering them under another running lab would break it.
pub fn ensure_neighbour_capacity(entries: usize) {
    require_root();
    // Room for what the rest of the machine holds too.
    let want = entries.saturating_add(1024);
    for family in ["ipv4", "ipv6"] {
        for (knob, value) in [
            ("gc_thresh3", want),
            ("gc_thresh2", want / 2),
            ("gc_thresh1", want / 4),
        ] {
            let path = format!("/proc/sys/net/{family}/neigh/default/{knob}");
            let now: usize = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            if now < value {
                std::fs::write(&path, value.to_string()).unwrap_or_else(|e| {
                    panic!(
                        "cannot raise {path} from {now} to {value} ({e}): a lab of this size overflows \
                         the kernel's neighbour table without it (run the test as root in the initial \
                         network namespace)"
                    )
                });
            }
        }
    }
}

/// N nodes joined by veth pairs to bridge `br0` in a "switch" namespace (nothing touches the host's
/// namespace). Node `i` has `eth0` with `<segment>.1i/24` and `<segment>::1i/64` (no DAD, usable at once).
#[derive(Debug)]
pub struct LabNet {
    // Field order is drop order: nodes first, then the switch.
    pub nodes: Vec<LabNode>,
    pub switch: Netns,
    pub segment: Segment,
}

impl LabNet {
    /// `n` nodes on the default segment (192.0.2.0/24, 2001:db8::/64).
    pub fn new(n: u8) -> LabNet {
        LabNet::on_segment(n, SEGMENTS[0])
    }

    pub fn on_segment(n: u8, segment: Segment) -> LabNet {
        assert!((1..=200).contains(&n), "a lab network has 1..=200 nodes");
        let switch = Netns::new();
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut nodes = Vec::new();
        for index in 1..=n {
            let netns = Netns::new();
            let port = format!("port{index}");
            switch.ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns.name(),
            ]);
            switch.ip(&["link", "set", &port, "master", "br0", "up"]);
            let host = 10 + index;
            let (ipv4, ipv6) = (segment.v4_host(host), segment.v6_host(u16::from(host)));
            netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"]);
            netns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ipv6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            netns.ip(&["link", "set", "eth0", "up"]);
            nodes.push(LabNode {
                index,
                netns,
                ipv4,
                ipv6,
            });
        }
        LabNet {
            nodes,
            switch,
            segment,
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

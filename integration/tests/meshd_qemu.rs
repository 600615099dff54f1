//! meshd on bare kernels in QEMU, kernel WireGuard backend: two VMs (Debian's kernel, an initramfs with
//! busybox, the WireGuard and virtio modules and our static meshd) on two QEMU socket networks ("private" and
//! "public"). Asserts that each VM's mesh interface is a kernel WireGuard link and that traffic crosses the
//! mesh both ways; that cutting the private path moves each side to the public one (in-place endpoint update);
//! that after SIGKILL the link keeps passing traffic without meshd and a new meshd adopts it (it carries
//! meshd's mark); and that a link deleted from outside comes back within one resync.
//! Fails (never skips) when QEMU, the kernel, busybox-static, kmod, cpio, wireguard-tools or the static
//! meshd binary is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hybridnet_integration::TestDir;
use hybridnet_integration::qemu::{Kernel, Vm, free_port};

/// The static (musl) meshd: `$HYBRIDNET_BIN_DIR/meshd` or the workspace's musl release build.
fn static_meshd() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("HYBRIDNET_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join("meshd"));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/x86_64-unknown-linux-musl/release/meshd"),
    );
    for c in &candidates {
        let Ok(out) = Command::new("readelf").arg("-l").arg(c).output() else {
            continue;
        };
        if out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("INTERP") {
            return c.clone();
        }
    }
    panic!(
        "no static meshd among {candidates:?}: build it with \
         `cargo build --release --target x86_64-unknown-linux-musl -p hybridnet-meshd` (needs readelf from binutils)"
    );
}

fn wg(args: &[&str], input: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = Command::new("wg")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("wg (wireguard-tools) is needed to make the VMs' keys: {e}"));
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wg: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mkdir -p /run/hybridnet /var/lib/hybridnet
for m in $(cat /lib/modules/load.list); do insmod /lib/modules/$m.ko 2>/dev/null || echo "HN-WARN insmod $m failed"; done
node=$(sed -n 's/.*hn\.node=\([0-9]*\).*/\1/p' /proc/cmdline)
other=$((3 - node))
cfg=/etc/hybridnet/node$node.yaml
ip link set lo up
ip link set eth0 up
ip link set eth1 up
ip addr add 192.0.2.1$node/24 dev eth0
ip addr add 198.51.100.1$node/24 dev eth1
cp /etc/hybridnet/node$node.key /var/lib/hybridnet/meshd.key
chmod 600 /var/lib/hybridnet/meshd.key
MESHD_LOG=info /bin/meshd run --config $cfg > /run/meshd.log 2>&1 &
pid=$!
centis() { sed 's/^\([0-9]*\)\.\([0-9]*\).*/\1\2/' /proc/uptime; }
pings() { # N: up to N tries, 0.5 s apart
  i=0
  while [ $i -lt $1 ]; do
    if ping -c 1 -W 1 10.99.0.$other > /dev/null 2>&1; then echo yes; return; fi
    i=$((i + 1)); sleep 0.5
  done
  echo no
}
uses() { /bin/meshd status --config $cfg | grep -Eq " up +direct +$1:51821 "; } # STATE PATH ENDPOINT
ok=$(pings 120)
kind=$(grep DEVTYPE /sys/class/net/hybridnet0/uevent 2>/dev/null)
echo "HN-RESULT node=$node ping=$ok $kind"
# MSS clamping: meshd's nftables table over netlink on a real distribution kernel (status reports a failure).
/bin/meshd status --config $cfg | grep -q "MSS clamping" && clamp=failed || clamp=ok
echo "HN-MSS node=$node clamp=$clamp"
# Kernel backend failover: cut the private path from this side; wait for the public one. The peer is idle
# (probed every 30 s), and traffic would not hurry it here: the local blackhole makes the kernel's sends
# fail, so its transmit counter does not move (unanswered traffic is the evidence meshd acts on at once).
# Nor does the other VM's traffic, arriving over the public path: WireGuard roams to it, and bytes received
# while the device's endpoint is not meshd's active path prove nothing about that path.
# So up to 45 s (of the VM's clock: `meshd status` is slow without KVM): the idle probe, 3 misses, the move.
t0=$(centis)
ip route add blackhole 192.0.2.1$other/32
while [ $(( $(centis) - t0 )) -lt 4500 ] && ! uses 198.51.100.1$other; do sleep 0.1; done
t1=$(centis)
uses 198.51.100.1$other && moved=yes || moved=no
echo "HN-FAILOVER node=$node moved=$moved ms=$(( (t1 - t0) * 10 )) ping=$(pings 10)"
[ $moved = yes ] || { /bin/meshd status --config $cfg; tail -n 30 /run/meshd.log; }
ops() { wget -qO- http://127.0.0.1:7447/metrics | awk '$1 == "meshd_wireguard_peer_ops_total" { print $2 }'; }
if [ "$node" = 1 ]; then
  # Identical prefixes: a ghost peer (down) claims vm2's 10.99.0.2/32 too. The kernel keeps a prefix on one
  # peer only; a plan that wanted it on both would move it on every resync (and to the ghost: no traffic).
  before=$(ops)
  sleep 25
  after=$(ops)
  echo "HN-CONFLICT node=$node conflicts=$(wget -qO- http://127.0.0.1:7447/metrics | awk '$1 == "meshd_prefix_conflicts" { print $2 }') ops=$((after - before)) ping=$(pings 10)"
  # SIGKILL: the kernel link and its peers stay, traffic goes on without meshd; a new meshd adopts them.
  kill -9 $pid
  sleep 1
  without=$(pings 4)
  MESHD_LOG=info /bin/meshd run --config $cfg >> /run/meshd.log 2>&1 &
  i=0
  while [ $i -lt 100 ] && ! uses 198.51.100.1$other; do i=$((i + 1)); sleep 0.1; done
  echo "HN-ADOPT node=$node link=$(grep -c DEVTYPE=wireguard /sys/class/net/hybridnet0/uevent) ping_without_meshd=$without ping=$(pings 10)"
  # The link deleted from outside: meshd re-creates it (marked) within one resync (10 s) and traffic passes.
  alias=$(cat /sys/class/net/hybridnet0/ifalias 2>/dev/null)
  ip link delete hybridnet0
  t0=$(centis)
  i=0
  while [ $i -lt 150 ] && ! grep -q DEVTYPE=wireguard /sys/class/net/hybridnet0/uevent 2>/dev/null; do i=$((i + 1)); sleep 0.1; done
  t1=$(centis)
  echo "HN-RECREATE node=$node alias=$alias link=$(grep -c DEVTYPE=wireguard /sys/class/net/hybridnet0/uevent 2>/dev/null) ms=$(( (t1 - t0) * 10 )) ping=$(pings 20)"
fi
/bin/meshd status --config $cfg
tail -20 /run/meshd.log
sleep 90
echo "HN-DONE node=$node"
poweroff -f
"#;

fn config(node: u8, other: u8, other_key: &str) -> String {
    // Node 1 also lists a ghost peer (never up) claiming node 2's address: identical prefixes.
    let ghost = if node == 1 {
        format!(
            "    - {{name: ghost, publicKey: \"{}\", endpoints: [\"192.0.2.99:51821\"], allowedIPs: [\"10.99.0.2/32\"]}}\n",
            hybridnet_meshd::identity::PrivateKey([7; 32]).public()
        )
    } else {
        String::new()
    };
    let doc = format!(
        "apiVersion: v1alpha1\nkind: HybridNetConfig\nstateDir: /run/hybridnet\ndataDir: /var/lib/hybridnet\n\
         meshd:\n  interface: hybridnet0\n  backend: kernel\n  listenPort: 51821\n  addresses: [\"10.99.0.{node}/32\"]\n  \
         peers:\n    - {{name: vm{other}, publicKey: \"{other_key}\", endpoints: [\"192.0.2.1{other}:51821\", \"198.51.100.1{other}:51821\"], allowedIPs: [\"10.99.0.{other}/32\"]}}\n"
    );
    format!("{doc}{ghost}")
}

#[test]
fn two_vms_mesh_over_kernel_wireguard() {
    let kernel = Kernel::find();
    let meshd = static_meshd();
    let dir = TestDir::new("meshd-qemu");
    let overlay = dir.path().join("overlay");
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| {
            let private = wg(&["genkey"], None);
            let public = wg(&["pubkey"], Some(&private));
            (private, public)
        })
        .collect();
    for (node, other) in [(1u8, 2u8), (2, 1)] {
        let etc = overlay.join("etc/hybridnet");
        std::fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            etc.join(format!("node{node}.key")),
            &keys[usize::from(node - 1)].0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            etc.join(format!("node{node}.yaml")),
            config(node, other, &keys[usize::from(other - 1)].1),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(overlay.join("init"), INIT).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(overlay.join("bin")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(&meshd, overlay.join("bin/meshd")).unwrap_or_else(|e| panic!("{e}"));
    let initrd = kernel.initramfs(
        &dir.join("initrd.gz"),
        &overlay,
        &["wireguard", "virtio_net", "virtio_pci", "nf_tables"],
    );

    let start = Instant::now();
    let (private, public) = (free_port(), free_port());
    let mut vm1 = Vm::builder(&kernel, &initrd, dir.join("vm1.console"))
        .append("hn.node=1")
        .listen(private, 1)
        .listen(public, 3)
        .start();
    std::thread::sleep(Duration::from_millis(300));
    let mut vm2 = Vm::builder(&kernel, &initrd, dir.join("vm2.console"))
        .append("hn.node=2")
        .connect(private, 2)
        .connect(public, 4)
        .start();
    let timeout = Duration::from_secs(240);
    let r1 = vm1
        .wait_for("HN-RESULT", timeout)
        .unwrap_or_else(|e| panic!("vm1: {e}"));
    let r2 = vm2
        .wait_for("HN-RESULT", timeout)
        .unwrap_or_else(|e| panic!("vm2: {e}"));
    eprintln!("{r1}\n{r2}\n(both after {:?})", start.elapsed());
    for (vm, r) in [(&vm1, &r1), (&vm2, &r2)] {
        assert!(
            r.contains("ping=yes") && r.contains("DEVTYPE=wireguard"),
            "{r}\nconsole:\n{}",
            vm.console()
        );
    }
    // MSS clamping: the nftables table meshd writes over netlink is accepted by Debian's kernel.
    for vm in [&mut vm1, &mut vm2] {
        let line = vm
            .wait_for("HN-MSS", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(line.contains("clamp=ok"), "{line}\n{}", vm.console());
    }
    // Failover on the kernel backend (endpoint updated in place), both sides.
    for vm in [&mut vm1, &mut vm2] {
        let line = vm
            .wait_for("HN-FAILOVER", Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{line}");
        assert!(
            line.contains("moved=yes") && line.contains("ping=yes"),
            "{line}\n{}",
            vm.console()
        );
    }
    // Identical prefixes on the kernel backend: one holder (the live peer), no WireGuard operation in 25 s.
    let line = vm1
        .wait_for("HN-CONFLICT", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{line}");
    assert!(
        line.contains("conflicts=1") && line.contains("ops=0 ") && line.ends_with("ping=yes"),
        "{line}\n{}",
        vm1.console()
    );
    // SIGKILL: the link stays and passes traffic without meshd; a new meshd adopts it.
    let line = vm1
        .wait_for("HN-ADOPT", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{line}");
    assert!(
        line.contains("link=1")
            && line.contains("ping_without_meshd=yes")
            && line.ends_with("ping=yes"),
        "{line}\n{}",
        vm1.console()
    );
    // The link deleted: re-created (a kernel WireGuard link with meshd's mark) and passing traffic again.
    let line = vm1
        .wait_for("HN-RECREATE", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{line}");
    assert!(
        line.contains("alias=hybridnet-meshd")
            && line.contains("link=1")
            && line.ends_with("ping=yes"),
        "{line}\n{}",
        vm1.console()
    );
}

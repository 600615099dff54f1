//! The built Talos extension on a bare kernel in QEMU (root; fails, never skips, when QEMU, the kernel,
//! busybox-static, kmod or cpio is missing, or when the binaries are not static).
//!
//! The extension tree comes from `$HYBRIDNET_EXTENSION_TAR` (a `dist/hybridnet-amd64.tar` from
//! `hack/build-image.sh`) or is staged here from `extension/` and the static musl binaries in
//! `$HYBRIDNET_BIN_DIR` (default `target/x86_64-unknown-linux-musl/release`). It must pass the validator. Its
//! `rootfs/` is laid over the initramfs root as Talos lays an extension over `/`, and `/init` starts each service
//! as Talos's extension runner would, generated from the service's spec: the container rootfs
//! `/usr/local/lib/containers/<name>` read-only, containerd's default `/proc`, `/sys` (read-only) and `/dev`,
//! the host `/etc/hosts` and `/etc/resolv.conf`, the spec's mounts in order (a missing bind source created with
//! mode 0700), the ExtensionServiceConfig files written where Talos writes them
//! (`/system/overlays/extensions/<name>/...`) and bind-mounted read-only at their `mountPath`, the spec's and the
//! document's environment, then `chroot <rootfs> <entrypoint> <args...>`. meshd and dnslocal get the
//! documents of `extension/examples/hybrid-cluster.yaml`; apiprism gets none and runs on its built-in default
//! (127.0.0.1:7455, beside Talos's KubePrism). Each must serve `/healthz` with 200 on its admin port and still be
//! running; meshd's kernel WireGuard link must exist, and dnslocal must listen on 169.254.20.10:53 on its own
//! dummy link (both made over netlink: the container has no `ip` binary).
//!
//! Run alone: `sudo -E cargo test -p hybridnet-integration --test extension` (about a minute: TCG, no KVM).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hybridnet_extension_validator::esc::{self, ExtensionServiceConfig};
use hybridnet_extension_validator::{CONTAINERS_DIR, Options, ServiceSpec, stage, validate};
use hybridnet_integration::qemu::{Kernel, Vm};
use hybridnet_integration::{TestDir, require_root};

const ADMIN: &[(&str, u16)] = &[("apiprism", 7446), ("meshd", 7447), ("dnslocal", 7448)];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_static(bin: &Path) -> bool {
    let out = Command::new("readelf")
        .arg("-l")
        .arg(bin)
        .output()
        .unwrap_or_else(|e| panic!("readelf (binutils) is needed: {e}"));
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("INTERP")
}

/// The extension tree: unpacked from `$HYBRIDNET_EXTENSION_TAR`, or staged from the static binaries.
fn extension_tree(dir: &TestDir) -> PathBuf {
    let tree = dir.path().join("tree");
    if let Some(tar) = std::env::var_os("HYBRIDNET_EXTENSION_TAR") {
        std::fs::create_dir_all(&tree).unwrap_or_else(|e| panic!("{e}"));
        run(Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&tree));
        return tree;
    }
    let bin_dir = std::env::var_os("HYBRIDNET_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/x86_64-unknown-linux-musl/release"));
    let binary = |name: &str| -> Result<PathBuf, String> {
        let p = bin_dir.join(name);
        if !p.is_file() {
            return Err(format!(
                "{} is missing: build the static binaries (`cargo build --release --target \
                 x86_64-unknown-linux-musl --bins`, as hack/test.sh does) or set HYBRIDNET_BIN_DIR or \
                 HYBRIDNET_EXTENSION_TAR",
                p.display()
            ));
        }
        if !is_static(&p) {
            return Err(format!(
                "{} is not static: the container rootfs has no libc (use the musl build)",
                p.display()
            ));
        }
        Ok(p)
    };
    stage::stage(
        &workspace().join("extension"),
        stage::MANIFEST_VERSION,
        &binary,
        &tree,
    )
    .unwrap_or_else(|e| panic!("staging the extension: {e}"));
    tree
}

/// Shell-quotes `s` for the init script.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The part of `/init` that starts one service as Talos's extension runner does.
fn service_script(spec: &ServiceSpec, esc: Option<&ExtensionServiceConfig>) -> String {
    let c = format!("/{CONTAINERS_DIR}/{}", spec.name);
    let mut s = String::new();
    let mut w = |line: String| {
        s.push_str(&line);
        s.push('\n');
    };
    w(format!("# --- ext-{} ---", spec.name));
    w(format!("c={}", q(&c)));
    // mount points first: the container rootfs turns read-only before anything is mounted on it
    w("mkdir -p $c/proc $c/sys $c/dev $c/etc".into());
    w("touch $c/etc/hosts $c/etc/resolv.conf".into());
    let mut mounts = String::new();
    for m in &spec.mounts {
        let dst = format!("$c{}", q(&m.destination));
        if m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") {
            let src = q(&m.source);
            w(format!("[ -e {src} ] || mkdir -p -m 0700 {src}"));
            w(format!(
                "if [ -d {src} ]; then mkdir -p {dst}; else mkdir -p \"$(dirname {dst})\"; touch {dst}; fi"
            ));
            let _ = writeln!(mounts, "mount --bind {src} {dst}");
            if m.options.iter().any(|o| o == "ro") {
                let _ = writeln!(mounts, "mount -o remount,bind,ro {dst}");
            }
        } else {
            w(format!("mkdir -p {dst}"));
            let opts: Vec<&str> = m
                .options
                .iter()
                .map(String::as_str)
                .filter(|o| *o != "rw")
                .collect();
            let _ = writeln!(
                mounts,
                "mount -t {} -o {} {} {dst}",
                q(&m.kind),
                q(&if opts.is_empty() {
                    "defaults".to_string()
                } else {
                    opts.join(",")
                }),
                q(&m.source)
            );
        }
    }
    if let Some(esc) = esc {
        for f in &esc.config_files {
            let host = esc.host_path(f);
            let dst = format!("$c{}", q(&f.mount_path));
            w(format!(
                "mkdir -p \"$(dirname {dst})\"; [ -e {dst} ] || touch {dst}"
            ));
            let _ = writeln!(
                mounts,
                "mount --bind {} {dst}; mount -o remount,bind,ro {dst}",
                q(&host)
            );
        }
    }
    w("mount --bind $c $c; mount -o remount,bind,ro $c".into());
    w("mount -t proc proc $c/proc".into());
    w("mount -t sysfs -o ro sysfs $c/sys".into());
    w("mount -t tmpfs -o nosuid,mode=0755 tmpfs $c/dev".into());
    w("for d in null zero full random urandom tty; do touch $c/dev/$d; mount --bind /dev/$d $c/dev/$d; done".into());
    w("mkdir -p $c/dev/net".into());
    w("for f in hosts resolv.conf; do mount --bind /etc/$f $c/etc/$f; mount -o remount,bind,ro $c/etc/$f; done".into());
    s.push_str(&mounts);
    let mut env = vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_string()];
    env.extend(spec.environment.iter().cloned());
    if let Some(esc) = esc {
        env.extend(esc.environment.iter().cloned());
    }
    let env: Vec<String> = env.iter().map(|e| q(e)).collect();
    let args: Vec<String> = spec.args.iter().map(|a| q(a)).collect();
    let mut w = |line: String| {
        s.push_str(&line);
        s.push('\n');
    };
    w(format!(
        "env -i {} chroot $c {} {} > /tmp/{}.log 2>&1 &",
        env.join(" "),
        q(&spec.entrypoint),
        args.join(" "),
        spec.name
    ));
    w(format!("echo $! > /tmp/{}.pid", spec.name));
    w(format!("echo \"HN-STARTED {} pid $!\"", spec.name));
    s
}

const INIT_HEAD: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
for m in $(cat /lib/modules/load.list); do insmod /lib/modules/$m.ko 2>/dev/null || echo "HN-WARN insmod $m failed"; done
ip link set lo up
# an uplink (a dummy link: no NIC here) so the node has a route to its resolver, as a real node has
ip link add uplink type dummy && ip addr add 192.0.2.10/24 dev uplink && ip link set uplink up
ip route add default via 192.0.2.1 dev uplink
hostname talos-node
echo "127.0.0.1 localhost talos-node" > /etc/hosts
echo "nameserver 192.0.2.53" > /etc/resolv.conf
echo "HN-BOOTED"
"#;

const INIT_TAIL: &str = r#"
# (busybox-static's wget crashes in this initramfs: plain HTTP/1.0 over nc)
http_status() { printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" | nc -w 2 127.0.0.1 "$1" 2>/dev/null | head -n 1 | tr -d '\r'; }
for s in apiprism:7446 meshd:7447 dnslocal:7448; do
  name=${s%%:*}; port=${s##*:}
  code=none; i=0
  while [ $i -lt 60 ]; do
    line=$(http_status "$port" /healthz)
    case "$line" in *" 200"*) code=200; break ;; esac
    i=$((i + 1)); sleep 1
  done
  echo "HN-HEALTH $name $code after ${i}s"
done
sleep 3
for s in apiprism:7446 meshd:7447 dnslocal:7448; do
  name=${s%%:*}; port=${s##*:}
  ready=$(http_status "$port" /readyz)
  if kill -0 "$(cat /tmp/$name.pid)" 2>/dev/null; then alive=yes; else alive=no; fi
  echo "HN-STATE $name alive=$alive readyz=[$ready]"
done
netstat -ltnu | grep -E ':(7445|7446|7447|7448|7455|53) ' | sed 's/^/HN-LISTEN /'
for l in hybridnet0 dnslocal0; do
  if [ -e /sys/class/net/$l ]; then echo "HN-LINK $l yes $(grep DEVTYPE /sys/class/net/$l/uevent)"; else echo "HN-LINK $l no"; fi
done
for name in apiprism meshd dnslocal; do echo "--- $name log"; tail -n 25 /tmp/$name.log; done
echo "HN-DONE"
# the test reads the console and stops the VM; power off only if it never does
sleep 60
poweroff -f
"#;

#[test]
fn extension_services_start_on_a_bare_kernel() {
    require_root();
    let kernel = Kernel::find();
    let dir = TestDir::new("extension-qemu");
    let tree = extension_tree(&dir);
    let report = validate(&tree, &Options::hybridnet())
        .unwrap_or_else(|e| panic!("the extension tree is not valid: {e}"));
    assert_eq!(report.services.len(), 3, "{report:?}");

    let example =
        std::fs::read_to_string(workspace().join("extension/examples/hybrid-cluster.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
    let documents = esc::parse(&example).unwrap_or_else(|e| panic!("hybrid-cluster.yaml: {e}"));

    // the initramfs: busybox + modules (build-initramfs.sh), the extension's rootfs over /, the documents'
    // files where Talos writes them, /init
    let overlay = dir.path().join("overlay");
    std::fs::create_dir_all(&overlay).unwrap_or_else(|e| panic!("{e}"));
    run(Command::new("cp")
        .arg("-a")
        .arg(tree.join("rootfs/."))
        .arg(&overlay));
    let mut init = INIT_HEAD.to_string();
    for (_, spec) in &report.services {
        let esc = (spec.name != "apiprism")
            .then(|| documents.iter().find(|d| d.name == spec.name))
            .flatten();
        if let Some(esc) = esc {
            for f in &esc.config_files {
                let host = overlay.join(esc.host_path(f).trim_start_matches('/'));
                std::fs::create_dir_all(host.parent().unwrap_or(&overlay))
                    .unwrap_or_else(|e| panic!("{e}"));
                std::fs::write(&host, &f.content).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        init.push_str(&service_script(spec, esc));
    }
    init.push_str(INIT_TAIL);
    std::fs::write(overlay.join("init"), &init).unwrap_or_else(|e| panic!("{e}"));
    let initrd = kernel.initramfs(
        &dir.join("initrd.gz"),
        &overlay,
        &["wireguard", "dummy", "tun"],
    );

    let start = Instant::now();
    let mut vm = Vm::builder(&kernel, &initrd, dir.join("vm.console"))
        .memory(768)
        .start();
    vm.wait_for("HN-DONE", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\ninit:\n{init}"));
    let console = vm.console();
    eprintln!("(VM done after {:?})", start.elapsed());
    let line = |prefix: &str| -> String {
        console
            .lines()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line on the console:\n{console}"))
            .to_string()
    };
    for (name, _) in ADMIN {
        let health = line(&format!("HN-HEALTH {name} "));
        assert!(health.contains(" 200 "), "{health}\nconsole:\n{console}");
        let state = line(&format!("HN-STATE {name} "));
        assert!(state.contains("alive=yes"), "{state}\nconsole:\n{console}");
    }
    for (name, port) in ADMIN {
        assert!(
            console
                .lines()
                .any(|l| l.contains("HN-LISTEN") && l.contains(&format!("127.0.0.1:{port} "))),
            "{name}'s admin port {port} is not listening:\n{console}"
        );
    }
    // apiprism on its built-in default, beside Talos's KubePrism port
    assert!(
        console
            .lines()
            .any(|l| l.contains("HN-LISTEN") && l.contains("127.0.0.1:7455 ")),
        "apiprism does not listen on 127.0.0.1:7455:\n{console}"
    );
    let wg = line("HN-LINK hybridnet0");
    assert!(
        wg.contains("DEVTYPE=wireguard"),
        "{wg}\nconsole:\n{console}"
    );
    // dnslocal's listen address on its own dummy link, made over netlink (the container has no `ip`)
    let dummy = line("HN-LINK dnslocal0");
    assert!(dummy.contains(" yes"), "{dummy}\nconsole:\n{console}");
    assert!(
        console
            .lines()
            .any(|l| l.contains("HN-LISTEN") && l.contains("169.254.20.10:53 ")),
        "dnslocal does not listen on 169.254.20.10:53:\n{console}"
    );
    // what each service reported and the tail of its log (see them with --nocapture)
    eprintln!(
        "{}",
        console
            .lines()
            .skip_while(|l| !l.contains("HN-BOOTED"))
            .take_while(|l| !l.contains("HN-DONE"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

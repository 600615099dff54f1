//! The built Talos extension in QEMU, its three services started the way Talos's machined starts an extension
//! service (root; fails, never skips, when QEMU, the kernel, busybox-static, kmod, cpio, musl-gcc, nsd or dig
//! is missing, or when the binaries are not static).
//!
//! Talos itself cannot run here (no Docker, no talosctl, no KVM), so `/init` reproduces what machined does,
//! each step from Talos's source (siderolabs/talos v1.13.9; file and function cited where the step is made):
//!
//! | Talos behaviour | Talos source |
//! |---|---|
//! | every mount's `source` is created with `os.MkdirAll(source, 0o700)` when missing, whatever the mount type, relative to machined's working directory `/`, which is read-only; an error fails the service | `internal/app/machined/pkg/system/services/extension.go`, `Runner` |
//! | the container rootfs is re-mounted as an overlay so mount points can be made in it | `services/extension.go`, `PreFunc` (`mount.NewSystemOverlay`) |
//! | the container rootfs read-only; containerd's default mounts (`/proc`, `/dev`, `/dev/pts`, `/dev/shm`, `/sys` read-only, `/run`); `/proc/sys` and the other default read-only paths read-only | `services/extension.go`, `getOCIOptions` (`oci.WithRootFSReadonly`); containerd `pkg/oci/spec.go`, `populateDefaultUnixSpec` |
//! | the host's `/etc/hosts` and `/etc/resolv.conf` bound read-only | `internal/app/machined/pkg/system/runner/containerd/containerd.go`, `newOCISpecOpts` (`oci.WithHostHostsFile`, `oci.WithHostResolvconf`) |
//! | the spec's mounts in order, then each ExtensionServiceConfig file, written to `/system/overlays/extensions/<service>/<mountPath, '/' as '-'>`, bound read-only at its `mountPath` | `services/extension.go`, `Runner` (`constants.ExtensionServiceUserConfigPath`) |
//! | the host network and IPC namespaces; own mount, UTS and PID namespaces | `services/extension.go`, `getOCIOptions` (`oci.WithHostNamespace`) |
//! | every capability but `CAP_SYS_BOOT` and `CAP_SYS_MODULE`; no_new_privs | `getOCIOptions` (`capability.AllGrantableCapabilities`: `internal/pkg/capability/capability.go`, `constants.DefaultDroppedCapabilities`); `containerd.go`, `newOCISpecOpts` (`oci.WithNoNewPrivileges`) |
//! | `/etc/ssl/certs/ca-certificates.crt` (and `hosts`, `resolv.conf`) are empty placeholders in the image with the real file bind-mounted read-only over them | `Dockerfile` (`touch .../ssl/certs/ca-certificates.crt`); `internal/app/machined/pkg/controllers/files/etcfile.go`, `createBindMountFile` |
//! | `/system` is a tmpfs, `/var` a writable partition (here a tmpfs), `/etc/kubernetes` a directory of the image | `Dockerfile` (`mkdir -pv .../etc/kubernetes/manifests`) |
//!
//! The extension tree comes from `$HYBRIDNET_EXTENSION_TAR` (a `dist/hybridnet-amd64.tar` from
//! `hack/build-image.sh`) or is staged here from `extension/` and the static musl binaries in
//! `$HYBRIDNET_BIN_DIR`. It must pass the validator. The VM runs QEMU's user-mode network inside a test
//! namespace, whose loopback it reaches at 10.0.2.2: there a discovery-service stand-in
//! (`hybridnet_integration::discovery`, behind TLS with a test CA that is in the emulated CA bundle, as
//! discovery.talos.dev is behind a public CA), NSD (dnslocal's upstream, through QEMU's resolver 10.0.2.3) and
//! an API-server stand-in (apiprism's upstream). Asserted: each service serves `/healthz` and stays up; meshd's
//! kernel WireGuard link exists and meshd registers with the discovery service over HTTPS and gets its
//! snapshot; dnslocal answers a lookup on 169.254.20.10 with NSD's answer; a request through apiprism on
//! 127.0.0.1:7455 reaches the upstream; every service holds exactly Talos's capabilities, sees `/proc/sys`,
//! its root and its config file read-only, and meshd sees the real CA bundle (a plain `bind` of
//! `/etc/ssl/certs`, checked beside it, sees the empty placeholder); and a spec with a relative mount source
//! (`source: tmpfs`) fails to start, as on Talos.
//!
//! Run alone: `sudo -E cargo test -p hybridnet-integration --test extension` (a minute or two: TCG, no KVM).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hybridnet_extension_validator::esc::{self, ExtensionServiceConfig};
use hybridnet_extension_validator::{CONTAINERS_DIR, Options, ServiceSpec, stage, validate};
use hybridnet_integration::discovery::DiscoveryServer;
use hybridnet_integration::dnslocal::{self, NetnsResolvConf, Nsd};
use hybridnet_integration::qemu::{Kernel, Vm};
use hybridnet_integration::wait_until;
use hybridnet_integration::{Netns, TestDir, require_root};

const ADMIN: &[(&str, u16)] = &[("apiprism", 7446), ("meshd", 7447), ("dnslocal", 7448)];
/// What the guest sees of the test namespace's loopback (QEMU user networking).
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// In the test namespace: the discovery stand-in (plain HTTP/2), its TLS front, the API-server stand-in.
const DISCOVERY_PLAIN: u16 = 8080;
const DISCOVERY_TLS: u16 = 8443;
const UPSTREAM: u16 = 6443;
const UPSTREAM_BODY: &str = "hn-upstream-answer";
/// The capabilities Talos drops from every extension service (`constants.DefaultDroppedCapabilities`).
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_BOOT: u32 = 22;

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
        hybridnet_integration::stale::require_fresh(&p);
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

/// `hack/qemu/talos-exec.c`, built static with musl-gcc: chroot, Talos's capabilities, no_new_privs, exec.
fn talos_exec(dir: &TestDir) -> PathBuf {
    let out = dir.path().join("talos-exec");
    let src = workspace().join("hack/qemu/talos-exec.c");
    let status = Command::new("musl-gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("musl-gcc is needed (apt-get install musl-tools): {e}"));
    assert!(status.success(), "musl-gcc {} failed", src.display());
    out
}

/// Shell-quotes `s` for the init script.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn is_bind(m: &hybridnet_extension_validator::Mount) -> bool {
    m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind")
}

/// `start_<name>` for `/init`: machined's `Extension.Runner` and `PreFunc`, then the container, started
/// from `/hn/<name>.container.sh` in its own mount, UTS and PID namespaces.
fn runner_function(spec: &ServiceSpec) -> String {
    let c = format!("/{CONTAINERS_DIR}/{}", spec.name);
    let n = &spec.name;
    let mut s = String::new();
    let _ = writeln!(s, "# --- ext-{n} ---\nstart_{n}() {{\n  cd /");
    // service_runner.go runs PreFunc before Runner. services/extension.go, PreFunc: the container rootfs re-mounted as an overlay (mount.NewSystemOverlay),
    // so that the runtime can make mount points in it
    let _ = writeln!(
        s,
        "  mkdir -p /run/hn-overlay/{n}/upper /run/hn-overlay/{n}/work\n  \
         mount -t overlay overlay -o lowerdir={c},upperdir=/run/hn-overlay/{n}/upper,workdir=/run/hn-overlay/{n}/work {c}"
    );
    // services/extension.go, Runner: os.Stat(mount.Source); when missing, os.MkdirAll(mount.Source, 0o700),
    // for every mount whatever its type, relative to machined's working directory `/`; an error is returned,
    // the runner is never made and the service never starts.
    for m in &spec.mounts {
        let src = q(&m.source);
        let _ = writeln!(
            s,
            "  if [ ! -e {src} ] && ! mkdir -p -m 0700 {src} 2>/tmp/{n}.runner; then \
             echo \"HN-RUNNER {n} failed: $(cat /tmp/{n}.runner)\"; return 1; fi"
        );
    }
    // services/extension.go, getOCIOptions: oci.WithHostNamespace(network), oci.WithHostNamespace(ipc); the
    // mount, UTS and PID namespaces are the container's own; runc's default rootfs propagation is rslave
    let _ = writeln!(
        s,
        "  unshare -m -u -p -f --propagation slave sh /hn/{n}.container.sh > /tmp/{n}.log 2>&1 &\n  \
         echo $! > /tmp/{n}.pid\n  echo \"HN-STARTED {n} pid $!\"\n}}"
    );
    s
}

/// `/hn/<name>.container.sh`: what containerd and runc make of the OCI spec machined builds.
fn container_script(spec: &ServiceSpec, esc: Option<&ExtensionServiceConfig>) -> String {
    let c = format!("/{CONTAINERS_DIR}/{}", spec.name);
    let mut s = String::new();
    let mut w = |line: &str| {
        s.push_str(line);
        s.push('\n');
    };
    w("#!/bin/sh\nset -e");
    w(&format!("c={}", q(&c)));
    // the root becomes a mount of its own, made read-only once everything is mounted in it
    // (getOCIOptions: oci.WithRootFSReadonly)
    w("mount --bind $c $c");
    // containerd's default mounts (pkg/oci/spec.go, populateDefaultUnixSpec); runc's default devices
    w("mkdir -p $c/proc $c/dev $c/sys $c/run $c/etc");
    w("mount -t proc -o nosuid,noexec,nodev proc $c/proc");
    w("mount -t tmpfs -o nosuid,strictatime,mode=755,size=65536k tmpfs $c/dev");
    w(
        "for d in null zero full random urandom tty; do touch $c/dev/$d; mount --bind /dev/$d $c/dev/$d; done",
    );
    w("mkdir -p $c/dev/pts $c/dev/shm");
    w("mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620 devpts $c/dev/pts");
    w("mount -t tmpfs -o nosuid,noexec,nodev,mode=1777,size=65536k shm $c/dev/shm");
    w("mount -t sysfs -o ro,nosuid,noexec,nodev sysfs $c/sys");
    w("mount -t tmpfs -o nosuid,strictatime,mode=755,size=65536k tmpfs $c/run");
    // runner/containerd/containerd.go, newOCISpecOpts: oci.WithHostHostsFile, oci.WithHostResolvconf
    w(
        "for f in hosts resolv.conf; do touch $c/etc/$f; mount --bind /etc/$f $c/etc/$f; mount -o remount,bind,ro $c/etc/$f; done",
    );
    // services/extension.go, Runner: the spec's mounts in order (oci.WithMounts), then every
    // ExtensionServiceConfig file bound read-only ("ro", "bind") at its mountPath
    let mut mounts: Vec<(String, String, String, Vec<String>)> = spec
        .mounts
        .iter()
        .map(|m| {
            (
                m.source.clone(),
                m.destination.clone(),
                m.kind.clone(),
                m.options.clone(),
            )
        })
        .collect();
    if let Some(esc) = esc {
        for f in &esc.config_files {
            mounts.push((
                esc.host_path(f),
                f.mount_path.clone(),
                "bind".into(),
                vec!["ro".into(), "bind".into()],
            ));
        }
    }
    for (source, destination, kind, options) in &mounts {
        let (src, dst) = (q(source), format!("$c{}", q(destination)));
        let bind = kind == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        if bind {
            w(&format!(
                "if [ -d {src} ]; then mkdir -p {dst}; else mkdir -p \"$(dirname {dst})\"; [ -e {dst} ] || touch {dst}; fi"
            ));
            let how = if options.iter().any(|o| o == "rbind") {
                "--rbind"
            } else {
                "--bind"
            };
            w(&format!("mount {how} {src} {dst}"));
            if options.iter().any(|o| o == "ro") {
                w(&format!("mount -o remount,bind,ro {dst}"));
            }
        } else {
            let opts: Vec<&str> = options
                .iter()
                .map(String::as_str)
                .filter(|o| *o != "rw")
                .collect();
            let opts = if opts.is_empty() {
                "defaults".to_string()
            } else {
                opts.join(",")
            };
            w(&format!("mkdir -p {dst}"));
            w(&format!("mount -t {} -o {} {src} {dst}", q(kind), q(&opts)));
        }
    }
    // runc: containerd's default read-only paths (/proc/sys among them: sysctls cannot be written from an
    // extension service) and masked paths (populateDefaultUnixSpec: ReadonlyPaths, MaskedPaths)
    w(
        "for p in bus fs irq sys sysrq-trigger; do if [ -e $c/proc/$p ]; then mount --bind $c/proc/$p $c/proc/$p; mount -o remount,bind,ro $c/proc/$p; fi; done",
    );
    w(
        "for p in kcore keys timer_list; do if [ -e $c/proc/$p ]; then mount --bind /dev/null $c/proc/$p; fi; done",
    );
    w("if [ -d $c/sys/firmware ]; then mount -t tmpfs -o ro tmpfs $c/sys/firmware; fi");
    w("mount -o remount,bind,ro $c");
    let mut env = vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_string()];
    env.extend(spec.environment.iter().cloned());
    if let Some(esc) = esc {
        env.extend(esc.environment.iter().cloned());
    }
    let env: Vec<String> = env.iter().map(|e| q(e)).collect();
    let args: Vec<String> = spec.args.iter().map(|a| q(a)).collect();
    // chroot, every capability but CAP_SYS_BOOT and CAP_SYS_MODULE, no_new_privs: hack/qemu/talos-exec.c
    w(&format!(
        "exec env -i {} /hn/talos-exec $c {} {}",
        env.join(" "),
        q(&spec.entrypoint),
        args.join(" ")
    ));
    s
}

const INIT_HEAD: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
# Talos: /system is a tmpfs; /var is the EPHEMERAL partition (here a tmpfs)
mount -t tmpfs -o mode=0755 system /system
mount -t tmpfs -o mode=0755 var /var
for m in $(cat /lib/modules/load.list); do insmod /lib/modules/$m.ko 2>/dev/null || echo "HN-WARN insmod $m failed"; done
ip link set lo up
# QEMU's user-mode network: 10.0.2.2 is the test namespace's loopback, 10.0.2.3 its resolver
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
hostname talos-node
# controllers/runtime/kernel_param_defaults.go (KernelParamDefaultsController): Talos's own defaults; and the
# IPv6 forwarding docs/talos.md asks for in machine.sysctls (a meshd gateway cannot set it: /proc/sys is
# read-only in its container)
echo 1 > /proc/sys/net/ipv4/ip_forward
echo 1 > /proc/sys/net/ipv6/conf/default/forwarding
echo 1 > /proc/sys/net/ipv6/conf/all/forwarding
# controllers/files/etcfile.go, createBindMountFile: the image's /etc files are empty placeholders (Dockerfile:
# touch .../hosts, resolv.conf, ssl/certs/ca-certificates.crt); the real content is written under /system/etc
# and bind-mounted read-only over each placeholder
mkdir -p /system/etc/ssl/certs
echo "127.0.0.1 localhost talos-node" > /system/etc/hosts
echo "nameserver 10.0.2.3" > /system/etc/resolv.conf
cat /hn/ca-bundle.pem > /system/etc/ssl/certs/ca-certificates.crt
for f in hosts resolv.conf ssl/certs/ca-certificates.crt; do
  mount --bind /system/etc/$f /etc/$f && mount -o remount,bind,ro /etc/$f || echo "HN-WARN etc file $f"
done
# ExtensionServiceConfigFilesController: the documents' files under /system/overlays/extensions/<service>/
mkdir -p /system/overlays/extensions
cp -a /hn/esc/. /system/overlays/extensions/
# machined's working directory and root: `/`, read-only (a squashfs on Talos)
cd /
mount -o remount,ro / || echo "HN-WARN cannot make / read-only"
if touch /hn-rw-probe 2>/dev/null; then echo "HN-ROOT rw"; else echo "HN-ROOT ro"; fi
echo "HN-BOOTED"
"#;

const INIT_TAIL: &str = r#"
# (busybox-static's wget crashes in this initramfs: plain HTTP/1.0 over nc)
http_status() { printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" | nc -w 2 127.0.0.1 "$1" 2>/dev/null | head -n 1 | tr -d '\r'; }
for s in apiprism:7446 meshd:7447 dnslocal:7448; do
  name=${s%%:*}; port=${s##*:}
  code=none; i=0
  while [ $i -lt 90 ]; do
    line=$(http_status "$port" /healthz)
    case "$line" in *" 200"*) code=200; break ;; esac
    i=$((i + 1)); sleep 1
  done
  echo "HN-HEALTH $name $code after ${i}s"
done
# meshd: registered with the discovery service over HTTPS and got its snapshot
i=0
while [ $i -lt 60 ]; do
  up=$(printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 7447 2>/dev/null | grep -E '^meshd_discovery_registry_up' | head -n 1)
  case "$up" in *" 1") break ;; esac
  i=$((i + 1)); sleep 1
done
printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 7447 2>/dev/null | grep -E '^meshd_discovery_(registry_up|last_update_seconds|updates_total|errors_total)' | sed 's/^/HN-DISCOVERY /'
# dnslocal answers on its address, with what its upstream (NSD, through QEMU's resolver) says
nslookup www.example.test 169.254.20.10 2>&1 | sed 's/^/HN-NSLOOKUP /'
# a request through apiprism reaches the upstream
i=0
while [ $i -lt 30 ]; do
  body=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 127.0.0.1 7455 2>/dev/null | tail -n 1)
  [ -n "$body" ] && break
  i=$((i + 1)); sleep 1
done
echo "HN-APIPRISM [$body] after ${i}s"
sleep 2
cap_last=$(cat /proc/sys/kernel/cap_last_cap)
echo "HN-CAPLAST $cap_last"
for name in apiprism meshd dnslocal; do
  if kill -0 "$(cat /tmp/$name.pid)" 2>/dev/null; then alive=yes; else alive=no; fi
  ready=$(http_status $(case $name in apiprism) echo 7446;; meshd) echo 7447;; dnslocal) echo 7448;; esac) /readyz)
  echo "HN-STATE $name alive=$alive readyz=[$ready]"
  pid=$(pidof $name | awk '{print $1}')
  if [ -z "$pid" ]; then echo "HN-PROC $name none"; continue; fi
  echo "HN-CAPS $name $(grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/$pid/status | tr -s '\t ' ' ' | tr '\n' ' ')"
  echo "HN-NETNS $name $( [ "$(readlink /proc/$pid/ns/net)" = "$(readlink /proc/1/ns/net)" ] && echo host || echo own) uts=$( [ "$(readlink /proc/$pid/ns/uts)" = "$(readlink /proc/1/ns/uts)" ] && echo host || echo own) pid=$( [ "$(readlink /proc/$pid/ns/pid)" = "$(readlink /proc/1/ns/pid)" ] && echo host || echo own)"
  awk -v n=$name '$5 == "/" || $5 == "/proc/sys" || $5 == "/usr/local/etc/hybridnet/config.yaml" { split($6, o, ","); print "HN-MOUNT " n " " $5 " " o[1] }' /proc/$pid/mountinfo
  if [ -e /proc/$pid/root/etc/ssl/certs/ca-certificates.crt ]; then
    echo "HN-CABUNDLE $name $(wc -c < /proc/$pid/root/etc/ssl/certs/ca-certificates.crt)"
  fi
done
echo "HN-FWDWARN $(grep -c 'cannot enable forwarding' /tmp/meshd.log)"
# beside it, what a plain (non-recursive) bind of /etc/ssl/certs shows: the empty placeholder
mkdir -p /run/hn-plain && mount --bind /etc/ssl/certs /run/hn-plain && echo "HN-PLAINBIND $(wc -c < /run/hn-plain/ca-certificates.crt)"
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

fn pki_error<T>(e: rcgen::Error) -> T {
    panic!("test PKI: {e}")
}

/// The test namespace's services the VM reaches at 10.0.2.2: the discovery stand-in behind TLS, and an
/// API-server stand-in answering every request with [`UPSTREAM_BODY`]. Returns the test CA (PEM).
fn start_peers(ns: &Netns) -> (DiscoveryServer, String) {
    let discovery = DiscoveryServer::start(ns, SocketAddr::from(([127, 0, 0, 1], DISCOVERY_PLAIN)));
    // a test CA and a certificate for 10.0.2.2, the address meshd dials
    let ca_key = rcgen::KeyPair::generate().unwrap_or_else(pki_error);
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(pki_error);
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hybridnet extension test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap_or_else(pki_error);
    let key = rcgen::KeyPair::generate().unwrap_or_else(pki_error);
    let mut params =
        rcgen::CertificateParams::new(vec![HOST.to_string()]).unwrap_or_else(pki_error);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).unwrap_or_else(pki_error);
    let der_key = rustls::pki_types::PrivateKeyDer::Pkcs8(
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
    );
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| panic!("{e}"))
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der_key)
    .unwrap_or_else(|e| panic!("{e}"));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let tls = ns
        .tcp_listener(SocketAddr::from(([127, 0, 0, 1], DISCOVERY_TLS)))
        .unwrap_or_else(|e| panic!("TLS front: {e}"));
    let upstream = ns
        .tcp_listener(SocketAddr::from(([127, 0, 0, 1], UPSTREAM)))
        .unwrap_or_else(|e| panic!("upstream: {e}"));
    // a thread in the namespace (its outgoing connections to 127.0.0.1 stay in it), running forever
    dnslocal::spawn_in(ns.name(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        rt.block_on(async move {
            let tls = tokio::net::TcpListener::from_std(tls).unwrap_or_else(|e| panic!("{e}"));
            let upstream =
                tokio::net::TcpListener::from_std(upstream).unwrap_or_else(|e| panic!("{e}"));
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                while let Ok((mut s, _)) = upstream.accept().await {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                        let answer = format!(
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{UPSTREAM_BODY}\n",
                            UPSTREAM_BODY.len() + 1
                        );
                        let _ = s.write_all(answer.as_bytes()).await;
                        let _ = s.shutdown().await;
                    });
                }
            });
            // TLS terminated here, HTTP/2 passed on to the stand-in as it came
            while let Ok((s, _)) = tls.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(s).await else {
                        return;
                    };
                    let Ok(mut server) = tokio::net::TcpStream::connect(SocketAddr::from((
                        [127, 0, 0, 1],
                        DISCOVERY_PLAIN,
                    )))
                    .await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
    });
    (discovery, ca.pem())
}

/// The ExtensionServiceConfig documents the VM gets: meshd's and dnslocal's from
/// `extension/examples/hybrid-cluster.yaml` (meshd's with the test's discovery service added), and one for
/// apiprism with KubePrism on (so it derives 7455) and the test's upstream.
fn documents() -> BTreeMap<String, ExtensionServiceConfig> {
    let example =
        std::fs::read_to_string(workspace().join("extension/examples/hybrid-cluster.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
    let mut docs: BTreeMap<String, ExtensionServiceConfig> = esc::parse(&example)
        .unwrap_or_else(|e| panic!("hybrid-cluster.yaml: {e}"))
        .into_iter()
        .map(|d| (d.name.clone(), d))
        .collect();
    let meshd = docs
        .get_mut("meshd")
        .unwrap_or_else(|| panic!("hybrid-cluster.yaml has no meshd document"));
    let file = meshd
        .config_files
        .first_mut()
        .unwrap_or_else(|| panic!("meshd's document has no file"));
    let _ = write!(
        file.content,
        "---\napiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: test\nendpoint: https://{HOST}:{DISCOVERY_TLS}/\n"
    );
    let apiprism = esc::parse(&format!(
        "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: apiprism\nconfigFiles:\n  \
         - mountPath: /usr/local/etc/hybridnet/config.yaml\n    content: |\n      \
         apiVersion: v1alpha1\n      kind: KubePrismConfig\n      port: 7445\n      ---\n      \
         apiVersion: v1alpha1\n      kind: HybridNetConfig\n      apiprism:\n        \
         endpoints: [\"{HOST}:{UPSTREAM}\"]\n"
    ))
    .unwrap_or_else(|e| panic!("apiprism document: {e}"));
    for d in apiprism {
        docs.insert(d.name.clone(), d);
    }
    docs
}

#[test]
fn extension_services_start_as_talos_starts_them() {
    require_root();
    dnslocal::require_tools(&["nsd", "dig"]);
    let kernel = Kernel::find();
    let dir = TestDir::new("extension-qemu");
    let tree = extension_tree(&dir);
    let report = validate(&tree, &Options::hybridnet())
        .unwrap_or_else(|e| panic!("the extension tree is not valid: {e}"));
    assert_eq!(report.services.len(), 3, "{report:?}");
    let documents = documents();

    // the test namespace: QEMU runs in it; its loopback is the VM's 10.0.2.2, its resolver (NSD) the VM's
    // 10.0.2.3 (QEMU's user-mode network forwards DNS to the resolver of the namespace it runs in)
    let ns = Netns::new();
    let _resolv = NetnsResolvConf::write(&ns, &format!("nameserver {}\n", dnslocal::NSD_ADDR));
    let _nsd = Nsd::start(&ns, &dir, 0);
    let (discovery, ca_pem) = start_peers(&ns);

    // the initramfs: busybox + modules (build-initramfs.sh), the extension's rootfs over /, Talos's image
    // placeholders, the documents' files, the runner's scripts, /init
    let overlay = dir.path().join("overlay");
    std::fs::create_dir_all(&overlay).unwrap_or_else(|e| panic!("{e}"));
    run(Command::new("cp")
        .arg("-a")
        .arg(tree.join("rootfs/."))
        .arg(&overlay));
    let put = |rel: &str, content: &[u8]| {
        let p = overlay.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(&overlay)).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    };
    // Talos's image (Dockerfile): empty placeholders, /etc/kubernetes, /system
    for f in [
        "etc/hosts",
        "etc/resolv.conf",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        put(f, b"");
    }
    for d in ["etc/kubernetes/manifests", "system", "hn/esc"] {
        std::fs::create_dir_all(overlay.join(d)).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::copy(talos_exec(&dir), overlay.join("hn/talos-exec"))
        .unwrap_or_else(|e| panic!("{e}"));
    put("hn/ca-bundle.pem", ca_pem.as_bytes());
    let mut init = INIT_HEAD.to_string();
    let mut starts = String::new();
    for (_, spec) in &report.services {
        let esc = documents.get(&spec.name);
        if let Some(esc) = esc {
            for f in &esc.config_files {
                let host = esc.host_path(f);
                let rel = host
                    .strip_prefix("/system/overlays/extensions/")
                    .unwrap_or_else(|| panic!("unexpected host path {host}"));
                put(&format!("hn/esc/{rel}"), f.content.as_bytes());
            }
        }
        put(
            &format!("hn/{}.container.sh", spec.name),
            container_script(spec, esc).as_bytes(),
        );
        init.push_str(&runner_function(spec));
        let _ = writeln!(starts, "start_{}", spec.name);
    }
    // a spec Talos accepts but cannot start: a tmpfs with a relative source (what meshd.yaml had)
    let relative = ServiceSpec::parse(
        "name: relsource\ncontainer:\n  entrypoint: /usr/local/bin/meshd\n  mounts:\n    \
         - {source: tmpfs, destination: /var/run/wireguard, type: tmpfs, options: [nosuid, nodev, mode=0700]}\n\
         restart: always\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(relative.mounts.iter().all(|m| !is_bind(m)));
    init.push_str(&runner_function(&relative));
    starts.push_str("start_relsource || echo \"HN-RELSOURCE refused\"\n");
    init.push_str(&starts);
    init.push_str(INIT_TAIL);
    put("init", init.as_bytes());
    let initrd = kernel.initramfs(
        &dir.join("initrd.gz"),
        &overlay,
        &[
            "wireguard",
            "dummy",
            "tun",
            "overlay",
            "virtio_net",
            "virtio_pci",
        ],
    );

    let start = Instant::now();
    let mut vm = Vm::builder(&kernel, &initrd, dir.join("vm.console"))
        .memory(768)
        .netns(ns.name())
        .user_net(1)
        .start();
    vm.wait_for("HN-DONE", Duration::from_secs(420))
        .unwrap_or_else(|e| panic!("{e}\ninit:\n{init}"));
    let console = vm.console();
    eprintln!("(VM done after {:?})", start.elapsed());
    let lines = |prefix: &str| -> Vec<String> {
        console
            .lines()
            .filter(|l| l.contains(prefix))
            .map(str::to_owned)
            .collect()
    };
    let line = |prefix: &str| -> String {
        lines(prefix)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no {prefix:?} line on the console:\n{console}"))
    };
    let has = |prefix: &str, needle: &str| lines(prefix).iter().any(|l| l.contains(needle));

    // machined's `/` is read-only, so a relative mount source cannot be created: the service never starts
    assert!(line("HN-ROOT ").ends_with("ro"), "console:\n{console}");
    let refused = line("HN-RUNNER relsource failed");
    assert!(
        refused.contains("Read-only file system"),
        "{refused}\nconsole:\n{console}"
    );
    assert!(has("HN-RELSOURCE", "refused"), "console:\n{console}");
    assert!(
        lines("HN-RUNNER").len() == 1,
        "only relsource may fail in the runner:\n{console}"
    );

    let cap_last: u32 = line("HN-CAPLAST ")
        .rsplit(' ')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cap_last_cap:\n{console}"));
    let talos_caps =
        ((1u64 << (cap_last + 1)) - 1) & !(1u64 << CAP_SYS_MODULE) & !(1u64 << CAP_SYS_BOOT);
    let talos_caps = format!("{talos_caps:016x}");
    for (name, port) in ADMIN {
        let health = line(&format!("HN-HEALTH {name} "));
        assert!(health.contains(" 200 "), "{health}\nconsole:\n{console}");
        let state = line(&format!("HN-STATE {name} "));
        assert!(state.contains("alive=yes"), "{state}\nconsole:\n{console}");
        assert!(
            has("HN-LISTEN", &format!("127.0.0.1:{port} ")),
            "{name}'s admin port {port} is not listening:\n{console}"
        );
        // every capability but CAP_SYS_BOOT and CAP_SYS_MODULE, no_new_privs
        let caps = line(&format!("HN-CAPS {name} "));
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert!(
                caps.contains(&format!("{set}: {talos_caps}")),
                "{name}: {set} must be {talos_caps}: {caps}\nconsole:\n{console}"
            );
        }
        assert!(caps.contains("NoNewPrivs: 1"), "{caps}");
        // the host network namespace; its own UTS and PID namespaces
        let netns = line(&format!("HN-NETNS {name} "));
        assert!(
            netns.contains(" host uts=own pid=own"),
            "{netns}\nconsole:\n{console}"
        );
        // the root, /proc/sys and the ExtensionServiceConfig file read-only
        // (mountinfo lists a path's mounts bottom up: the last one is what the service sees)
        for path in ["/", "/proc/sys", "/usr/local/etc/hybridnet/config.yaml"] {
            let top = lines(&format!("HN-MOUNT {name} {path} "));
            assert!(
                top.last()
                    .is_some_and(|l| l.trim_end().ends_with(&format!(" {path} ro"))),
                "{name}: {path} must be mounted read-only: {top:?}\nconsole:\n{console}"
            );
        }
    }

    // meshd: the real CA bundle through the rbind (a plain bind shows the empty placeholder), kernel
    // WireGuard, registered with the discovery service over HTTPS and holding a snapshot
    let bundle = line("HN-CABUNDLE meshd ");
    assert!(
        bundle.trim_end().ends_with(&format!(" {}", ca_pem.len())),
        "meshd must see the CA bundle ({} bytes): {bundle}\nconsole:\n{console}",
        ca_pem.len()
    );
    assert!(
        line("HN-PLAINBIND ").trim_end().ends_with(" 0"),
        "a plain bind of /etc/ssl/certs must show the empty placeholder:\n{console}"
    );
    // with Talos's defaults and the documented machine.sysctls, meshd needs no write to the read-only /proc/sys
    assert!(
        line("HN-FWDWARN ").trim_end().ends_with(" 0"),
        "meshd could not switch forwarding on:\n{console}"
    );
    let wg = line("HN-LINK hybridnet0");
    assert!(
        wg.contains("DEVTYPE=wireguard"),
        "{wg}\nconsole:\n{console}"
    );
    assert!(
        lines("HN-DISCOVERY meshd_discovery_registry_up")
            .iter()
            .any(|l| l.trim_end().ends_with(" 1")),
        "meshd's discovery registry is not up:\n{console}"
    );
    assert!(
        lines("HN-DISCOVERY meshd_discovery_last_update_seconds")
            .iter()
            .any(|l| !l.trim_end().ends_with(" 0")),
        "meshd got no snapshot from the discovery service:\n{console}"
    );
    // The config advertises Kubernetes networks, and this node has no Kubernetes credentials yet (as on a
    // Talos node before the kubelet's bootstrap): meshd waits for its Node's pod CIDRs at most
    // `POD_CIDR_WAIT` before it publishes, so its first AffiliateUpdate may come after the VM's checks
    // (the VM keeps running after HN-DONE).
    let published = wait_until(
        hybridnet_meshd::discovery::POD_CIDR_WAIT + Duration::from_secs(10),
        "meshd's first AffiliateUpdate and Watch at the discovery stand-in",
        || {
            let (updates, watches) = (discovery.calls("AffiliateUpdate"), discovery.calls("Watch"));
            if updates >= 1 && watches >= 1 {
                Ok(())
            } else {
                Err(format!("AffiliateUpdate {updates}, Watch {watches}"))
            }
        },
    );
    assert!(
        published.is_ok(),
        "the discovery stand-in saw no AffiliateUpdate/Watch ({published:?}):\n{console}"
    );

    // dnslocal: its address on its own dummy link (made over netlink: the container has no `ip`), and an
    // answer from its upstream through it
    let dummy = line("HN-LINK dnslocal0");
    assert!(dummy.contains(" yes"), "{dummy}\nconsole:\n{console}");
    assert!(
        has("HN-LISTEN", "169.254.20.10:53 "),
        "dnslocal does not listen on 169.254.20.10:53:\n{console}"
    );
    assert!(
        has("HN-NSLOOKUP", "192.0.2.80"),
        "no answer for www.example.test through dnslocal:\n{console}"
    );

    // apiprism: on 7455 beside Talos's KubePrism (7445), proxying to its upstream
    assert!(
        has("HN-LISTEN", "127.0.0.1:7455 "),
        "apiprism does not listen on 127.0.0.1:7455:\n{console}"
    );
    let proxied = line("HN-APIPRISM ");
    assert!(
        proxied.contains(UPSTREAM_BODY),
        "a request through apiprism did not reach the upstream: {proxied}\nconsole:\n{console}"
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

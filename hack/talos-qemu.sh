#!/usr/bin/env bash
# Boots a local Talos cluster in QEMU with the hybridnet extension and checks its three services
# (docs/talos.md). For a machine with Docker, talosctl, KVM and network access to ghcr.io:
#
#   sudo -E hack/talos-qemu.sh              build dist/hybridnet-amd64.tar, make a kernel + initramfs with it
#                                           (Talos imager), create the cluster, run the checks
#   sudo -E hack/talos-qemu.sh --no-build   reuse dist/hybridnet-amd64.tar
#   sudo -E hack/talos-qemu.sh --destroy    remove the cluster
#
# Environment: TALOS_VERSION (default v1.13.9), CLUSTER (default hybridnet), PATCH (default
# extension/examples/hybrid-cluster.yaml: the ExtensionServiceConfig documents), WORKERS (default 1).
#
# NOT RUN IN THIS PROJECT'S CI: the machine that builds hybridnet has no Docker engine, no talosctl and no
# network access to ghcr.io, so this script is written from Talos's documentation and sources
# (shared/reference/extension.md section 3) and has not been executed end to end. What CI does check offline:
# the image layout and Talos's validation rules (image/validator), and the services started from the built
# tar as Talos starts them, on a bare Debian kernel in QEMU (integration/tests/extension.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

TALOS_VERSION=${TALOS_VERSION:-v1.13.9}
CLUSTER=${CLUSTER:-hybridnet}
PATCH=${PATCH:-extension/examples/hybrid-cluster.yaml}
WORKERS=${WORKERS:-1}
arch=amd64
out=$PWD/_out
tarball=$PWD/dist/hybridnet-$arch.tar
build=1

for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --destroy) talosctl cluster destroy --name "$CLUSTER"; exit 0 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "talos-qemu: unknown argument $arg" >&2; exit 2 ;;
  esac
done

missing=()
docker info >/dev/null 2>&1 || missing+=("a running Docker engine (the Talos imager runs as a container)")
command -v talosctl >/dev/null 2>&1 || missing+=("talosctl $TALOS_VERSION (https://github.com/siderolabs/talos/releases)")
[ -c /dev/kvm ] || missing+=("/dev/kvm (talosctl's QEMU provisioner)")
[ "$(id -u)" -eq 0 ] || missing+=("root (sudo -E): the QEMU provisioner creates bridges and iptables rules")
if [ ${#missing[@]} -gt 0 ]; then
  echo "talos-qemu: cannot run here; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  echo "(the hybridnet build machine has none of these: see docs/talos.md for what is tested instead)" >&2
  exit 1
fi

step() { printf '\n==> %s\n' "$*"; }

if [ "$build" -eq 1 ]; then
  step "building the extension (hack/build-image.sh --arch $arch)"
  hack/build-image.sh --arch "$arch"
fi
[ -f "$tarball" ] || { echo "talos-qemu: $tarball is missing (run without --no-build)" >&2; exit 1; }

# The imager takes our plain tar as `tarballPath` (only through a profile on stdin, not through flags) and
# writes a kernel and an initramfs holding the extension (one squashfs) and /extensions.yaml.
mkdir -p "$out"
for kind in kernel initramfs; do
  step "imager $TALOS_VERSION: $kind with the hybridnet extension"
  docker run --rm -i -v "$out:/out" -v "$tarball:/ext/hybridnet.tar:ro" \
    "ghcr.io/siderolabs/imager:$TALOS_VERSION" - <<EOF
arch: $arch
platform: metal
secureboot: false
version: $TALOS_VERSION
input:
  kernel: {path: /usr/install/$arch/vmlinuz}
  initramfs: {path: /usr/install/$arch/initramfs.xz}
  baseInstaller: {imageRef: "ghcr.io/siderolabs/installer:$TALOS_VERSION"}
  systemExtensions:
    - tarballPath: /ext/hybridnet.tar
output: {kind: $kind, outFormat: raw}
EOF
done
kernel=$out/kernel-$arch
initrd=$out/initramfs-$arch.xz
if [ ! -f "$kernel" ] || [ ! -f "$initrd" ]; then
  echo "talos-qemu: the imager wrote no $kernel / $initrd" >&2; ls -l "$out" >&2; exit 1
fi

# With --with-bootloader=false the VMs always boot this kernel and initramfs, so the extension is active
# without an installer image. The patch carries the ExtensionServiceConfig documents (one per service).
step "talosctl cluster create ($CLUSTER, 1 control plane, $WORKERS worker(s)) with $PATCH"
minor=$(echo "$TALOS_VERSION" | sed -E 's/^v?[0-9]+\.([0-9]+).*/\1/')
if [ "$minor" -ge 12 ]; then create=(cluster create dev); else create=(cluster create --provisioner qemu); fi
talosctl "${create[@]}" --name "$CLUSTER" \
  --talos-version "$TALOS_VERSION" \
  --vmlinuz-path "$kernel" --initrd-path "$initrd" --with-bootloader=false \
  --controlplanes 1 --workers "$WORKERS" \
  --config-patch "@$PATCH" \
  --wait-timeout 15m

cp=10.5.0.2
nodes=$cp
for i in $(seq 1 "$WORKERS"); do nodes="$nodes,10.5.0.$((2 + i))"; done

step "checks"
fail=0
check() { # check DESCRIPTION COMMAND... : runs it, shows the output, records a failure
  echo "--- $1"
  if ! "${@:2}"; then echo "FAILED: $1" >&2; fail=1; fi
}
check "the extension is loaded" sh -c "talosctl -n $nodes get extensions | tee /dev/stderr | grep -q hybridnet"
for svc in apiprism meshd dnslocal; do
  check "ext-$svc is Running" sh -c \
    "talosctl -n $nodes services | tee /dev/stderr | grep -E '^\S+\s+ext-$svc\s+Running' | wc -l | grep -qx $((1 + WORKERS))"
done
check "the ExtensionServiceConfig documents arrived" talosctl -n "$cp" get extensionserviceconfigs
check "meshd's WireGuard link" sh -c "talosctl -n $nodes get links | tee /dev/stderr | grep -q hybridnet0"
check "dnslocal's dummy link and address" sh -c "talosctl -n $nodes get addresses | tee /dev/stderr | grep -q '169.254.20.10'"
check "apiprism beside KubePrism (7445 Talos, 7455 ours)" sh -c \
  "talosctl -n $cp netstat --listening --tcp | tee /dev/stderr | grep -q ':7455'"
for svc in apiprism meshd dnslocal; do
  echo "--- talosctl logs ext-$svc (last 20 lines)"
  talosctl -n "$cp" logs "ext-$svc" --tail 20 || fail=1
done
if [ "$fail" -ne 0 ]; then
  echo "talos-qemu: some checks failed (cluster left running; remove it with $0 --destroy)" >&2
  exit 1
fi
echo "talos-qemu: all checks passed (remove the cluster with $0 --destroy)"

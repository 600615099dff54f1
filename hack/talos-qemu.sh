#!/usr/bin/env bash
# Boots a local Talos cluster in QEMU with the hybridnet extension and checks its three services
# (docs/talos.md). For a machine with Docker, talosctl, KVM and network access to ghcr.io:
#
#   sudo -E hack/talos-qemu.sh              build dist/hybridnet-amd64.tar, make a kernel and an initramfs (and
#                                           with INSTALLER_IMAGE an installer) with it (Talos imager), create the
#                                           cluster, run the checks
#   sudo -E hack/talos-qemu.sh --no-build   reuse dist/hybridnet-amd64.tar
#   sudo -E hack/talos-qemu.sh --destroy    remove the cluster
#
# Environment: TALOS_VERSION (default v1.13.9; v1.11.x to v1.13.x), CLUSTER (default hybridnet), PATCH (default
# extension/examples/hybrid-cluster.yaml: the ExtensionServiceConfig documents), WORKERS (default 1),
# INSTALLER_IMAGE (a registry reference to push the imager's installer with the extension to, e.g.
# 127.0.0.1:5005/installer-hybridnet:v1.13.9, with crane or skopeo, whichever is installed; default: none, and
# the VMs install Talos's stock installer of TALOS_VERSION, pinned, which is enough here because with
# --with-bootloader=false they always boot the kernel and initramfs that hold the extension).
#
# NOT RUN IN THIS PROJECT'S CI: the machine that builds hybridnet has no Docker engine, no talosctl and no
# network access to ghcr.io, so this script is written from Talos's sources (v1.11.0 to v1.13.9: the imager's
# output names in pkg/imager/profile/profile.go, OutputPath; the `cluster create` commands in
# cmd/talosctl/cmd/mgmt/cluster/create/) and has not been executed end to end. What CI does check offline:
# the image layout and Talos's validation rules (image/validator), and the services started from the built
# tar the way machined's extension runner starts them, in QEMU (integration/tests/extension.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

TALOS_VERSION=${TALOS_VERSION:-v1.13.9}
CLUSTER=${CLUSTER:-hybridnet}
PATCH=${PATCH:-extension/examples/hybrid-cluster.yaml}
WORKERS=${WORKERS:-1}
INSTALLER_IMAGE=${INSTALLER_IMAGE:-}
arch=amd64
out=$PWD/_out
tarball=$PWD/dist/hybridnet-$arch.tar
build=1

for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    --destroy) talosctl cluster destroy --name "$CLUSTER"; exit 0 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "talos-qemu: unknown argument $arg" >&2; exit 2 ;;
  esac
done

missing=()
docker info >/dev/null 2>&1 || missing+=("a running Docker engine (the Talos imager runs as a container)")
command -v talosctl >/dev/null 2>&1 || missing+=("talosctl $TALOS_VERSION (https://github.com/siderolabs/talos/releases)")
[ -c /dev/kvm ] || missing+=("/dev/kvm (talosctl's QEMU provisioner)")
[ "$(id -u)" -eq 0 ] || missing+=("root (sudo -E): the QEMU provisioner creates bridges and iptables rules")
if [ -n "$INSTALLER_IMAGE" ] && ! command -v crane >/dev/null 2>&1 && ! command -v skopeo >/dev/null 2>&1; then
  missing+=("crane or skopeo (to push the installer to INSTALLER_IMAGE=$INSTALLER_IMAGE)")
fi
case "$TALOS_VERSION" in
  v1.1[1-3].*) ;;
  *) missing+=("a TALOS_VERSION from v1.11.0 to v1.13.x (the talosctl commands differ by version; got $TALOS_VERSION)") ;;
esac
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
# writes the kernel, an initramfs holding the extension (one squashfs) and /extensions.yaml, and an installer
# image with the same. Their names come from pkg/imager/profile/profile.go (OutputPath), the same in
# v1.11-v1.13: kernel-<arch>, initramfs-<platform>-<arch>.xz, installer-<arch>.tar (a `docker save` tarball:
# pkg/imager/out.go writes it with go-containerregistry's tarball.WriteToFile).
mkdir -p "$out"
kinds=(kernel initramfs)
[ -z "$INSTALLER_IMAGE" ] || kinds+=(installer)
for kind in "${kinds[@]}"; do
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
initrd=$out/initramfs-metal-$arch.xz
if [ ! -f "$kernel" ] || [ ! -f "$initrd" ]; then
  echo "talos-qemu: the imager wrote no $kernel / $initrd" >&2; ls -l "$out" >&2; exit 1
fi

# The installer the VMs install to disk (and upgrade from), pinned: talosctl's default is the installer of
# talosctl's own version (--install-image), which need not be TALOS_VERSION.
install_image=ghcr.io/siderolabs/installer:$TALOS_VERSION
if [ -n "$INSTALLER_IMAGE" ]; then
  step "pushing $out/installer-$arch.tar to $INSTALLER_IMAGE"
  if command -v crane >/dev/null 2>&1; then
    crane push "$out/installer-$arch.tar" "$INSTALLER_IMAGE"
  else
    skopeo copy "docker-archive:$out/installer-$arch.tar" "docker://$INSTALLER_IMAGE"
  fi
  install_image=$INSTALLER_IMAGE
fi

# Talos's own settings hybridnet needs (docs/talos.md): the kubelet hands pods dnslocal's address as their
# nameserver, and neither the kubelet nor etcd may take a mesh address as the node's address. 10.5.0.0/24 is
# talosctl's default QEMU network (--cidr).
nodes_patch=$out/hybridnet-nodes.yaml
cat > "$nodes_patch" <<'EOF'
machine:
  kubelet:
    clusterDNS: [169.254.20.10]
    nodeIP:
      validSubnets: [10.5.0.0/24]
EOF
cp_patch=$out/hybridnet-controlplane.yaml
cat > "$cp_patch" <<'EOF'
cluster:
  etcd:
    advertisedSubnets: [10.5.0.0/24]
EOF

# With --with-bootloader=false the VMs always boot this kernel and initramfs, so the extension is active
# whatever the installer holds. The patch carries the ExtensionServiceConfig documents (one per service).
# v1.12 moved the QEMU cluster to `cluster create dev` (create/cmd_dev.go; a plain `cluster create` there warns
# that it moved); v1.11 has `cluster create --provisioner qemu` (create/command.go).
step "talosctl cluster create ($CLUSTER, 1 control plane, $WORKERS worker(s)) with $PATCH"
minor=$(echo "$TALOS_VERSION" | sed -E 's/^v?[0-9]+\.([0-9]+).*/\1/')
if [ "$minor" -ge 12 ]; then create=(cluster create dev); else create=(cluster create --provisioner qemu); fi
talosctl "${create[@]}" --name "$CLUSTER" \
  --talos-version "$TALOS_VERSION" \
  --vmlinuz-path "$kernel" --initrd-path "$initrd" --with-bootloader=false \
  --install-image "$install_image" \
  --controlplanes 1 --workers "$WORKERS" \
  --config-patch "@$PATCH" --config-patch "@$nodes_patch" --config-patch-control-plane "@$cp_patch" \
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
check "the kubelet hands pods dnslocal's address" sh -c \
  "talosctl -n $cp get kubeletconfig -o yaml | tee /dev/stderr | grep -q '169.254.20.10'"
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

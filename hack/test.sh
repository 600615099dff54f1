#!/usr/bin/env bash
# All the tests: installs what they need, then runs the format check, clippy, the licence check, a static
# musl release build, the unit tests and the root tests in integration/ (against those static binaries).
# Run it as root (the integration tests create network namespaces); it fails loudly, never skips, when it
# cannot set up.
#
#   hack/test.sh            everything
#   hack/test.sh --quick    format, clippy and the unit tests only (no root needed)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "hack/test.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; step_start=$SECONDS; }
done_step() { printf '    (%ss)\n' "$((SECONDS - step_start))"; }

# Debian packages the tests use, by the command that proves each is there.
need_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
need ip iproute2
need readelf binutils
need musl-gcc musl-tools  # the static build; the QEMU extension test builds hack/qemu/talos-exec.c with it
# meshd: ping across the mesh, wg for the QEMU VMs' keys, and the QEMU node test (kernel WireGuard backend)
need ping iputils-ping
need wg wireguard-tools
need nft nftables        # meshd topology/NAT tests: ICMP counters, the routers' masquerading
need tcpdump tcpdump     # meshd relay test: what the relay sees on the wire
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need modprobe kmod
need cpio cpio
# the arm64 extension image: cross C compiler and the target's libc headers for ring
need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
[ -e /usr/aarch64-linux-gnu/include/bits/libc-header-start.h ] || need_pkgs+=(libc6-dev-arm64-cross)
need nft nftables        # meshd MSS clamping test: lists the ruleset meshd writes over netlink
ls /boot/vmlinuz-* >/dev/null 2>&1 || need_pkgs+=(linux-image-amd64)
need nsd nsd             # dnslocal tests: the upstream and cluster DNS (a real zone server)
need dig bind9-dnsutils  # dnslocal tests: a real client (glibc getent is the other)
need promtool prometheus         # operator kit: promtool check/test rules (hack/operator/check.sh)
need kubectl kubernetes-client   # operator kit: kubectl kustomize of deploy/kubernetes
# meshd discovery: Python opens the records meshd seals (a venv from Debian's python3, not a pyenv one)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_pkgs+=(python3 python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "installing ${need_pkgs[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "hack/test.sh: need root to install ${need_pkgs[*]} (or install them yourself)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  done_step
fi

step "toolchain"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
if cargo nextest --version >/dev/null 2>&1; then runner=(cargo nextest run --no-fail-fast); else runner=(cargo test --no-fail-fast); fi
cargo --version; echo "runner: ${runner[*]}"
# A full run writes about 6 GiB into target/ and dist/: say so up front rather than fail in a link later.
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
echo "disk: $((free_kib / 1024 / 1024)) GiB free here"
if [ "$quick" -eq 0 ] && [ "$free_kib" -lt $((8 * 1024 * 1024)) ]; then
  echo "hack/test.sh: warning: less than 8 GiB free; a full run needs about 6 GiB (target/ and dist/)" >&2
fi
done_step

step "cargo fmt --check"
cargo fmt --all -- --check
done_step

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
done_step

if [ "$quick" -eq 1 ]; then
  step "unit tests"
  "${runner[@]}" --workspace --locked --exclude hybridnet-integration
  done_step
  exit 0
fi

step "cargo deny (licences, bans, sources)"
command -v cargo-deny >/dev/null 2>&1 || cargo install cargo-deny --locked --quiet
cargo deny --log-level error check licenses bans sources
done_step

# Wire compatibility the other way round: records meshd seals, opened by an independent implementation
# (Python protobuf + cryptography, crates/meshd/testdata/discovery/make_vectors.py; pinned packages).
step "meshd discovery records opened by Python (make_vectors.py --check)"
venv=target/py-discovery
reqs=crates/meshd/testdata/discovery/requirements.txt
if ! cmp -s "$reqs" "$venv/requirements.txt" 2>/dev/null; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv" || { echo "hack/test.sh: cannot create a Python venv (python3-venv)" >&2; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check --require-virtualenv -r "$reqs" \
    || { echo "hack/test.sh: cannot install $reqs from PyPI" >&2; exit 1; }
  cp "$reqs" "$venv/requirements.txt"
fi
records="$(mktemp)"
rm -f "$records"
MESHD_DISCOVERY_VECTORS_OUT="$records" cargo test --quiet --locked -p hybridnet-meshd --lib write_records
[ -s "$records" ] || { echo "hack/test.sh: the Rust test wrote no records to $records" >&2; exit 1; }
"$venv/bin/python" crates/meshd/testdata/discovery/make_vectors.py --check "$records"
rm -f "$records"
done_step

# The static musl binaries are what we ship, and what the integration tests run.
musl=x86_64-unknown-linux-musl
step "static release build ($musl)"
# Only the three daemons: each release binary costs a full LTO link; test helpers build in the test profile.
cargo build --release --locked --target $musl -p hybridnet-apiprism -p hybridnet-meshd -p hybridnet-dnslocal
for bin in apiprism meshd dnslocal; do
  f=target/$musl/release/$bin
  if readelf -l "$f" | grep -q INTERP; then echo "$f is not static" >&2; exit 1; fi
  printf '    %-9s %s bytes, static\n' "$bin" "$(stat -c %s "$f")"
done
done_step

# The arm64 extension (the README's default builds both): a cross build of the three daemons (Debian's
# gcc-aarch64-linux-gnu and libc6-dev-arm64-cross for ring, installed by the script), checked static and
# validated inside. First, because every build-image.sh run starts from an empty dist/.
step "extension image, arm64 (hack/build-image.sh --arch arm64)"
hack/build-image.sh --arch arm64
done_step

# The Talos extension from those binaries (validated inside); the QEMU extension test runs this very tar.
step "extension image (hack/build-image.sh --arch amd64 --no-build)"
hack/build-image.sh --arch amd64 --no-build
done_step

# Alerts, dashboards and Kubernetes manifests (promtool, kubectl kustomize, schemas; check-config of the ConfigMap).
step "operator kit (hack/operator/check.sh)"
hack/operator/check.sh "target/$musl/release"
done_step

if [ "$(id -u)" -ne 0 ]; then
  echo "hack/test.sh: the integration tests need root (network namespaces); run as root or use --quick" >&2
  exit 1
fi

step "unit and integration tests"
HYBRIDNET_BIN_DIR="$PWD/target/$musl/release" HYBRIDNET_EXTENSION_TAR="$PWD/dist/hybridnet-amd64.tar" \
  "${runner[@]}" --workspace --locked
done_step
echo "disk used: $(du -sh target | cut -f1) in target/, $(du -sh dist | cut -f1) in dist/"

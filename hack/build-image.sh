#!/usr/bin/env bash
# Builds the Talos system extension, per architecture, without Docker:
#
#   dist/hybridnet-<arch>.tar    a deterministic plain tar of manifest.yaml + rootfs/ (the imager's tarballPath)
#   dist/hybridnet-<arch>.oci/   an OCI image layout, one layer = that tar gzipped, the platform in index.json
#                                (the imager's ociPath; `skopeo copy oci:dist/hybridnet-amd64.oci:<version> docker://...`)
#   dist/bin/<arch>/<daemon>     the static, stripped release binaries (musl)
#   dist/SHA256SUMS              sha256 of the above
#
#   hack/build-image.sh                     both architectures (amd64, arm64)
#   hack/build-image.sh --arch amd64        one (repeat --arch for several)
#   hack/build-image.sh --no-build          package binaries already in target/<triple>/release
#
# Same sources + same SOURCE_DATE_EPOCH (default: the last commit's time) = byte-identical outputs: entries
# sorted, owner and group 0, fixed mtime, fixed modes (dirs and binaries 0755, YAML 0644), GNU tar format (no
# atime/ctime), `gzip -n`, JSON written byte for byte here. Paths are remapped (--remap-path-prefix) so the
# checkout's location does not leak into the binaries. The outputs are checked with our validator
# (image/validator, Talos's and extensions-validator's rules plus ours), from the tar itself.
#
# arm64 cross build: rustup target aarch64-unknown-linux-musl; ring (rustls) compiles C, so the script uses
# Debian's gcc-aarch64-linux-gnu as the C compiler and as the linker, with libc6-dev-arm64-cross for the target's
# libc headers (gcc-aarch64-linux-gnu only recommends it; --no-install-recommends would leave it out):
#   CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
#   CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
# (Rust's musl target is self-contained: it brings its own crt objects and musl libc.a, so no musl
# cross-toolchain is needed; the result is a static, non-PIE aarch64 ELF). With qemu-user installed the arm64
# binaries are smoke-tested (`--version`) too. Installs what is missing when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

arches=()
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arches+=("$2"); shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ ${#arches[@]} -gt 0 ] || arches=(amd64 arm64)

triple_of() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-musl ;;
    arm64) echo aarch64-unknown-linux-musl ;;
    *) echo "build-image: unknown architecture $1 (amd64 or arm64)" >&2; exit 2 ;;
  esac
}

# what we need, by the command that proves each is there
need_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
need tar tar
need gzip gzip
need sha256sum coreutils
need readelf binutils
need git git
for arch in "${arches[@]}"; do
  case "$arch" in
    amd64) need musl-gcc musl-tools ;;
    arm64)
      need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
      # ring's C and assembly include the target's libc headers (bits/libc-header-start.h);
      # gcc-aarch64-linux-gnu only recommends them, and --no-install-recommends leaves them out
      [ -e /usr/aarch64-linux-gnu/include/bits/libc-header-start.h ] || need_pkgs+=(libc6-dev-arm64-cross)
      ;;
  esac
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "build-image: install ${need_pkgs[*]} (or run as root)" >&2; exit 1
  fi
  echo "==> installing ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

version=v$(awk -F'"' '/^\[workspace.package\]/{p=1} p && /^version *=/{print $2; exit}' Cargo.toml)
[ "$version" != v ] || { echo "build-image: no [workspace.package] version in Cargo.toml" >&2; exit 1; }
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || true)
  [ -n "$SOURCE_DATE_EPOCH" ] || { echo "build-image: not a git checkout: set SOURCE_DATE_EPOCH" >&2; exit 1; }
fi
export SOURCE_DATE_EPOCH
target_dir=${CARGO_TARGET_DIR:-$root/target}
dist=$root/dist
echo "==> hybridnet $version, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH, architectures: ${arches[*]}"

# The validator and stager (a host build, quick).
cargo build --locked --quiet -p hybridnet-extension-validator
validator=$target_dir/debug/hybridnet-extension-validator

if [ "$build" -eq 1 ]; then
  for arch in "${arches[@]}"; do
    triple=$(triple_of "$arch")
    rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
    echo "==> cargo build --release ($triple)"
    start=$SECONDS
    if [ "$arch" = arm64 ]; then
      export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
      export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
      export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
    fi
    RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$root=/hybridnet --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
      cargo build --release --locked --target "$triple" \
      -p hybridnet-apiprism -p hybridnet-meshd -p hybridnet-dnslocal --bins
    echo "    ($((SECONDS - start))s)"
  done
fi

rm -rf "$dist"
mkdir -p "$dist"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# JSON helpers: fixed key order, no whitespace, so the bytes (and digests) are reproducible.
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
blob() { # blob FILE LAYOUT -> digest; moves FILE into LAYOUT/blobs/sha256/
  local d; d=$(sha "$1"); mv "$1" "$2/blobs/sha256/$d"; echo "$d"
}

for arch in "${arches[@]}"; do
  triple=$(triple_of "$arch")
  bins=$target_dir/$triple/release
  mkdir -p "$dist/bin/$arch"
  for b in apiprism meshd dnslocal; do
    f=$bins/$b
    [ -x "$f" ] || { echo "build-image: $f is missing (run without --no-build)" >&2; exit 1; }
    if readelf -l "$f" | grep -q INTERP; then echo "build-image: $f is not static" >&2; exit 1; fi
    install -m 0755 "$f" "$dist/bin/$arch/$b"
    # smoke test: it runs (arm64 under qemu-user when installed)
    case "$arch" in
      amd64) "$dist/bin/$arch/$b" --version >/dev/null ;;
      arm64) if command -v qemu-aarch64 >/dev/null 2>&1; then qemu-aarch64 "$dist/bin/$arch/$b" --version >/dev/null; fi ;;
    esac
    # the release profile strips (strip = "symbols"); strip again only if a symbol table is left
    if readelf -S "$dist/bin/$arch/$b" | grep -q '\.symtab'; then
      if [ "$arch" = arm64 ]; then aarch64-linux-gnu-strip "$dist/bin/$arch/$b"; else strip "$dist/bin/$arch/$b"; fi
    fi
  done

  # 1. the tree
  tree=$work/$arch/tree
  "$validator" stage --extension extension --bin-dir "$dist/bin/$arch" --out "$tree" --version "$version" >/dev/null

  # 2. the plain tar (tarballPath)
  tarball=$dist/hybridnet-$arch.tar
  tar --create --file "$tarball" --directory "$tree" \
    --format=gnu --sort=name --numeric-owner --owner=0 --group=0 \
    --mtime="@$SOURCE_DATE_EPOCH" --no-acls --no-xattrs --no-selinux \
    manifest.yaml rootfs

  # check what we ship: unpack the tar and validate that
  check=$work/$arch/check
  mkdir -p "$check"
  tar --extract --file "$tarball" --directory "$check" --no-same-owner
  "$validator" validate --rootfs "$check" --pkg-name hybridnet --strict

  # 3. the OCI layout (ociPath): one gzip layer, config, manifest, index with the platform
  oci=$dist/hybridnet-$arch.oci
  mkdir -p "$oci/blobs/sha256"
  diff_id=$(sha "$tarball")
  gzip -n -9 -c "$tarball" > "$work/layer.tar.gz"
  layer_size=$(size "$work/layer.tar.gz")
  layer=$(blob "$work/layer.tar.gz" "$oci")
  created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
  printf '{"architecture":"%s","config":{"Labels":{"org.opencontainers.image.title":"hybridnet","org.opencontainers.image.version":"%s"}},"created":"%s","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$arch" "$version" "$created" "$diff_id" > "$work/config.json"
  config_size=$(size "$work/config.json")
  config=$(blob "$work/config.json" "$oci")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}],"annotations":{"org.opencontainers.image.title":"hybridnet","org.opencontainers.image.version":"%s","org.opencontainers.image.created":"%s"}}' \
    "$config" "$config_size" "$layer" "$layer_size" "$version" "$created" > "$work/manifest.json"
  manifest_size=$(size "$work/manifest.json")
  manifest=$(blob "$work/manifest.json" "$oci")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "$arch" "$version" > "$oci/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
  # check the layout: every blob is named by its digest, the layer unpacks to the very tar
  for b in "$oci"/blobs/sha256/*; do
    [ "$(sha "$b")" = "$(basename "$b")" ] || { echo "build-image: bad blob $b" >&2; exit 1; }
  done
  gzip -dc "$oci/blobs/sha256/$layer" | cmp -s - "$tarball" || { echo "build-image: layer differs from the tar" >&2; exit 1; }
  find "$oci" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
done

(cd "$dist" && find . -type f | LC_ALL=C sort | xargs sha256sum > "$work/SHA256SUMS")
mv "$work/SHA256SUMS" "$dist/SHA256SUMS"
echo "==> dist/"
for arch in "${arches[@]}"; do
  printf '    hybridnet-%s.tar  %s bytes\n' "$arch" "$(size "$dist/hybridnet-$arch.tar")"
  printf '    hybridnet-%s.oci/ %s bytes (one gzip layer)\n' "$arch" "$(du -sb "$dist/hybridnet-$arch.oci" | cut -f1)"
  for b in apiprism meshd dnslocal; do
    printf '    bin/%s/%-9s %s bytes, static, stripped\n' "$arch" "$b" "$(size "$dist/bin/$arch/$b")"
  done
done
grep -E 'hybridnet-[a-z0-9]+\.tar$' "$dist/SHA256SUMS" | sed 's/^/    /'

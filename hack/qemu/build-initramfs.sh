#!/bin/sh
# Builds a small initramfs for QEMU node tests: busybox-static (every applet linked), the kernel modules that
# MODULES need (by default wireguard, virtio_net and virtio_pci, with their dependencies as
# `modprobe -S <kernel> --show-depends` lists them, decompressed, in load order in /lib/modules/load.list), and
# everything under OVERLAY (an /init script, binaries, configs).
#
#   hack/qemu/build-initramfs.sh OUT.cpio.gz KERNEL_VERSION OVERLAY_DIR [MODULE...]
#
# Needs busybox-static, kmod (modprobe), cpio, gzip and the kernel's modules (linux-image-amd64).
set -eu
if [ $# -lt 3 ]; then sed -n '2,8p' "$0"; exit 2; fi
out=$1 kver=$2 overlay=$3
shift 3
mods=${*:-wireguard virtio_net virtio_pci}
for tool in busybox modprobe cpio gzip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-initramfs: $tool is missing" >&2; exit 1; }
done
[ -d "/lib/modules/$kver" ] || { echo "build-initramfs: no modules for kernel $kver in /lib/modules" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/proc" "$work/sys" "$work/dev" "$work/run" "$work/tmp" "$work/etc" \
  "$work/var/lib" "$work/var/run" "$work/lib/modules"
bb=$(command -v busybox)
if command -v readelf >/dev/null 2>&1 && readelf -l "$bb" | grep -q INTERP; then
  echo "build-initramfs: $bb is dynamically linked; install busybox-static" >&2; exit 1
fi
cp "$bb" "$work/bin/busybox"
for applet in $("$work/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$work/bin/$applet"
done
ln -s bin "$work/sbin"
list="$work/lib/modules/load.list"
: > "$list"
for m in $mods; do
  modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++' | while read -r ko; do
  name=$(basename "$ko")
  case "$ko" in
    *.ko.xz) name=${name%.xz}; xz -dc "$ko" > "$work/lib/modules/$name" ;;
    *.ko.zst) name=${name%.zst}; zstd -qdc "$ko" > "$work/lib/modules/$name" ;;
    *.ko.gz) name=${name%.gz}; gzip -dc "$ko" > "$work/lib/modules/$name" ;;
    *) cp "$ko" "$work/lib/modules/$name" ;;
  esac
  echo "${name%.ko}" >> "$list"
done
cp -a "$overlay/." "$work/"
chmod 0755 "$work/init"
(cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"

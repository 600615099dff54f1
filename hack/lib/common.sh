# shellcheck shell=bash
# Helpers shared by the hack/ scripts: messages, root, Debian packages. Source it; it defines functions only.

# say MSG...: a progress line on stdout.
say() { printf '==> %s\n' "$*"; }
# note MSG...: an indented detail line.
note() { printf '    %s\n' "$*"; }
# warn MSG...: on stderr.
warn() { printf '%s: warning: %s\n' "${0##*/}" "$*" >&2; }
# die MSG...: on stderr, exit 1.
die() { printf '%s: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# require_root WHY: exit with a clear message unless running as root.
require_root() {
  [ "$(id -u)" -eq 0 ] || die "needs root ($1); run it with sudo"
}

# ensure_pkgs CMD:PKG...: installs (apt-get, no recommends) the package of each command that is missing.
ensure_pkgs() {
  local pair missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "cannot install ${missing[*]}"
}

# nsd_conf DIR IP ZONE...: writes DIR/nsd.conf for an unprivileged NSD answering on IP:53 with its state and
# log in DIR, serving each ZONE from DIR/ZONE.zone (the DNS stand-in of the lab and the benchmarks).
nsd_conf() {
  local dir=$1 ip=$2 zone
  shift 2
  {
    printf 'server:\n  ip-address: %s\n  port: 53\n  zonesdir: "%s"\n  database: ""\n' "$ip" "$dir"
    printf '  pidfile: "%s/nsd.pid"\n  username: ""\n  chroot: ""\n' "$dir"
    printf '  xfrdfile: "%s/xfrd.state"\n  zonelistfile: "%s/zone.list"\n  server-count: 1\n' "$dir" "$dir"
    printf '  logfile: "%s/nsd.log"\nremote-control:\n  control-enable: no\n' "$dir"
    for zone in "$@"; do
      printf 'zone:\n  name: %s\n  zonefile: %s.zone\n' "$zone" "$zone"
    done
  } >"$dir/nsd.conf"
}

#!/usr/bin/env bash
# hack/lab.sh: builds the daemons and runs them in a local multi-node lab on this machine (needs root).
#
# Three nodes (network namespaces hnlab-node1..3) on a bridge (hnlab-br0, in namespace hnlab-switch, which
# also holds 192.0.2.1 / 2001:db8::1), addresses 192.0.2.11-13/24 and 2001:db8::11-13/64. Each node gets a
# generated config (Talos documents + our HybridNetConfig) in /run/hybridnet-lab/nodeN/config.yaml and runs
# apiprism, meshd and dnslocal (logs: /run/hybridnet-lab/nodeN/<daemon>.log). The lab waits for every
# /readyz, prints a status table and one node's check-config (values and where they came from), then tears
# everything down: on success, on failure and on Ctrl-C.
#
#   hack/lab.sh                 build, run, show, tear down
#   hack/lab.sh --keep          leave the lab running and print how to inspect it
#   hack/lab.sh --down          tear down a lab left running
#   hack/lab.sh --no-build      use the binaries already in target/release (or $HYBRIDNET_BIN_DIR)
#   hack/lab.sh --nodes N       N nodes (1-9), default 3
#   hack/lab.sh --no-features   skip the data-plane checks (stand-in API servers and DNS, lookups)
#   hack/lab.sh --broken        after the healthy doctor run, break node1 (kubelet DNS elsewhere, mesh port
#                               dropped) and show that doctor reports both with the fix
#   hack/lab.sh --screenshots   render every Grafana dashboard from node1's metrics into docs/operator/
#                               (a Prometheus scrapes it for 90 s of traffic and outages; hack/lib/lab-operator.sh)
#
# The lab ends with the operator kit (hack/lib/lab-operator.sh): every metric the alerts and dashboards name
# checked in the daemons' real /metrics, then `meshd doctor` on each node (kubeadm-style kubelet files in
# nodeN/kubelet/).
#
# Data-plane checks come from hack/lib/lab-<daemon>.sh (sourced when present; each defines lab_<daemon>):
# apiprism in front of three stand-in API servers (192.0.2.1-3:6443 in the switch namespace), dnslocal
# answering from a stand-in NSD (192.0.2.53). A new one needs a file there and a feature_<daemon> below.
#
# Environment: HNLAB_LOG (the daemons' log filter, default info), HNLAB_READY_TIMEOUT (seconds, default 30),
# HYBRIDNET_BIN_DIR (where the binaries are).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=hack/lib/common.sh
. "$REPO/hack/lib/common.sh"
# shellcheck source=hack/lib/netlab.sh
. "$REPO/hack/lib/netlab.sh"
for hook in "$REPO"/hack/lib/lab-*.sh; do
  # shellcheck source=/dev/null
  if [ -e "$hook" ]; then . "$hook"; fi
done

readonly LAB_DIR=/run/hybridnet-lab
readonly PREFIX=hnlab-
readonly SWITCH_NS=${PREFIX}switch
readonly BRIDGE=${PREFIX}br0
readonly DAEMONS=(apiprism meshd dnslocal)
readonly BIN_DIR=${HYBRIDNET_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/release}
readonly READY_TIMEOUT=${HNLAB_READY_TIMEOUT:-30}
readonly LOG_FILTER=${HNLAB_LOG:-info}

nodes=3
keep=0
build=1
features=1
broken=0
screenshots=""
lab_up=0

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

admin_port() {
  case $1 in
    apiprism) echo 7446 ;;
    meshd) echo 7447 ;;
    dnslocal) echo 7448 ;;
  esac
}
node_ns() { echo "${PREFIX}node$1"; }
node_dir() { echo "$LAB_DIR/node$1"; }

# --- steps -------------------------------------------------------------------------------------------------

install_tools() {
  ensure_pkgs ip:iproute2 curl:curl jq:jq setsid:util-linux
}

build_daemons() {
  if [ "$build" -eq 1 ]; then
    command -v cargo >/dev/null 2>&1 ||
      die "cargo is not on PATH (under sudo, try: sudo -E env PATH=\"\$PATH\" hack/lab.sh), or build first and use --no-build"
    local extra=()
    # The stand-in API servers of the apiprism check are built in the same cargo run.
    if [ "$features" -eq 1 ] && declare -F lab_apiprism >/dev/null; then
      extra=(-p hybridnet-integration --bin apiprism-standin)
    fi
    say "building the daemons (cargo build --release)"
    (cd "$REPO" && cargo build --release -p hybridnet-apiprism -p hybridnet-meshd -p hybridnet-dnslocal "${extra[@]}")
  fi
  local d
  for d in "${DAEMONS[@]}"; do
    [ -x "$BIN_DIR/$d" ] || die "$BIN_DIR/$d is missing: build it (drop --no-build) or set HYBRIDNET_BIN_DIR"
  done
}

# Stops what an earlier run left: daemons, namespaces, files. Safe to run when nothing is there.
lab_down() {
  local pidfile pid ns
  for pidfile in "$LAB_DIR"/node*/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(<"$pidfile")
    if is_lab_daemon "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for pidfile in "$LAB_DIR"/node*/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(<"$pidfile")
    if ! wait_gone "$pid" 5 && is_lab_daemon "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  for ns in $(netlab_list "$PREFIX"); do
    netlab_del_ns "$ns"
  done
  # An older lab may have put the bridge in the host's namespace.
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
  rm -rf "$LAB_DIR"
}

# is_lab_daemon PID: the process runs one of our daemons on a lab config (guards against a reused pid).
is_lab_daemon() {
  [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "run --config $LAB_DIR/"
}

# wait_gone PID SECONDS
wait_gone() {
  local deadline=$((SECONDS + $2))
  while [ -e "/proc/$1" ]; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

create_network() {
  say "network: $nodes nodes on bridge $BRIDGE (namespace $SWITCH_NS, 192.0.2.1)"
  netlab_switch "$SWITCH_NS" "$BRIDGE" 192.0.2.1/24 2001:db8::1/64
  local i
  for i in $(seq 1 "$nodes"); do
    netlab_node "$SWITCH_NS" "$BRIDGE" "$(node_ns "$i")" "${PREFIX}p$i" "192.0.2.1$i/24" "2001:db8::1$i/64"
    note "$(node_ns "$i"): eth0 192.0.2.1$i/24 2001:db8::1$i/64"
  done
}

# The embedded default config of node $1: Talos documents (so the lab exercises the Talos loader, and
# check-config shows which values came from where) followed by our document.
node_config() {
  local i=$1 dir
  dir=$(node_dir "$i")
  cat <<EOF
# hybridnet lab, node $i (generated by hack/lab.sh; edit to see the daemons reload)
version: v1alpha1
machine:
  type: worker
  features:
    kubePrism:
      enabled: false  # hybridnet's apiprism serves 127.0.0.1:7445 instead
cluster:
  id: aHlicmlkbmV0LWxhYi1jbHVzdGVyLWlkLTAwMDAwMDA=
  controlPlane:
    endpoint: https://192.0.2.1:6443
  network:
    dnsDomain: cluster.local
    podSubnets: [10.244.0.0/16]
    serviceSubnets: [10.96.0.0/12]
---
apiVersion: v1alpha1
kind: KubeSpanConfig
enabled: true
mtu: 1420
filters:
  endpoints: ["192.0.2.0/24", "2001:db8::/64"]
---
apiVersion: v1alpha1
kind: HybridNetConfig
stateDir: $dir/state
dataDir: $dir/data
apiprism: {listen: ["127.0.0.1:7445"], endpoints: ["192.0.2.1:6443", "192.0.2.2:6443", "192.0.2.3:6443"], admin: "127.0.0.1:$(admin_port apiprism)"}
meshd: {interface: hybridnet0, listenPort: 51821, location: lab, admin: "127.0.0.1:$(admin_port meshd)"}
dnslocal: {listen: ["169.254.20.10:53"], clusterDomain: cluster.local, clusterDNS: ["192.0.2.53:53"], upstreams: ["192.0.2.53:53"], admin: "127.0.0.1:$(admin_port dnslocal)"}
EOF
}

write_configs() {
  say "configs: $LAB_DIR/nodeN/config.yaml"
  local i dir
  for i in $(seq 1 "$nodes"); do
    dir=$(node_dir "$i")
    mkdir -p "$dir/state" "$dir/data"
    node_config "$i" >"$dir/config.yaml"
  done
}

# start_daemon NODE DAEMON: in the node's namespace, in its own session (so Ctrl-C reaches only this
# script, whose trap stops it), pid in nodeN/DAEMON.pid, output in nodeN/DAEMON.log.
start_daemon() {
  local i=$1 d=$2 dir ns var
  dir=$(node_dir "$i")
  ns=$(node_ns "$i")
  var=$(echo "$d" | tr '[:lower:]' '[:upper:]')
  rm -f "$dir/$d.pid"
  # shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner shell
  setsid -f ip netns exec "$ns" sh -c 'echo $$ >"$0"; exec "$@"' "$dir/$d.pid" \
    env "${var}_LOG=$LOG_FILTER" "${var}_LOG_FORMAT=plain" \
    "$BIN_DIR/$d" run --config "$dir/config.yaml" </dev/null >"$dir/$d.log" 2>&1
}

start_daemons() {
  say "starting ${DAEMONS[*]} on every node"
  local i d deadline
  for i in $(seq 1 "$nodes"); do
    for d in "${DAEMONS[@]}"; do start_daemon "$i" "$d"; done
  done
  deadline=$((SECONDS + 5))
  for i in $(seq 1 "$nodes"); do
    for d in "${DAEMONS[@]}"; do
      until [ -s "$(node_dir "$i")/$d.pid" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "node$i $d did not start; see $(node_dir "$i")/$d.log"
        sleep 0.05
      done
    done
  done
}

# http_code NODE DAEMON PATH: the admin endpoint's answer, from inside the node ("000" if none).
http_code() {
  ip netns exec "$(node_ns "$1")" curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
    "http://127.0.0.1:$(admin_port "$2")$3" || true
}

wait_ready() {
  say "waiting for every /readyz (up to ${READY_TIMEOUT}s)"
  local i d pending deadline=$((SECONDS + READY_TIMEOUT)) start=$SECONDS
  while :; do
    pending=()
    for i in $(seq 1 "$nodes"); do
      for d in "${DAEMONS[@]}"; do
        [ "$(http_code "$i" "$d" /readyz)" = 200 ] || pending+=("node$i/$d")
      done
    done
    [ "${#pending[@]}" -eq 0 ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
      report_not_ready "${pending[@]}"
      die "not ready after ${READY_TIMEOUT}s: ${pending[*]}"
    fi
    sleep 0.2
  done
  note "all $((nodes * ${#DAEMONS[@]})) daemons ready in $((SECONDS - start))s"
}

# report_not_ready node1/meshd ...: why each one is not ready (process, endpoints, log tail).
report_not_ready() {
  local item i d pid state
  for item in "$@"; do
    i=${item%%/*}
    i=${i#node}
    d=${item#*/}
    pid=$(cat "$(node_dir "$i")/$d.pid" 2>/dev/null || echo "?")
    state="running"
    [ -e "/proc/$pid" ] || state="EXITED"
    printf '\n--- node%s %s: pid %s %s, /healthz %s, /readyz %s; last log lines:\n' "$i" "$d" "$pid" "$state" \
      "$(http_code "$i" "$d" /healthz)" "$(http_code "$i" "$d" /readyz)" >&2
    tail -n 15 "$(node_dir "$i")/$d.log" >&2 || true
  done
}

# --- data-plane checks: one feature_<daemon> per hack/lib/lab-<daemon>.sh ---------------------------------

node_list() {
  local i
  for i in $(seq 1 "$nodes"); do node_ns "$i"; done
}

# apiprism: stand-in API servers on 192.0.2.1-3:6443 (the nodes' endpoints), a request through each node.
feature_apiprism() {
  local i pairs=()
  for i in $(seq 1 "$nodes"); do pairs+=("$(node_ns "$i"):$(node_dir "$i")/config.yaml"); done
  lab_apiprism "$BIN_DIR" "$SWITCH_NS" "$BRIDGE" "${pairs[@]}"
}

# dnslocal: a stand-in NSD on 192.0.2.53 (the nodes' clusterDNS and upstream), lookups on every node.
feature_dnslocal() {
  # shellcheck disable=SC2046 # one namespace name per word
  lab_dnslocal "$SWITCH_NS" "$BRIDGE" 192.0.2.53 169.254.20.10 $(node_list)
}

# The DNS stand-in runs before the daemons start, as a node's resolvers do at boot: dnslocal queries its
# upstreams from the start (its loop probe), and an address that appears only later leaves the nodes'
# neighbour entries for it FAILED for a while, so the first lookups after it appears can fail.
start_standins() {
  [ "$features" -eq 1 ] || return 0
  if declare -F lab_dnslocal_start_standin >/dev/null; then
    lab_dnslocal_start_standin "$SWITCH_NS" "$BRIDGE" 192.0.2.53
  fi
}

# meshd: every node's key and underlay address become the others' static peers; a full mesh, then pings.
feature_meshd() {
  local i pairs=()
  for i in $(seq 1 "$nodes"); do pairs+=("$(node_ns "$i"):$(node_dir "$i")/config.yaml"); done
  lab_meshd "$BIN_DIR" "${pairs[@]}"
}

run_features() {
  [ "$features" -eq 1 ] || return 0
  local d failed=()
  for d in "${DAEMONS[@]}"; do
    declare -F "lab_$d" >/dev/null || continue
    if ! declare -F "feature_$d" >/dev/null; then
      warn "hack/lib/lab-$d.sh defines lab_$d, but hack/lab.sh has no feature_$d to call it"
      continue
    fi
    "feature_$d" || failed+=("$d")
  done
  [ "${#failed[@]}" -eq 0 ] || die "data-plane checks failed: ${failed[*]} (logs in $LAB_DIR)"
}

show_status() {
  say "status (<daemon> status --config $LAB_DIR/nodeN/config.yaml --json)"
  local fmt='%-6s %-9s %-8s %-6s %-4s %-7s %-30s %s\n' i d json
  # shellcheck disable=SC2059 # the format is ours
  printf "$fmt" NODE DAEMON PID READY GEN /readyz CONFIG-ERROR SUMMARY
  for i in $(seq 1 "$nodes"); do
    for d in "${DAEMONS[@]}"; do
      if json=$("$BIN_DIR/$d" status --config "$(node_dir "$i")/config.yaml" --json 2>&1); then :; else
        warn "node$i $d status exited $?: $json"
      fi
      # shellcheck disable=SC2059
      printf "$fmt" "node$i" "$d" \
        "$(jq -r '.pid // "?"' <<<"$json" 2>/dev/null || echo '?')" \
        "$(jq -r 'if .ready then "yes" else "no" end' <<<"$json" 2>/dev/null || echo '?')" \
        "$(jq -r '.configGeneration // "?"' <<<"$json" 2>/dev/null || echo '?')" \
        "$(http_code "$i" "$d" /readyz)" \
        "$(jq -r '(.configError // "-") | .[0:30]' <<<"$json" 2>/dev/null || echo '?')" \
        "$(jq -r '.summary // "?"' <<<"$json" 2>/dev/null || echo "$json")"
    done
  done
}

# The operator kit: metric names of the alerts and dashboards, doctor on every node (and --broken, --screenshots).
run_operator() {
  declare -F lab_operator >/dev/null || return 0
  local i pairs=()
  for i in $(seq 1 "$nodes"); do pairs+=("$(node_ns "$i"):$(node_dir "$i")"); done
  lab_operator "$BIN_DIR" "$broken" "$screenshots" "${pairs[@]}" || die "operator checks failed (see above)"
}

show_check_config() {
  say "check-config of node1 (meshd's view: every value and where it came from)"
  "$BIN_DIR/meshd" check-config --config "$(node_dir 1)/config.yaml" | sed 's/^/    /'
}

print_keep_help() {
  cat <<EOF

The lab is running ($nodes nodes). To look at it:
  ip netns exec $(node_ns 1) bash                                   # a shell on node1
  ip netns exec $(node_ns 1) curl -s http://127.0.0.1:7447/metrics  # meshd's metrics (7446 apiprism, 7448 dnslocal)
  $BIN_DIR/meshd status --config $(node_dir 1)/config.yaml
  tail -f $LAB_DIR/node*/*.log
  \$EDITOR $(node_dir 1)/config.yaml   # the daemons reload it; or: kill -HUP \$(cat $(node_dir 1)/meshd.pid)
To tear it down:
  hack/lab.sh --down
EOF
}

# --- main ----------------------------------------------------------------------------------------------------

on_exit() {
  local status=$?
  trap - EXIT INT TERM
  if [ "$lab_up" -eq 1 ] && { [ "$keep" -eq 0 ] || [ "$status" -ne 0 ]; }; then
    say "tearing down the lab"
    lab_down
  fi
  [ "$status" -eq 0 ] || printf '%s: failed (exit %s)\n' "${0##*/}" "$status" >&2
  exit "$status"
}

main() {
  local down=0
  while [ $# -gt 0 ]; do
    case $1 in
      --keep) keep=1 ;;
      --down) down=1 ;;
      --no-build) build=0 ;;
      --no-features) features=0 ;;
      --broken) broken=1 ;;
      --screenshots) screenshots="$REPO/docs/operator" ;;
      --nodes)
        [ $# -ge 2 ] || die "--nodes needs a number"
        nodes=$2
        shift
        ;;
      -h | --help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
  done
  [[ $nodes =~ ^[1-9]$ ]] || die "--nodes must be 1 to 9"
  require_root "network namespaces"
  if [ "$down" -eq 1 ]; then
    ensure_pkgs ip:iproute2
    say "tearing down the lab"
    lab_down
    return 0
  fi
  install_tools
  build_daemons

  trap on_exit EXIT
  trap 'printf "%s: line %s: \`%s\` failed\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" >&2' ERR
  trap 'exit 130' INT
  trap 'exit 143' TERM
  lab_down # idempotent: whatever an earlier run left
  lab_up=1
  create_network
  write_configs
  start_standins
  start_daemons
  wait_ready
  run_features
  show_status
  show_check_config
  run_operator
  if [ "$keep" -eq 1 ]; then print_keep_help; fi
}

main "$@"

# shellcheck shell=bash
# apiprism in the lab: three stand-in API servers (TLS + HTTP/2 test doubles, `apiprism-standin` from the
# integration crate: no real kube-apiserver runs here) and, for every node, apiprism's upstream table and one
# request through its 127.0.0.1:7445. Source it (after common.sh); it defines functions only.
#
#   lab_apiprism BIN_DIR STANDIN_NS STANDIN_DEV NODE_NS:CONFIG...
#
# BIN_DIR holds apiprism (the lab's $HYBRIDNET_BIN_DIR or target/release); the stand-in is taken from BIN_DIR,
# else target/release, else built there with cargo.
# The stand-ins listen on 192.0.2.1:6443 (the lab's control-plane endpoint), 192.0.2.2:6443 and
# 192.0.2.3:6443 in STANDIN_NS (the lab's switch namespace; .2 and .3 are added to STANDIN_DEV as /32s). For
# apiprism to use all three, give the nodes
#   apiprism: {endpoints: ["192.0.2.1:6443", "192.0.2.2:6443", "192.0.2.3:6443"], ...}
# (with only the control-plane endpoint, the table shows one upstream). lab_apiprism_stop stops them;
# lab_apiprism_kill N SIGKILLs stand-in N (1-3) to watch a failover in `apiprism status`.

LAB_API_DIR=${LAB_API_DIR:-/run/hybridnet-lab/api}

lab_apiprism_standin_bin() {
  local bin_dir=$1 repo bin
  if [ -x "$bin_dir/apiprism-standin" ]; then echo "$bin_dir/apiprism-standin"; return; fi
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  bin=$repo/target/release/apiprism-standin
  if [ ! -x "$bin" ]; then
    command -v cargo >/dev/null 2>&1 ||
      die "apiprism-standin is neither in $bin_dir nor in $repo/target/release, and cargo is not on PATH to build it"
    (cd "$repo" && cargo build --release -q -p hybridnet-integration --bin apiprism-standin) ||
      die "cannot build apiprism-standin"
  fi
  echo "$bin"
}

lab_apiprism_start_standins() {
  local bin_dir=$1 ns=$2 dev=$3 bin i ip
  bin=$(lab_apiprism_standin_bin "$bin_dir")
  mkdir -p "$LAB_API_DIR"
  [ -f "$LAB_API_DIR/pki/ca.der" ] || "$bin" --gen-pki "$LAB_API_DIR/pki"
  for i in 1 2 3; do
    ip=192.0.2.$i
    if [ -f "$LAB_API_DIR/api-$i.pid" ] && kill -0 "$(cat "$LAB_API_DIR/api-$i.pid")" 2>/dev/null; then
      continue
    fi
    [ "$i" -eq 1 ] || ip -n "$ns" addr replace "$ip/32" dev "$dev"
    ip netns exec "$ns" "$bin" "api-$i" "$ip:6443" "$LAB_API_DIR/pki" >"$LAB_API_DIR/api-$i.log" 2>&1 &
    echo $! >"$LAB_API_DIR/api-$i.pid"
  done
  for i in 1 2 3; do
    local tries=0
    until grep -q '^listening' "$LAB_API_DIR/api-$i.log" 2>/dev/null; do
      tries=$((tries + 1))
      [ "$tries" -lt 50 ] || die "stand-in api-$i did not start (see $LAB_API_DIR/api-$i.log)"
      sleep 0.1
    done
  done
  note "API stand-ins: api-1..3 on 192.0.2.1-3:6443 in $ns (TLS + HTTP/2; logs in $LAB_API_DIR)"
}

lab_apiprism_kill() {
  local pidfile=$LAB_API_DIR/api-$1.pid
  [ -f "$pidfile" ] && kill -KILL "$(cat "$pidfile")" 2>/dev/null
  rm -f "$pidfile"
}

lab_apiprism_stop() {
  local i
  for i in 1 2 3; do lab_apiprism_kill "$i"; done
}

lab_apiprism() {
  [ "$#" -ge 4 ] || die "usage: lab_apiprism BIN_DIR STANDIN_NS STANDIN_DEV NODE_NS:CONFIG..."
  local bin_dir=$1 standin_ns=$2 dev=$3 pair ns config answer failed=0
  shift 3
  lab_apiprism_start_standins "$bin_dir" "$standin_ns" "$dev"
  sleep 1.5 # a health check round (and rise) in every node's apiprism
  say "apiprism: each node's upstream table, and a request through its 127.0.0.1:7445"
  for pair in "$@"; do
    ns=${pair%%:*} config=${pair#*:}
    note "$ns:"
    "$bin_dir/apiprism" status --config "$config" 2>&1 | sed 's/^/      /' || failed=1
    answer=$(ip netns exec "$ns" curl -sk --http2 --max-time 3 https://127.0.0.1:7445/name 2>&1) || failed=1
    note "  GET https://127.0.0.1:7445/name -> ${answer:-no answer}"
  done
  [ "$failed" -eq 0 ] || warn "apiprism: some nodes did not answer (is apiprism running? see its log)"
  return "$failed"
}

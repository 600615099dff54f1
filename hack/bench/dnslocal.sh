#!/usr/bin/env bash
# dnslocal against Unbound and dnsmasq, each a forwarding cache in front of the same upstream (NSD), in
# one run on this machine, all traffic inside a private network namespace.
#
#   hack/bench/dnslocal.sh [--quick]      (root; installs nsd unbound dnsmasq-base dnsperf bind9-dnsutils)
#   hack/bench/dnslocal.sh --cluster-zone [--quick]   clusterZone kubernetes vs forward (hack/bench/dnslocal-zone.sh)
#
# The three servers run side by side (each on its own address, all pinned to core 0 with taskset), dnsperf
# is pinned to core 1, and the runs are interleaved in rounds (median per server), so that noise from other
# work on the machine hits all three alike. Measured:
#   1. cache-hit QPS at full load (dnsperf -c 20 -q 200), and answers per CPU-second of the server during
#      those runs (its capacity: on this machine one dnsperf core can be the bottleneck);
#   2. server CPU time per query at a fixed 40k QPS (from /proc/<pid>/stat): the efficiency, independent
#      of whether dnsperf or the server is the bottleneck at full load;
#   3. mean and p99 latency at 50% of each server's own max QPS (dnsperf -v per-query latencies);
#   4. a Kubernetes-like mix (ndots:5 search-path expansions: mostly NXDOMAIN, some hits, a few misses);
#   5. dnslocal and Unbound on cores 0-1 (2 threads; dnsperf then shares core 1: indicative only);
#   6. RSS with 10,000 and 100,000 cached names.
# Prints a table with ratios. --quick: 3 s runs, 1 round.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--cluster-zone" ]; then
  shift
  exec hack/bench/dnslocal-zone.sh "$@"
fi
# shellcheck source=../lib/common.sh
. hack/lib/common.sh
# shellcheck source=lib.sh
. hack/bench/lib.sh

DUR=5 ROUNDS=3
[ "${1:-}" = "--quick" ] && DUR=3 ROUNDS=1
require_root "network namespaces, binding port 53"
ensure_pkgs nsd:nsd unbound:unbound dnsmasq:dnsmasq-base dnsperf:dnsperf dig:bind9-dnsutils taskset:util-linux
[ "$(nproc)" -ge 2 ] || die "needs 2 cores (servers on core 0, dnsperf on core 1)"

say "building dnslocal (release)"
cargo build --release -q -p hybridnet-dnslocal
BIN=$PWD/target/release/dnslocal

NS=dlbench-$$
W=$(mktemp -d /tmp/dnslocal-bench.XXXXXX)
UP=127.0.0.11 # NSD
declare -A ADDR=([dnslocal]=127.0.0.20 [unbound]=127.0.0.21 [dnsmasq]=127.0.0.22) PID=()
SERVERS=(dnslocal unbound dnsmasq)
cleanup() {
  local p
  for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$W/nsd.pid" ] && kill "$(cat "$W/nsd.pid")" 2>/dev/null || true
  sleep 0.3
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$W" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
inns() { ip netns exec "$NS" "$@"; }

say "upstream: NSD with 100,000 names in bench.test and a cluster.local zone"
{
  printf '$TTL 3600\n@ IN SOA ns.bench.test. h.bench.test. 1 3600 600 86400 60\n@ IN NS ns.bench.test.\nns IN A %s\n' "$UP"
  printf 'www IN A 192.0.2.80\nwww IN AAAA 2001:db8::80\n'
  seq 1 100000 | awk '{printf "h%d IN A 10.%d.%d.%d\n", $1, int($1/65536)%256, int($1/256)%256, $1%256}'
} >"$W/bench.test.zone"
{
  printf '$TTL 3600\n@ IN SOA ns.cluster.local. h.cluster.local. 1 3600 600 86400 3600\n@ IN NS ns.cluster.local.\nns IN A %s\n' "$UP"
  seq 1 50 | awk '{printf "svc%d.default.svc IN A 10.96.1.%d\n", $1, $1}'
} >"$W/cluster.local.zone"
nsd_conf "$W" "$UP" bench.test cluster.local
inns taskset -c 1 nsd -c "$W/nsd.conf"
for _ in $(seq 1 100); do inns dig +short +tries=1 +time=1 "@$UP" www.bench.test >/dev/null 2>&1 && break; sleep 0.1; done

# Query files.
printf 'www.bench.test A\nwww.bench.test AAAA\nsvc1.default.svc.cluster.local A\nh1.bench.test A\n' >"$W/hits.txt"
# Kubernetes-like: a pod in namespace "default" looks up external and service names with ndots:5.
{
  for i in $(seq 1 40); do
    for t in A AAAA; do
      n=h$i.bench.test
      printf '%s.default.svc.cluster.local %s\n%s.svc.cluster.local %s\n%s.cluster.local %s\n%s %s\n' \
        "$n" "$t" "$n" "$t" "$n" "$t" "$n" "$t"
      printf 'svc%d.default.svc.cluster.local %s\n' "$i" "$t"
    done
  done
  # a few misses: names asked once
  seq 50001 50040 | awk '{printf "h%d.bench.test A\n", $1}'
} >"$W/k8s.txt"
seq 1 10000 | awk '{printf "h%d.bench.test A\n", $1}' >"$W/fill10k.txt"
seq 1 100000 | awk '{printf "h%d.bench.test A\n", $1}' >"$W/fill100k.txt"

start_server() { # NAME CPUS
  local name=$1 cpus=$2 srv=${ADDR[$1]} threads
  threads=$(($(echo "$cpus" | tr -cd ',-' | wc -c) + 1))
  case "$name" in
    dnslocal)
      cat >"$W/dnslocal.yaml" <<END
apiVersion: v1alpha1
kind: HybridNetConfig
stateDir: $W/state
dataDir: $W/data
dnslocal:
  listen: ["$srv:53"]
  interface: {name: dnslocal0, create: false}
  clusterDomain: cluster.local
  clusterDNS: ["$UP:53"]
  upstreams: ["$UP:53"]
  cache: {size: 200000, maxTTL: 1h, negativeTTL: 5s, serveStale: 1h, prefetch: true}
  admin: 127.0.0.1:7458
  clientRate: 100000000 # dnsperf is one client: the budget is checked on every query but never reached
END
      ip netns exec "$NS" taskset -c "$cpus" "$BIN" run --config "$W/dnslocal.yaml" >"$W/dnslocal.log" 2>&1 &
      ;;
    unbound)
      cat >"$W/unbound.conf" <<END
server:
  interface: $srv
  port: 53
  num-threads: $threads
  so-reuseport: yes
  do-daemonize: no
  use-syslog: no
  logfile: ""
  chroot: ""
  username: ""
  pidfile: "$W/unbound.pid"
  directory: "$W"
  access-control: 0.0.0.0/0 allow
  do-not-query-localhost: no
  module-config: "iterator"
  msg-cache-size: 64m
  rrset-cache-size: 128m
  verbosity: 0
remote-control:
  control-enable: no
forward-zone:
  name: "."
  forward-addr: $UP
END
      ip netns exec "$NS" taskset -c "$cpus" unbound -d -c "$W/unbound.conf" >"$W/unbound.log" 2>&1 &
      ;;
    dnsmasq)
      ip netns exec "$NS" taskset -c "$cpus" dnsmasq -k --conf-file=/dev/null --listen-address="$srv" \
        --bind-interfaces --port 53 --no-resolv --no-hosts --server="$UP" --cache-size=10000 --user=root \
        --pid-file="$W/dnsmasq.pid" >"$W/dnsmasq.log" 2>&1 &
      ;;
  esac
  # `ip netns exec` and taskset exec the server: $! is the server process itself.
  PID[$name]=$!
  for _ in $(seq 1 100); do inns dig +short +tries=1 +time=1 "@$srv" www.bench.test >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$name did not start (log: $W/$name.log)"
}
stop_server() { kill "${PID[$1]}" 2>/dev/null || true; wait "${PID[$1]}" 2>/dev/null || true; unset "PID[$1]"; }

perf() { # SERVER FILE [extra dnsperf args...] -> dnsperf output
  local srv=${ADDR[$1]} file=$2
  shift 2
  inns taskset -c 1 dnsperf -s "$srv" -d "$file" -c 20 -q 200 -t 2 "$@" 2>&1
}

declare -A QPS LAT K8S QPS2 RSS10 RSS100 LOST CPUQ CAP runs kruns runs2 cap
say "starting dnslocal, Unbound and dnsmasq side by side, all on core 0"
for s in "${SERVERS[@]}"; do
  start_server "$s" 0
  perf "$s" "$W/hits.txt" -l 1 >/dev/null
done

say "cache-hit QPS at full load: $ROUNDS round(s) of ${DUR}s per server, interleaved"
for _ in $(seq 1 "$ROUNDS"); do
  for s in "${SERVERS[@]}"; do
    t0=$(cpu_ticks "${PID[$s]}")
    out=$(perf "$s" "$W/hits.txt" -l "$DUR")
    t1=$(cpu_ticks "${PID[$s]}")
    runs[$s]+="$(qps_of <<<"$out") "
    # answers per CPU-second of the server: its capacity when the client is the bottleneck
    cap[$s]+="$(awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v q="$(awk '/Queries completed/ {print $3}' <<<"$out")" \
      'BEGIN {if (t > 0) printf "%d", q / (t / hz); else print 0}') "
    LOST[$s]=$((${LOST[$s]:-0} + $(lost_of <<<"$out")))
  done
done
for s in "${SERVERS[@]}"; do
  QPS[$s]=$(median <<<"${runs[$s]}")
  CAP[$s]=$(median <<<"${cap[$s]}")
  note "$s: ${runs[$s]}-> median ${QPS[$s]}; answers per server CPU-second: ${cap[$s]}-> median ${CAP[$s]}"
done

say "server CPU per query at 40,000 QPS"
for s in "${SERVERS[@]}"; do
  t0=$(cpu_ticks "${PID[$s]}")
  out=$(perf "$s" "$W/hits.txt" -l "$DUR" -Q 40000)
  t1=$(cpu_ticks "${PID[$s]}")
  done_q=$(awk '/Queries completed/ {print $3}' <<<"$out")
  CPUQ[$s]=$(awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v q="$done_q" 'BEGIN {printf "%.1f", t / hz * 1e6 / q}')
  note "$s: ${CPUQ[$s]} us CPU per query"
done

say "latency at 50% of each server's own max (dnsperf -v)"
for s in "${SERVERS[@]}"; do
  perf "$s" "$W/hits.txt" -l "$DUR" -Q $((QPS[$s] / 2)) -v >"$W/latency-$s.txt"
  LAT[$s]=$(latency_of <"$W/latency-$s.txt")
  note "$s at $((QPS[$s] / 2)) QPS: mean/p99 ${LAT[$s]} us"
done

say "Kubernetes-like ndots:5 mix: $ROUNDS round(s), interleaved"
for s in "${SERVERS[@]}"; do perf "$s" "$W/k8s.txt" -n 1 >/dev/null; done
for _ in $(seq 1 "$ROUNDS"); do
  for s in "${SERVERS[@]}"; do kruns[$s]+="$(perf "$s" "$W/k8s.txt" -l "$DUR" | qps_of) "; done
done
for s in "${SERVERS[@]}"; do
  K8S[$s]=$(median <<<"${kruns[$s]}")
  note "$s: ${kruns[$s]}-> median ${K8S[$s]}"
done

say "RSS with 10,000 and 100,000 cached names"
for s in "${SERVERS[@]}"; do
  perf "$s" "$W/fill10k.txt" -n 1 >/dev/null
  RSS10[$s]=$(rss_mib "${PID[$s]}")
  if [ "$s" = dnsmasq ]; then
    RSS100[$s]="- (cache-size max 10000)"
  else
    perf "$s" "$W/fill100k.txt" -n 1 >/dev/null
    RSS100[$s]=$(rss_mib "${PID[$s]}")
  fi
  note "$s: ${RSS10[$s]} / ${RSS100[$s]} MiB"
done

say "two cores (0-1) for dnslocal and Unbound; dnsperf shares core 1"
for s in dnslocal unbound; do
  stop_server "$s"
  start_server "$s" 0-1
  perf "$s" "$W/hits.txt" -l 1 >/dev/null
done
for _ in $(seq 1 "$ROUNDS"); do
  for s in dnslocal unbound; do runs2[$s]+="$(perf "$s" "$W/hits.txt" -l "$DUR" | qps_of) "; done
done
for s in dnslocal unbound; do
  QPS2[$s]=$(median <<<"${runs2[$s]}")
  note "$s: ${runs2[$s]}-> median ${QPS2[$s]}"
done
QPS2[dnsmasq]="- (single-threaded)"

read -r M_dnslocal P_dnslocal <<<"${LAT[dnslocal]}"
read -r M_unbound P_unbound <<<"${LAT[unbound]}"
read -r M_dnsmasq P_dnsmasq <<<"${LAT[dnsmasq]}"
say "results ($(nproc) cores, $(uname -r), ${ROUNDS}x${DUR}s runs, medians; ratios are dnslocal / other)"
{
  printf '\n| measure | dnslocal | Unbound | dnsmasq | vs Unbound | vs dnsmasq |\n|---|---|---|---|---|---|\n'
  printf '| cache-hit QPS, server on 1 core | %s | %s | %s | %s | %s |\n' "${QPS[dnslocal]}" "${QPS[unbound]}" "${QPS[dnsmasq]}" \
    "$(ratio "${QPS[dnslocal]}" "${QPS[unbound]}")" "$(ratio "${QPS[dnslocal]}" "${QPS[dnsmasq]}")"
  printf '| cache hits answered per server CPU-second at full load | %s | %s | %s | %s | %s |\n' "${CAP[dnslocal]}" "${CAP[unbound]}" "${CAP[dnsmasq]}" \
    "$(ratio "${CAP[dnslocal]}" "${CAP[unbound]}")" "$(ratio "${CAP[dnslocal]}" "${CAP[dnsmasq]}")"
  printf '| server CPU per cache hit at 40k QPS (us, lower is better) | %s | %s | %s | %s | %s |\n' \
    "${CPUQ[dnslocal]}" "${CPUQ[unbound]}" "${CPUQ[dnsmasq]}" \
    "$(ratio "${CPUQ[dnslocal]}" "${CPUQ[unbound]}")" "$(ratio "${CPUQ[dnslocal]}" "${CPUQ[dnsmasq]}")"
  printf '| mean latency at 50%% of own max (us) | %s | %s | %s | %s | %s |\n' "$M_dnslocal" "$M_unbound" "$M_dnsmasq" \
    "$(ratio "$M_dnslocal" "$M_unbound")" "$(ratio "$M_dnslocal" "$M_dnsmasq")"
  printf '| p99 latency at 50%% of own max (us) | %s | %s | %s | %s | %s |\n' "$P_dnslocal" "$P_unbound" "$P_dnsmasq" \
    "$(ratio "$P_dnslocal" "$P_unbound")" "$(ratio "$P_dnslocal" "$P_dnsmasq")"
  printf '| Kubernetes ndots:5 mix QPS, 1 core | %s | %s | %s | %s | %s |\n' "${K8S[dnslocal]}" "${K8S[unbound]}" "${K8S[dnsmasq]}" \
    "$(ratio "${K8S[dnslocal]}" "${K8S[unbound]}")" "$(ratio "${K8S[dnslocal]}" "${K8S[dnsmasq]}")"
  printf '| cache-hit QPS, cores 0-1 (dnsperf shares core 1) | %s | %s | %s | %s | - |\n' \
    "${QPS2[dnslocal]}" "${QPS2[unbound]}" "${QPS2[dnsmasq]}" "$(ratio "${QPS2[dnslocal]}" "${QPS2[unbound]}")"
  printf '| RSS with 10,000 cached names (MiB) | %s | %s | %s | - | - |\n' "${RSS10[dnslocal]}" "${RSS10[unbound]}" "${RSS10[dnsmasq]}"
  printf '| RSS with 100,000 cached names (MiB) | %s | %s | %s | - | - |\n' "${RSS100[dnslocal]}" "${RSS100[unbound]}" "${RSS100[dnsmasq]}"
  printf '| queries lost in the full-load runs | %s | %s | %s | - | - |\n\n' "${LOST[dnslocal]}" "${LOST[unbound]}" "${LOST[dnsmasq]}"
} | tee "${BENCH_OUT:-/dev/null}"

#!/usr/bin/env bash
# apiprism against HAProxy (Debian's package, configured as kubespray does: TCP mode, `balance leastconn`) and
# against a direct connection, in one run on this machine, all traffic inside private network namespaces.
#
#   hack/bench/apiprism.sh [--quick]      (root; installs haproxy)
#
# The proxies run on core 0 (taskset), load tools and servers on core 1. Measured (release build):
#   1. bulk throughput, one stream from a data source through the proxy (Gbit/s);
#   2. 1 KiB request/response round trips on one connection per path, the three paths taking turns (one round
#      trip direct, one through apiprism, one through HAProxy, again), so that noise from the rest of the
#      machine hits all three alike: p50/p90/p99/p99.9, and what the proxy adds over direct;
#   3. new connections per second (connect, 64 B echo, close; 8 at a time);
#   4. failover with three upstreams (echo servers in their own namespaces on a bridge): a new connection
#      every 10 ms plus one long-lived connection; the upstream holding the long-lived one is SIGKILLed, or
#      blackholed (a blackhole route in its namespace); failed connections, time from the fault to the last
#      failure, and when the long-lived connection was cut. HAProxy: `inter 1s fall 2 rise 2`,
#      `option redispatch`, `retries 3`, `timeout connect 1s` (apiprism's dialTimeout; kubespray uses 30s);
#      apiprism: its defaults (1 s checks, fall 2, rise 2, dial timeout 1 s);
#   5. RSS idle, and with 10,000 idle connections through the proxy.
# Prints a table with ratios, and writes it as CSV with the latency percentiles drawn per path
# (hack/bench/plot.sh) into $APIPRISM_BENCH_OUT (default docs/benchmarks/): apiprism.csv,
# apiprism-latency.csv, apiprism-latency.svg. --quick: shorter runs.
# APIPRISM_BENCH_BINS=DIR: run the apiprism and apiprism-bench binaries in DIR instead of building (to compare
# two builds with the same script).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../lib/common.sh
. hack/lib/common.sh
# shellcheck source=lib.sh
. hack/bench/lib.sh
# shellcheck source=../lib/netlab.sh
. hack/lib/netlab.sh
# shellcheck source=plot.sh
. hack/bench/plot.sh

DUR=5 RR=20000
# 10,000 idle connections need 20,000 descriptors in the proxy (client and upstream sides). Where the hard
# limit is lower (this CI container: 20,000, not raisable), measure as many as fit and scale the growth.
IDLE=10000 FD_HARD=$(ulimit -Hn)
if [ "$FD_HARD" != unlimited ] && [ "$FD_HARD" -lt 20500 ]; then IDLE=$(((FD_HARD - 2000) / 2 / 100 * 100)); fi
if [ "${1:-}" = "--quick" ]; then DUR=2 RR=5000; fi
require_root "network namespaces"
ensure_pkgs haproxy:haproxy taskset:util-linux ss:iproute2
[ "$(nproc)" -ge 2 ] || die "needs 2 cores (proxies on core 0, tools on core 1)"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ -n "${APIPRISM_BENCH_BINS:-}" ]; then
  AP=$APIPRISM_BENCH_BINS/apiprism T=$APIPRISM_BENCH_BINS/apiprism-bench
  [ -x "$AP" ] && [ -x "$T" ] || die "APIPRISM_BENCH_BINS=$APIPRISM_BENCH_BINS: no apiprism and apiprism-bench there"
else
  say "building apiprism and the load tool (release)"
  cargo build --release -q -p hybridnet-apiprism --bins --example apiprism-bench
  AP=$PWD/target/release/apiprism
  T=$PWD/target/release/examples/apiprism-bench
fi
OUT=${APIPRISM_BENCH_OUT:-docs/benchmarks}
mkdir -p "$OUT"

P=apb$$
C=${P}c SW=${P}sw
W=$(mktemp -d /tmp/apiprism-bench.XXXXXX)
cleanup() {
  for ns in $(netlab_list "$P"); do netlab_del_ns "$ns"; done
  rm -rf "$W"
}
trap cleanup EXIT

netlab_switch "$SW" br0
netlab_node "$SW" br0 "$C" pc 192.0.2.10/24 2001:db8::10/64
for i in 1 2 3; do
  netlab_node "$SW" br0 "${P}s$i" "p$i" "192.0.2.2$i/24" "2001:db8::2$i/64"
done
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# bg NS CORE NAME CMD...: starts CMD in NS pinned to CORE, pid in $W/NAME.pid, output in $W/NAME.log.
bg() {
  local ns=$1 core=$2 name=$3; shift 3
  ip netns exec "$ns" taskset -c "$core" "$@" >"$W/$name.log" 2>&1 &
  echo $! >"$W/$name.pid"
}
pid() { cat "$W/$1.pid"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
wait_port() { # NS ADDR PORT
  for _ in $(seq 1 100); do
    inns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null && return 0
    sleep 0.05
  done
  die "nothing listens on $2:$3 in $1"
}

say "servers: echo and source on loopback (data path); echo on three upstreams (failover)"
bg "$C" 1 echo "$T" echo 127.0.0.1:9001
bg "$C" 1 source "$T" source 127.0.0.1:9002
start_upstream() { bg "${P}s$1" 1 "up$1" "$T" echo "192.0.2.2$1:6443"; }
for i in 1 2 3; do start_upstream "$i"; done

# The connection limits as HAProxy's maxconn: the idle-connection run opens them all from one address (by
# default one client may hold half of apiprism's limit).
apiprism_config() { # NAME PORT ENDPOINTS
  cat >"$W/$1.yaml" <<EOF
apiVersion: v1alpha1
kind: HybridNetConfig
stateDir: $W/$1-state
dataDir: $W/$1-data
apiprism: {listen: ["127.0.0.1:$2"], endpoints: [$3], admin: "127.0.0.1:$(($2 + 1))",
  maxConnections: $((IDLE + 500)), maxConnectionsPerClient: $((IDLE + 500))}
EOF
}
apiprism_config ap-echo 7445 '"127.0.0.1:9001"'
apiprism_config ap-src 7455 '"127.0.0.1:9002"'
apiprism_config ap-kube 7465 '"192.0.2.21:6443", "192.0.2.22:6443", "192.0.2.23:6443"'
for n in ap-echo ap-src ap-kube; do bg "$C" 0 "$n" env APIPRISM_LOG=warn "$AP" run --config "$W/$n.yaml"; done

cat >"$W/haproxy.cfg" <<EOF
global
  maxconn $((IDLE + 500))
defaults
  mode tcp
  timeout connect 1s
  timeout client 15m
  timeout server 15m
  retries 3
  option redispatch
frontend echo
  bind 127.0.0.1:7500
  default_backend echo
backend echo
  balance leastconn
  server e 127.0.0.1:9001
frontend src
  bind 127.0.0.1:7501
  default_backend src
backend src
  balance leastconn
  server s 127.0.0.1:9002
frontend kube
  bind 127.0.0.1:7502
  default_backend kube
backend kube
  balance leastconn
  default-server inter 1s fall 2 rise 2
  server s1 192.0.2.21:6443 check
  server s2 192.0.2.22:6443 check
  server s3 192.0.2.23:6443 check
EOF
bg "$C" 0 haproxy haproxy -db -f "$W/haproxy.cfg"
for port in 9001 9002 7445 7455 7465 7500 7501 7502; do wait_port "$C" 127.0.0.1 "$port"; done
sleep 2 # first health checks

declare -A R
tool() { inns "$C" taskset -c 1 "$T" "$@"; }
field() { awk -v k="$1" '{ for (i = 1; i < NF; i++) if ($i == k) print $(i + 1) }'; }

R[rss_idle_ap]=$(rss_kib "$(pid ap-kube)")
R[rss_idle_echo]=$(rss_kib "$(pid ap-echo)")
R[rss_idle_ha]=$(rss_kib "$(pid haproxy)")

say "bulk throughput (${DUR}s, 1 stream)"
R[bulk_direct]=$(tool bulk 127.0.0.1:9002 "$DUR" 1 | field gbit_per_s)
R[bulk_ap]=$(tool bulk 127.0.0.1:7455 "$DUR" 1 | field gbit_per_s)
R[bulk_ha]=$(tool bulk 127.0.0.1:7501 "$DUR" 1 | field gbit_per_s)
note "direct ${R[bulk_direct]}  apiprism ${R[bulk_ap]}  haproxy ${R[bulk_ha]} Gbit/s"

say "1 KiB round trips ($RR on one connection per path, the paths taking turns)"
out=$(tool rr 127.0.0.1:9001,127.0.0.1:7445,127.0.0.1:7500 "$RR" 1024)
for k in direct:9001 ap:7445 ha:7500; do
  line=$(echo "$out" | grep "^127.0.0.1:${k#*:} ")
  for p in p50 p90 p99 p999 max; do R[${p}_${k%%:*}]=$(echo "$line" | field "${p}_us"); done
  note "${k%%:*}: ${line#* }"
done

say "new connections per second (${DUR}s, 8 at a time)"
for k in direct:9001 ap:7445 ha:7500; do
  R[cps_${k%%:*}]=$(tool connrate "127.0.0.1:${k#*:}" "$DUR" 8 | field conns_per_s)
  note "${k%%:*}: ${R[cps_${k%%:*}]}/s"
done

# The fault script: picks the upstream that holds the long-lived connection (the only one that has received
# more than a few KiB), SIGKILLs it or blackholes it towards the client node.
cat >"$W/fault.sh" <<EOF
#!/usr/bin/env bash
best=1; most=-1
for i in 1 2 3; do
  n=\$(ip netns exec ${P}s\$i ss -Htin state established '( sport = :6443 )' |
    grep -o 'bytes_received:[0-9]*' | cut -d: -f2 | sort -n | tail -1)
  n=\${n:-0}
  if [ "\$n" -gt "\$most" ]; then best=\$i; most=\$n; fi
done
echo \$best >"$W/victim"
case \$1 in
  kill) kill -KILL "\$(cat "$W/up\$best.pid")" ;;
  blackhole) ip -n ${P}s\$best route add blackhole 192.0.2.10/32 ;;
esac
EOF
chmod +x "$W/fault.sh"

repair() { # FAULT
  local v; v=$(cat "$W/victim")
  case $1 in
    kill) start_upstream "$v"; wait_port "${P}s$v" "192.0.2.2$v" 6443 ;;
    blackhole) ip -n "${P}s$v" route del blackhole 192.0.2.10/32 ;;
  esac
  sleep 3 # back in both proxies' rotation (rise 2 at 1 s)
}

FO_SECS=6
[ "$DUR" -lt 5 ] && FO_SECS=4
for fault in kill blackhole; do
  for k in ap:7465 ha:7502; do
    say "failover: $fault, through ${k%%:*} (${FO_SECS}s, a new connection every 10 ms, fault at 1 s)"
    out=$(tool failover "127.0.0.1:${k#*:}" "$FO_SECS" 10 1000 "$W/fault.sh $fault")
    note "$out (upstream $(cat "$W/victim"))"
    R[fo_${fault}_${k%%:*}_failed]=$(echo "$out" | field failed)
    R[fo_${fault}_${k%%:*}_full]=$(echo "$out" | field full_success_ms)
    R[fo_${fault}_${k%%:*}_cut]=$(echo "$out" | field long_lived_cut_ms)
    R[fo_${fault}_${k%%:*}_stall]=$(echo "$out" | field long_lived_stalled_ms)
    repair "$fault"
  done
done

say "RSS with $IDLE idle connections (scaled to 10,000 in the table)"
for k in ap:7445:ap-echo ha:7500:haproxy; do
  IFS=: read -r name port proc <<<"$k"
  fifo=$W/idle-$name
  inns "$C" taskset -c 1 "$T" idle "127.0.0.1:$port" "$IDLE" 3 >"$fifo" 2>&1 &
  idle_pid=$!
  for _ in $(seq 1 600); do grep -q '^open' "$fifo" && break; sleep 0.1; done
  grep -q '^open' "$fifo" || { cat "$fifo"; die "could not open $IDLE connections through $name"; }
  R[rss_10k_$name]=$(rss_kib "$(pid "$proc")")
  wait "$idle_pid" || true
  note "$name: $(mib "${R[rss_10k_$name]}") MiB"
done
# Scale the growth to 10,000 when fewer fit under the descriptor limit.
for name in ap ha; do
  idle=${R[rss_idle_$name]}
  [ "$name" = ap ] && idle=${R[rss_idle_echo]}
  R[rss_10k_$name]=$(awk -v i="$idle" -v m="${R[rss_10k_$name]}" -v n="$IDLE" 'BEGIN { printf "%d", i + (m - i) * 10000 / n }')
done

sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }

printf '\n%-44s %10s %10s %10s %12s\n' "" direct apiprism haproxy "apiprism/HA"
row() { printf '%-44s %10s %10s %10s %12s\n' "$@"; }
row "bulk throughput, 1 stream (Gbit/s)" "${R[bulk_direct]}" "${R[bulk_ap]}" "${R[bulk_ha]}" "$(ratio "${R[bulk_ap]}" "${R[bulk_ha]}")"
row "1 KiB RR p50 (us)" "${R[p50_direct]}" "${R[p50_ap]}" "${R[p50_ha]}" "$(ratio "${R[p50_ap]}" "${R[p50_ha]}")"
a50=$(sub "${R[p50_ap]}" "${R[p50_direct]}"); h50=$(sub "${R[p50_ha]}" "${R[p50_direct]}")
row "  added over direct, p50 (us)" "" "$a50" "$h50" "$(ratio "$a50" "$h50")"
row "1 KiB RR p99 (us)" "${R[p99_direct]}" "${R[p99_ap]}" "${R[p99_ha]}" "$(ratio "${R[p99_ap]}" "${R[p99_ha]}")"
a99=$(sub "${R[p99_ap]}" "${R[p99_direct]}"); h99=$(sub "${R[p99_ha]}" "${R[p99_direct]}")
row "  added over direct, p99 (us)" "" "$a99" "$h99" "$(ratio "$a99" "$h99")"
row "1 KiB RR p99.9 (us)" "${R[p999_direct]}" "${R[p999_ap]}" "${R[p999_ha]}" "$(ratio "${R[p999_ap]}" "${R[p999_ha]}")"
row "new connections/s" "${R[cps_direct]}" "${R[cps_ap]}" "${R[cps_ha]}" "$(ratio "${R[cps_ap]}" "${R[cps_ha]}")"
for fault in kill blackhole; do
  label=SIGKILL; [ "$fault" = blackhole ] && label=blackhole
  row "$label: failed new connections" "" "${R[fo_${fault}_ap_failed]}" "${R[fo_${fault}_ha_failed]}" ""
  row "$label: fault to full success (ms)" "" "${R[fo_${fault}_ap_full]}" "${R[fo_${fault}_ha_full]}" ""
  row "$label: long-lived connection closed after (ms)" "" "${R[fo_${fault}_ap_cut]}" "${R[fo_${fault}_ha_cut]}" ""
  row "$label: long-lived connection stalled after (ms)" "" "${R[fo_${fault}_ap_stall]}" "${R[fo_${fault}_ha_stall]}" ""
done
row "RSS idle (MiB)" "" "$(mib "${R[rss_idle_ap]}")" "$(mib "${R[rss_idle_ha]}")" "$(ratio "${R[rss_idle_ap]}" "${R[rss_idle_ha]}")"
row "RSS with 10,000 idle connections (MiB)" "" "$(mib "${R[rss_10k_ap]}")" "$(mib "${R[rss_10k_ha]}")" "$(ratio "${R[rss_10k_ap]}" "${R[rss_10k_ha]}")"
printf '\n(%s; %s; HAProxy %s)\n' "$(date -u +%Y-%m-%d)" "$(nproc) cores" "$(haproxy -v | awk 'NR == 1 { print $3 }')"

# CSV (the table, and the latency percentiles per path) and the latency plot.
{
  echo "what,direct,apiprism,haproxy"
  echo "bulk_gbit_per_s,${R[bulk_direct]},${R[bulk_ap]},${R[bulk_ha]}"
  for p in p50 p90 p99 p999 max; do echo "rr_${p}_us,${R[${p}_direct]},${R[${p}_ap]},${R[${p}_ha]}"; done
  echo "rr_p50_added_us,,$a50,$h50"
  echo "rr_p99_added_us,,$a99,$h99"
  echo "conns_per_s,${R[cps_direct]},${R[cps_ap]},${R[cps_ha]}"
  for fault in kill blackhole; do
    for m in failed full cut stall; do echo "${fault}_${m},,${R[fo_${fault}_ap_${m}]},${R[fo_${fault}_ha_${m}]}"; done
  done
  echo "rss_idle_kib,,${R[rss_idle_ap]},${R[rss_idle_ha]}"
  echo "rss_10k_kib,,${R[rss_10k_ap]},${R[rss_10k_ha]}"
} >"$OUT/apiprism.csv"
{
  echo "percentile,direct,apiprism,HAProxy"
  for p in p50 p90 p99 p999; do
    label=$p; [ "$p" = p999 ] && label=p99.9
    echo "$label,${R[${p}_direct]},${R[${p}_ap]},${R[${p}_ha]}"
  done
} >"$OUT/apiprism-latency.csv"
plot_init
plot_bars "$OUT/apiprism-latency.csv" "$OUT/apiprism-latency.svg" \
  "1 KiB request/response round trips, one connection per path, taking turns" "microseconds (log scale)" logy
note "wrote $OUT/apiprism.csv, $OUT/apiprism-latency.csv, $OUT/apiprism-latency.svg"

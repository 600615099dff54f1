#!/usr/bin/env bash
# dnslocal's cluster zone: `clusterZone: kubernetes` (answered from Services and EndpointSlices) against
# `clusterZone: forward` (today's path: cached, forwarded to a kube-dns stand-in) in front of the same data
# served by NSD. Run through `hack/bench/dnslocal.sh --cluster-zone [--quick]` (root).
#
# Data: 10,000 Services (two thirds ClusterIP, one third headless), one EndpointSlice of 10 ready endpoints
# each (100,000 endpoints), as API lists (hack/bench/kube-api-stub.py: a read-only API stand-in, since no
# kube-apiserver can run here) and as the same A records in an NSD zone (TTL 5 s, CoreDNS's default).
# Both dnslocal instances run side by side on core 0, dnsperf on core 1, interleaved rounds (medians):
#   1. QPS at full load on 1,000 service names (A), both modes;
#   2. mean / p99 latency at the same fixed rate (half the forward mode's max);
#   3. RSS of each instance with the whole cluster held (kubernetes) or its answers cached (forward);
#   4. time from start to the first answer from the API lists (10k / 100k).
# Writes docs/benchmarks/dnslocal-zone.csv and .svg (hack/bench/plot.sh). DNSLOCAL_BIN overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../lib/common.sh
. hack/lib/common.sh
# shellcheck source=lib.sh
. hack/bench/lib.sh
# shellcheck source=plot.sh
. hack/bench/plot.sh

DUR=5 ROUNDS=3
[ "${1:-}" = "--quick" ] && DUR=3 ROUNDS=1
require_root "network namespaces, binding port 53"
ensure_pkgs nsd:nsd dnsperf:dnsperf dig:bind9-dnsutils taskset:util-linux python3:python3
plot_init
[ "$(nproc)" -ge 2 ] || die "needs 2 cores (servers on core 0, dnsperf on core 1)"

if [ -z "${DNSLOCAL_BIN:-}" ]; then
  say "building dnslocal (release)"
  cargo build --release -q -p hybridnet-dnslocal
fi
BIN=${DNSLOCAL_BIN:-$PWD/target/release/dnslocal}

NS=dlzone-$$
W=$(mktemp -d /tmp/dnslocal-zone.XXXXXX)
UP=127.0.0.11 API=127.0.0.1:16443
declare -A ADDR=([forward]=127.0.0.20 [kubernetes]=127.0.0.21) ADMIN=([forward]=7468 [kubernetes]=7469) PID=()
MODES=(forward kubernetes)
STUB=""
cleanup() {
  local p
  for p in "${PID[@]}" $STUB; do kill "$p" 2>/dev/null || true; done
  [ -f "$W/nsd.pid" ] && kill "$(cat "$W/nsd.pid")" 2>/dev/null || true
  sleep 0.3
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$W" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$NS"
ip -n "$NS" link set lo up
inns() { ip netns exec "$NS" "$@"; }

say "10,000 Services and 100,000 endpoints: API lists and the same records in an NSD zone"
python3 - "$W" <<'END'
import json, sys
w = sys.argv[1]
services, slices, zone, names = [], [], [], []
for i in range(10000):
    ns, name = f"team-{i % 200}", f"service-{i}"
    headless = i % 3 == 0
    cip = "None" if headless else f"10.96.{i >> 8}.{i & 255}"
    services.append({"metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
                     "spec": {"type": "ClusterIP", "clusterIP": cip, "clusterIPs": [cip],
                              "ports": [{"name": "http", "protocol": "TCP", "port": 80}]}})
    eps = []
    for e in range(10):
        n = i * 10 + e
        ip = f"10.{128 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"
        eps.append({"addresses": [ip], "conditions": {"ready": True}, "zone": f"zone-{e % 3}"})
        if headless:
            zone.append(f"{name}.{ns}.svc IN A {ip}")
    if not headless:
        zone.append(f"{name}.{ns}.svc IN A {cip}")
    slices.append({"metadata": {"name": f"{name}-x", "namespace": ns, "resourceVersion": "1",
                                "labels": {"kubernetes.io/service-name": name}},
                   "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
                   "endpoints": eps})
    if i % 10 == 0:
        names.append(f"{name}.{ns}.svc.cluster.local A")
json.dump({"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": services},
          open(f"{w}/services.json", "w"))
json.dump({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": "1"},
           "items": slices}, open(f"{w}/endpointslices.json", "w"))
with open(f"{w}/cluster.local.zone", "w") as f:
    f.write("$TTL 5\n@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n"
            "@ IN NS ns.dns.cluster.local.\nns.dns IN A 127.0.0.11\n")
    f.write("\n".join(zone) + "\n")
open(f"{w}/names.txt", "w").write("\n".join(names) + "\n")
END
nsd_conf "$W" "$UP" cluster.local
inns taskset -c 1 nsd -c "$W/nsd.conf"
for _ in $(seq 1 100); do inns dig +short +tries=1 +time=1 "@$UP" service-1.team-1.svc.cluster.local >/dev/null 2>&1 && break; sleep 0.1; done
ip netns exec "$NS" taskset -c 1 python3 hack/bench/kube-api-stub.py "$W" "${API%:*}" "${API#*:}" &
STUB=$!
cat >"$W/kubeconfig" <<END
apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster: {server: "http://$API"}
users:
- name: bench
  user: {token: bench}
contexts:
- name: bench
  context: {cluster: bench, user: bench}
current-context: bench
END

start_mode() { # MODE
  local mode=$1 srv=${ADDR[$1]} t0
  cat >"$W/$mode.yaml" <<END
apiVersion: v1alpha1
kind: HybridNetConfig
stateDir: $W/state-$mode
dataDir: $W/data-$mode
dnslocal:
  listen: ["$srv:53"]
  interface: {name: dnslocal0, create: false}
  clusterDomain: cluster.local
  clusterDNS: ["$UP:53"]
  upstreams: ["$UP:53"]
  cache: {size: 200000, maxTTL: 1h, negativeTTL: 5s, serveStale: 1h, prefetch: true}
  admin: 127.0.0.1:${ADMIN[$mode]}
  clientRate: 100000000
  clusterZone: $mode
  kubeconfig: $W/kubeconfig
END
  t0=$(date +%s.%N)
  NODE_NAME=bench ip netns exec "$NS" taskset -c 0 "$BIN" run --config "$W/$mode.yaml" >"$W/$mode.log" 2>&1 &
  PID[$mode]=$!
  # kubernetes: the first answer from the lists (authoritative: before them, cluster names are forwarded)
  local want='IN.A.10\.96\.0\.1$'
  [ "$mode" = kubernetes ] && want='flags: qr aa'
  for _ in $(seq 1 600); do
    if inns dig +tries=1 +time=1 "@$srv" service-1.team-1.svc.cluster.local 2>/dev/null | grep -q "$want"; then
      STARTUP[$mode]=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')
      return 0
    fi
    sleep 0.05
  done
  die "$mode did not answer (log: $W/$mode.log)"
}
perf() { # MODE [dnsperf args...]
  local srv=${ADDR[$1]}
  shift
  inns taskset -c 1 dnsperf -s "$srv" -d "$W/names.txt" -c 20 -q 200 "$@" 2>&1
}

declare -A STARTUP QPS LAT RSS runs
say "starting dnslocal twice on core 0: clusterZone forward (to NSD) and kubernetes (the API lists)"
for m in "${MODES[@]}"; do
  start_mode "$m"
  note "$m: first answer ${STARTUP[$m]} s after start"
  perf "$m" -n 1 >/dev/null # warm: the forward mode's cache, the kubernetes mode's code paths
done

say "QPS at full load on 1,000 service names: $ROUNDS round(s) of ${DUR}s, interleaved"
for _ in $(seq 1 "$ROUNDS"); do
  for m in "${MODES[@]}"; do runs[$m]+="$(perf "$m" -l "$DUR" | qps_of) "; done
done
for m in "${MODES[@]}"; do
  QPS[$m]=$(median <<<"${runs[$m]}")
  note "$m: ${runs[$m]}-> median ${QPS[$m]}"
done

RATE=$((QPS[forward] / 2))
say "latency at $RATE QPS (half the forward mode's max), both"
for m in "${MODES[@]}"; do
  perf "$m" -l "$DUR" -Q "$RATE" -v >"$W/latency-$m.txt"
  LAT[$m]=$(latency_of <"$W/latency-$m.txt")
  note "$m: mean/p99 ${LAT[$m]} us"
done

for m in "${MODES[@]}"; do RSS[$m]=$(rss_mib "${PID[$m]}"); done
read -r M_f P_f <<<"${LAT[forward]}"
read -r M_k P_k <<<"${LAT[kubernetes]}"
say "results ($(nproc) cores, $(uname -r), ${ROUNDS}x${DUR}s runs, medians; ratio kubernetes / forward)"
{
  printf '\n| measure | kubernetes | forward | ratio |\n|---|---|---|---|\n'
  printf '| cluster-name QPS, server on 1 core | %s | %s | %s |\n' "${QPS[kubernetes]}" "${QPS[forward]}" "$(ratio "${QPS[kubernetes]}" "${QPS[forward]}")"
  printf '| mean latency at %s QPS (us) | %s | %s | %s |\n' "$RATE" "$M_k" "$M_f" "$(ratio "$M_k" "$M_f")"
  printf '| p99 latency at %s QPS (us) | %s | %s | %s |\n' "$RATE" "$P_k" "$P_f" "$(ratio "$P_k" "$P_f")"
  printf '| RSS, 10,000 services / 100,000 endpoints held (MiB) | %s | %s (1,000 names cached) | - |\n' "${RSS[kubernetes]}" "${RSS[forward]}"
  printf '| start to first cluster answer (s) | %s | %s | - |\n\n' "${STARTUP[kubernetes]}" "${STARTUP[forward]}"
} | tee "${BENCH_OUT:-/dev/null}"
mkdir -p docs/benchmarks
printf 'what,kubernetes,forward\nQPS (thousands),%s,%s\nmean latency (us),%s,%s\np99 latency (us),%s,%s\n' \
  "$((QPS[kubernetes] / 1000))" "$((QPS[forward] / 1000))" "$M_k" "$M_f" "$P_k" "$P_f" >docs/benchmarks/dnslocal-zone.csv
plot_bars docs/benchmarks/dnslocal-zone.csv docs/benchmarks/dnslocal-zone.svg \
  "dnslocal cluster names: clusterZone kubernetes vs forward (NSD)" "value"
note "wrote docs/benchmarks/dnslocal-zone.csv and .svg"

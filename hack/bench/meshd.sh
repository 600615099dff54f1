#!/usr/bin/env bash
# meshd against KubeSpan's constants, on this machine, in network namespaces (userspace backend: this
# kernel has no WireGuard). Runs the `#[ignore]`d benchmarks in integration/tests/meshd_bench.rs against the
# release binary and prints a table:
#   1. join: N nodes (4, 8, 16) restarted at once with known peers; time until every node sees every peer up;
#   2. failover: 20 cuts of the active (private) path of a busy peer (5 pings/s); time until the peer is up on
#      the public path (p50, p99, max), against KubeSpan's 130-305 s (275 s down threshold, 30 s tick, one
#      candidate at a time);
#   3. throughput: iperf3 through the userspace mesh vs the raw veth path, meshd CPU seconds per Gbit;
#   4. reconcile: 5,000 simulated peers (MESHD_BENCH_RECONCILE_PEERS); the first pass, then one peer changing
#      (WireGuard and route operations);
#   5. topology location (integration/tests/meshd_topology_bench.rs): 20 kills (links down) of a location's active
#      gateway; time until the private node routes through the standby and the remote gateway has moved too
#      (p50, p99, max), against Kilo's 60-90 s re-election (or never, for a leader that is up but not forwarding);
#   6. NAT: 5 fresh labs; time from the daemons' start (discovery included) until a cone<->cone pair pings
#      directly and a symmetric<->symmetric pair pings through the relay (KubeSpan and Kilo: never).
#
#   hack/bench/meshd.sh            (root; installs iperf3, iputils-ping)
#   MESHD_BENCH_FAILOVERS=5 hack/bench/meshd.sh   fewer failovers (also fewer gateway kills)
#   MESHD_BENCH_NAT_TRIALS=2 hack/bench/meshd.sh  fewer NAT labs
#   7. probing (crates/meshd/src/probing/tests.rs, no root): the real peer machines and probe planning under
#      simulated time: probe packets per second per node against the number of peers, today's policy against
#      the one before (every active path 4/s), and the failover distribution of a busy peer.
#   MESHD_BENCH_SIM_ONLY=1 hack/bench/meshd.sh    only the simulation (7), no root needed
#
# Writes CSV and SVG plots into docs/benchmarks/ (hack/bench/plot.sh): meshd-probe-rate (packets/s against
# peers, before and after), meshd-failover (failover CDF: the namespace lab's cuts and the simulation's).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../lib/common.sh
. hack/lib/common.sh
# shellcheck source=plot.sh
. hack/bench/plot.sh

plot_init
csv_dir=$PWD/docs/benchmarks
mkdir -p "$csv_dir"
say "probing simulation (release): 100, 1,000 and 5,000 peers, before and after"
sim=$(mktemp /tmp/meshd-bench-sim.XXXXXX)
MESHD_BENCH_CSV_DIR=$csv_dir cargo test --release -q -p hybridnet-meshd --lib probing::tests::bench_probing -- \
  --ignored --nocapture 2>&1 | tee "$sim" | grep -E '^BENCH|panicked|FAILED' || true
grep -q 'test result: ok' "$sim" || die "the probing simulation failed (output above)"
sv() { grep -o 'BENCH .*' "$sim" | awk -v k="$1" '$2 == k { print $3 }'; }
plot_lines "$csv_dir/meshd-probe-rate.csv" "$csv_dir/meshd-probe-rate.svg" \
  "meshd probe packets per node (in + out), full mesh, 10% of peers busy" "peers" "packets/s" logx
printf '\n%-52s %12s %12s %8s\n' "probing (simulated time, real scheduler)" "before" "after" "ratio"
for n in 100 1000 5000; do
  printf '%-52s %12s %12s %8s\n' "probe packets/s per node, full mesh, $n peers" "$(sv "probe_pps_${n}_before")" \
    "$(sv "probe_pps_${n}_after")" "$(awk -v a="$(sv "probe_pps_${n}_after")" -v b="$(sv "probe_pps_${n}_before")" 'BEGIN{printf "%.0fx", b/a}')"
done
printf '%-52s %12s %12s\n' "1,000 nodes / 10 locations: private node" "$(sv probe_pps_locations_private_before)" "$(sv probe_pps_locations_private)"
printf '%-52s %12s %12s\n' "1,000 nodes / 10 locations: active gateway" "$(sv probe_pps_locations_gateway_before)" "$(sv probe_pps_locations_gateway)"
printf '%-52s %12s %12s\n' "busy peer failover p50 / p99 (s)" "$(sv failover_sim_before_p50_s) / $(sv failover_sim_before_p99_s)" \
  "$(sv failover_sim_after_p50_s) / $(sv failover_sim_after_p99_s)"
printf '%-52s %12s\n' "per-peer bytes (+ Prometheus series)" "$(sv per_peer_bytes) (+$(sv per_peer_metric_bytes))"
if [ -n "${MESHD_BENCH_SIM_ONLY:-}" ]; then
  plot_cdf "$csv_dir/meshd-failover-sim.csv" "$csv_dir/meshd-failover.svg" \
    "meshd failover of a busy peer (simulated time)" "seconds from the cut to the switch"
  rm -f "$sim"
  exit 0
fi

require_root "network namespaces"
ensure_pkgs iperf3:iperf3 ping:iputils-ping

say "building meshd (release) and the benchmarks"
cargo build --release -q -p hybridnet-meshd
out=$(mktemp /tmp/meshd-bench.XXXXXX)
trap 'rm -f "$out"' EXIT
say "running (about 3 minutes)"
HYBRIDNET_BIN_DIR=$PWD/target/release cargo test --release -q -p hybridnet-integration --test meshd_bench -- \
  --ignored --nocapture --test-threads 1 2>&1 | tee "$out" | grep -E '^BENCH|panicked|FAILED' || true
grep -q 'test result: ok' "$out" || die "a benchmark failed (output above)"
out2=$(mktemp /tmp/meshd-bench-topology.XXXXXX)
trap 'rm -f "$out" "$out2"' EXIT
HYBRIDNET_BIN_DIR=$PWD/target/release cargo test --release -q -p hybridnet-integration --test meshd_topology_bench -- \
  --ignored --nocapture --test-threads 1 2>&1 | tee "$out2" | grep -E '^BENCH|panicked|FAILED' || true
grep -q 'test result: ok' "$out2" || die "a topology benchmark failed (output above)"
cat "$out2" >> "$out"
v() { grep -o 'BENCH .*' "$out" | awk -v k="$1" '$2 == k { print $3 }'; }
# The failover CDF: the lab's cuts (this build) beside the simulation's before and after.
{
  printf 'lab (namespaces; release),%s\n' "$(head -n1 "$csv_dir/meshd-failover-sim.csv")"
  paste -d, <(v failover_samples_s | tr ';' '\n') <(tail -n +2 "$csv_dir/meshd-failover-sim.csv")
} > "$csv_dir/meshd-failover.csv"
plot_cdf "$csv_dir/meshd-failover.csv" "$csv_dir/meshd-failover.svg" \
  "meshd failover of a busy peer" "seconds from the cut to the switch"
rm -f "$sim"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.0fx", b / a; else print "-" }'; }
printf '\n%-44s %12s %22s %8s\n' "meshd ($(nproc) cores, $(uname -r))" "meshd" "KubeSpan" "ratio"
printf '%-44s %10s s %22s %8s\n' "join, 4 nodes (all peers up)" "$(awk -v x="$(v join_4_ms)" 'BEGIN{printf "%.2f", x/1000}')" "up to 30 s per bad candidate" ""
printf '%-44s %10s s %22s\n' "join, 8 nodes" "$(awk -v x="$(v join_8_ms)" 'BEGIN{printf "%.2f", x/1000}')" ""
printf '%-44s %10s s %22s\n' "join, 16 nodes" "$(awk -v x="$(v join_16_ms)" 'BEGIN{printf "%.2f", x/1000}')" ""
printf '%-44s %10s s %20s s %8s\n' "failover p50 ($(v failover_n) cuts)" "$(v failover_p50_s)" "130-305" "$(ratio "$(v failover_p50_s)" 130)"
printf '%-44s %10s s %20s s %8s\n' "failover p99" "$(v failover_p99_s)" "305" "$(ratio "$(v failover_p99_s)" 305)"
printf '%-44s %10s s %20s s %8s\n' "failover max" "$(v failover_max_s)" "305" "$(ratio "$(v failover_max_s)" 305)"
printf '%-44s %8s Gb/s\n' "raw veth (iperf3, 1 stream)" "$(v raw_veth_gbps)"
printf '%-44s %8s Gb/s %21s\n' "userspace mesh (boringtun, 2 threads)" "$(v mesh_userspace_gbps)" "ratio $(v mesh_ratio)"
printf '%-44s %10s s\n' "meshd CPU per Gbit (both nodes)" "$(v mesh_cpu_s_per_gbit)"
printf '%-44s %10s ms\n' "reconcile, $(v reconcile_peers) peers: first pass" "$(v reconcile_first_pass_ms)"
printf '%-44s %12s %22s\n' "  one peer changes: WireGuard / route ops" "$(v reconcile_one_change_wg_ops) / $(v reconcile_one_change_route_ops)" "all peers every 30 s"
printf '%-44s %10s ms\n' "  one peer changes: pass" "$(v reconcile_one_change_pass_ms)"
printf '%-44s %10s KiB\n' "  daemon RSS with every peer configured" "$(v reconcile_rss_kib)"
printf '%-44s %10s KiB\n' "  daemon RSS settled / peak over 3 s" "$(v reconcile_rss_min_kib) / $(v reconcile_rss_max_kib)"
printf '%-44s %10s KiB\n' "  daemon VmHWM (first pass included)" "$(v reconcile_hwm_kib)"
printf '%-44s %10s s %20s s %8s\n' "gateway failover p50 ($(v gateway_failover_n) kills)" "$(v gateway_failover_p50_s)" "Kilo 60-90" "$(ratio "$(v gateway_failover_p50_s)" 60)"
printf '%-44s %10s s %20s s\n' "gateway failover p99" "$(v gateway_failover_p99_s)" "Kilo 90"
printf '%-44s %10s s %20s s\n' "gateway failover max" "$(v gateway_failover_max_s)" "Kilo 90"
printf '%-44s %10s s %22s\n' "NAT cone<->cone direct, p50 ($(v nat_relayed_n) labs)" "$(v nat_direct_p50_s)" "never (no punching)"
printf '%-44s %10s s\n' "NAT cone<->cone direct, max" "$(v nat_direct_max_s)"
printf '%-44s %10s s %22s\n' "NAT symmetric<->symmetric relayed, p50" "$(v nat_relayed_p50_s)" "never (no relay)"
printf '%-44s %10s s\n' "NAT symmetric<->symmetric relayed, max" "$(v nat_relayed_max_s)"

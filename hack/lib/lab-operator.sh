# shellcheck shell=bash
# The operator kit in the lab: the metric names of the alerts and dashboards checked against every daemon's
# real /metrics, `doctor` on every node, optionally a broken node1 and dashboard screenshots. Source it (after
# common.sh); it defines functions only.
#
#   lab_operator BIN_DIR BROKEN SHOTS_DIR NODE_NS:NODE_DIR...
#
# BROKEN=1: after the healthy doctor run, node1's kubelet DNS points past dnslocal and nftables drops its mesh
# port; doctor must then fail on node1 naming both, with the fix. SHOTS_DIR (empty: none): a Prometheus
# (Debian's) scrapes node1's three daemons every second while traffic runs (DNS lookups, API requests,
# pings; an API stand-in and the DNS stand-in stopped for a while), then hack/operator/render_dashboards.py
# draws every dashboard of deploy/grafana/ from it into SHOTS_DIR. No kubelet runs in the lab: each node gets
# a kubeadm-style kubelet config (clusterDNS) and kubeconfig (server) in NODE_DIR/kubelet/ for doctor to read.

LAB_OPERATOR_DIR=${LAB_OPERATOR_DIR:-/run/hybridnet-lab/operator}

lab_operator_repo() { cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd; }

# lab_operator_kubelet NODE_DIR CLUSTER_DNS: the kubelet's files as kubeadm writes them.
lab_operator_kubelet() {
  mkdir -p "$1/kubelet"
  printf 'apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nclusterDomain: cluster.local\nclusterDNS:\n- %s\n' \
    "$2" >"$1/kubelet/config.yaml"
  printf 'apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster: {server: "https://127.0.0.1:7445"}\ncontexts:\n- name: lab\n  context: {cluster: lab, user: kubelet}\ncurrent-context: lab\n' \
    >"$1/kubelet/kubelet.conf"
}

# lab_operator_doctor BIN_DIR NS NODE_DIR [--json]: `meshd doctor` inside the node.
lab_operator_doctor() {
  ip netns exec "$2" "$1/meshd" doctor --config "$3/config.yaml" \
    --kubelet-config "$3/kubelet/config.yaml" --kubeconfig "$3/kubelet/kubelet.conf" "${@:4}"
}

lab_operator_metrics() {
  local pair ns port files=() repo
  repo=$(lab_operator_repo)
  mkdir -p "$LAB_OPERATOR_DIR"
  say "operator: every metric the alerts and dashboards name, in the daemons' real /metrics"
  for pair in "$@"; do
    ns=${pair%%:*}
    for port in 7446 7447 7448; do
      ip netns exec "$ns" curl -sf --max-time 3 "http://127.0.0.1:$port/metrics" >"$LAB_OPERATOR_DIR/$ns-$port.metrics" ||
        die "cannot scrape $ns 127.0.0.1:$port"
      files+=("$LAB_OPERATOR_DIR/$ns-$port.metrics")
    done
  done
  /usr/bin/python3 "$repo/hack/operator/metrics_check.py" "${files[@]}" | sed 's/^/    /'
  return "${PIPESTATUS[0]}"
}

# lab_operator_traffic BIN_DIR NS SECONDS: DNS lookups, API requests and pings from NS, with outages in the
# middle (the API stand-in comes back from BIN_DIR's apiprism-standin).
lab_operator_traffic() {
  local bin=$1 ns=$2 secs=$3 t names="$LAB_OPERATOR_DIR/names" pids=()
  printf '%s\n' kubernetes.default.svc.cluster.local kube-dns.kube-system.svc.cluster.local www.example.test \
    www.example.test nope.example.test >"$names"
  for t in $(seq 1 "$secs"); do
    # one second of traffic, in the background (waited for by pid: the stand-ins are background jobs too)
    (
      ip netns exec "$ns" dig +tries=1 +time=1 @169.254.20.10 -f "$names" >/dev/null 2>&1 &
      ip netns exec "$ns" dig +tries=1 +time=1 @169.254.20.10 "n$t-$RANDOM.example.test" >/dev/null 2>&1 &
      ip netns exec "$ns" curl -sk --max-time 1 https://127.0.0.1:7445/name >/dev/null 2>&1 &
      ip netns exec "$ns" ping -c 3 -i 0.2 -s 1000 -W 1 10.99.0.2 >/dev/null 2>&1 &
      wait
    ) &
    pids+=($!)
    case $t in
      $((secs / 3))) note "t=${t}s: API stand-in api-2 killed"; lab_apiprism_kill 2 ;;
      $((secs / 2))) note "t=${t}s: DNS stand-in stopped"; lab_dnslocal_stop ;;
      $((secs * 2 / 3))) note "t=${t}s: DNS and API stand-ins back"
        lab_dnslocal_start_standin "$SWITCH_NS" "$BRIDGE" 192.0.2.53 >/dev/null
        lab_apiprism_start_standins "$bin" "$SWITCH_NS" "$BRIDGE" >/dev/null ;;
    esac
    sleep 1
  done
  wait "${pids[@]}"
}

# lab_operator_screenshots BIN_DIR NS OUT_DIR: Prometheus in NS over the lab's traffic and outages, then every
# dashboard rendered into OUT_DIR.
lab_operator_screenshots() {
  local bin=$1 ns=$2 out=$3 dir=$LAB_OPERATOR_DIR/prometheus secs=${LAB_OPERATOR_SECONDS:-90} start end pid i repo
  repo=$(lab_operator_repo)
  ensure_pkgs prometheus:prometheus dig:bind9-dnsutils
  /usr/bin/python3 -c 'import matplotlib' 2>/dev/null || ensure_pkgs python3-matplotlib:python3-matplotlib
  /usr/bin/python3 -c 'import matplotlib' 2>/dev/null || die "python3-matplotlib is not importable"
  mkdir -p "$dir/data"
  cat >"$dir/prometheus.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: hybridnet
    static_configs:
      - targets: ["127.0.0.1:7446", "127.0.0.1:7447", "127.0.0.1:7448"]
        labels: {node: "$ns"}
EOF
  say "operator: Prometheus in $ns scraping its daemons every second for ${secs}s, with traffic and outages"
  ip netns exec "$ns" prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --web.listen-address=127.0.0.1:9090 >"$dir/prometheus.log" 2>&1 &
  pid=$!
  for i in $(seq 1 50); do
    ip netns exec "$ns" curl -sf http://127.0.0.1:9090/-/ready >/dev/null 2>&1 && break
    sleep 0.2
  done
  start=$(date +%s)
  lab_operator_traffic "$bin" "$ns" "$secs"
  sleep 3
  end=$(date +%s)
  ip netns exec "$ns" /usr/bin/python3 "$repo/hack/operator/render_dashboards.py" http://127.0.0.1:9090 \
    "$start" "$end" "$out" --var "node=$ns" | sed 's/^/    /'
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

lab_operator_break() {
  local ns=$1 dir=$2
  say "operator: breaking $ns (kubelet clusterDNS 10.96.0.10, nftables drops UDP 51821-51822)"
  lab_operator_kubelet "$dir" 10.96.0.10
  ip netns exec "$ns" nft -f - <<'EOF'
table inet hnlab_broken {
  chain input { type filter hook input priority 0; udp dport { 51821, 51822 } drop; }
}
EOF
}

lab_operator() {
  [ "$#" -ge 4 ] || die "usage: lab_operator BIN_DIR BROKEN SHOTS_DIR NODE_NS:NODE_DIR..."
  local bin=$1 broken=$2 shots=$3 pair ns dir failed=0 json deadline
  shift 3
  # After the screenshots' traffic and outages, more labelled families have series (upstream errors ...).
  if [ -n "$shots" ]; then lab_operator_screenshots "$bin" "${1%%:*}" "$shots" || failed=1; fi
  # Families appear with their first series: without a discovery service (the lab has none) or an upstream
  # error, some are absent. integration/tests/operator.rs runs this check strictly; here it informs.
  lab_operator_metrics "$@" || warn "some metric names have no series in this lab (see MISSING above)"
  for pair in "$@"; do
    ns=${pair%%:*} dir=${pair#*:}
    lab_operator_kubelet "$dir" 169.254.20.10
    say "doctor on $ns (meshd doctor; kubelet files in $dir/kubelet)"
    lab_operator_doctor "$bin" "$ns" "$dir" | sed 's/^/    /'
    [ "${PIPESTATUS[0]}" -eq 0 ] || { warn "doctor found problems on $ns"; failed=1; }
  done
  if [ "$broken" -eq 1 ]; then
    ns=${1%%:*} dir=${1#*:}
    lab_operator_break "$ns" "$dir"
    # Traffic to the peers, as pods would send: meshd confirms a path whose traffic goes unanswered at
    # once (an idle peer is probed only every 30 s).
    local peers
    peers=$("$bin/meshd" status --config "$dir/config.yaml" --json 2>/dev/null | jq -r '.details.peers[]? | (.allowedIPs[]? | select(test("^[0-9.]+/32$")) | sub("/32$"; "")), .meshAddress')
    deadline=$((SECONDS + 20))
    until "$bin/meshd" status --config "$dir/config.yaml" --json 2>/dev/null |
      jq -e '[.details.peers[]? | .state] | length > 0 and all(. == "down")' >/dev/null; do
      [ "$SECONDS" -lt "$deadline" ] || { warn "the peers of $ns did not all go down after the mesh ports were dropped"; failed=1; break; }
      # shellcheck disable=SC2086 # one address per word
      (for peer in $peers; do ip netns exec "$ns" ping -c 1 -W 1 "$peer" >/dev/null 2>&1 & done; wait)
    done
    say "doctor on the broken $ns (expected: exit 1, kubelet-dns and mesh-port failed, with the fix)"
    lab_operator_doctor "$bin" "$ns" "$dir" | sed 's/^/    /' || true
    json=$(lab_operator_doctor "$bin" "$ns" "$dir" --json || true)
    if jq -e '[.findings[] | select(.verdict == "fail") | .check] | (index("kubelet-dns") != null and index("mesh-port") != null)' \
      <<<"$json" >/dev/null; then
      note "doctor reported both problems on $ns"
    else
      warn "doctor did not report both problems on the broken $ns"; failed=1
    fi
  fi
  return "$failed"
}

# shellcheck shell=bash
# dnslocal in the lab: a stand-in zone server (NSD) for the cluster DNS and an outside zone, and a check
# that every node's dnslocal answers for both. Source it (after common.sh); it defines functions only.
#
#   lab_dnslocal STANDIN_NS STANDIN_DEV STANDIN_IP LISTEN_IP NODE_NS...
#
# STANDIN_NS/STANDIN_DEV: where the stand-in runs and the link that gets STANDIN_IP (/32), e.g. the lab's
# switch namespace and its bridge, with the nodes' clusterDNS address (192.0.2.53). NSD serves
# cluster.local (kubernetes.default.svc, kube-dns.kube-system.svc) and example.test (www), authoritative.
# For the outside zone to resolve, the nodes' dnslocal needs `upstreams: ["STANDIN_IP:53"]` (otherwise it
# forwards to the host's /etc/resolv.conf, which the lab namespaces may not reach).
# lab_dnslocal_stop stops the stand-in.

LAB_DNS_DIR=${LAB_DNS_DIR:-/run/hybridnet-lab/dns}

lab_dnslocal_zones() {
  local dir=$1
  cat >"$dir/cluster.local.zone" <<'EOF'
$TTL 5
@ IN SOA ns.cluster.local. hostmaster.cluster.local. 1 3600 600 86400 5
@ IN NS ns.cluster.local.
ns IN A 192.0.2.53
kubernetes.default.svc IN A 10.96.0.1
kube-dns.kube-system.svc IN A 10.96.0.10
EOF
  cat >"$dir/example.test.zone" <<'EOF'
$TTL 300
@ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60
@ IN NS ns.example.test.
ns IN A 192.0.2.53
www IN A 192.0.2.80
EOF
}

lab_dnslocal_start_standin() {
  local ns=$1 dev=$2 ip=$3 dir=$LAB_DNS_DIR
  command -v nsd >/dev/null 2>&1 || ensure_pkgs nsd:nsd dig:bind9-dnsutils
  mkdir -p "$dir"
  if [ -f "$dir/nsd.pid" ] && kill -0 "$(cat "$dir/nsd.pid")" 2>/dev/null; then
    note "dns stand-in: NSD already running in $ns on $ip"
    return 0
  fi
  ip -n "$ns" addr replace "$ip/32" dev "$dev"
  lab_dnslocal_zones "$dir"
  nsd_conf "$dir" "$ip" cluster.local example.test
  ip netns exec "$ns" nsd -c "$dir/nsd.conf" || die "cannot start NSD (see $dir/nsd.log)"
  local i
  for i in $(seq 1 50); do
    ip netns exec "$ns" dig +short +tries=1 +time=1 "@$ip" www.example.test >/dev/null 2>&1 && break
    sleep 0.1
  done
  note "dns stand-in: NSD in $ns on $ip:53 (cluster.local, example.test; log $dir/nsd.log)"
}

lab_dnslocal_stop() {
  local pidfile=$LAB_DNS_DIR/nsd.pid
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
  rm -f "$pidfile"
}

# lab_dnslocal_query NS LISTEN NAME: one line "NAME -> answer (status)".
lab_dnslocal_query() {
  local out status answer
  out=$(ip netns exec "$1" dig +tries=1 +time=2 +noall +comments +answer "@$2" "$3" A 2>&1)
  status=$(printf '%s\n' "$out" | sed -n 's/.*status: \([A-Z]*\).*/\1/p')
  answer=$(printf '%s\n' "$out" | awk '!/^;/ && NF >= 5 {print $5}' | paste -sd, -)
  printf '%-40s -> %s (%s)\n' "$3" "${answer:--}" "${status:-no answer}"
  [ "$status" = NOERROR ] && [ -n "$answer" ]
}

lab_dnslocal() {
  [ "$#" -ge 5 ] || die "usage: lab_dnslocal STANDIN_NS STANDIN_DEV STANDIN_IP LISTEN_IP NODE_NS..."
  local standin_ns=$1 dev=$2 standin_ip=$3 listen=$4 ns failed=0
  shift 4
  lab_dnslocal_start_standin "$standin_ns" "$dev" "$standin_ip"
  say "dnslocal: each node's $listen answers for the cluster zone and an outside zone"
  for ns in "$@"; do
    note "$ns:"
    lab_dnslocal_query "$ns" "$listen" kubernetes.default.svc.cluster.local | sed 's/^/      /' || failed=1
    lab_dnslocal_query "$ns" "$listen" www.example.test | sed 's/^/      /' || failed=1
  done
  [ "$failed" -eq 0 ] || warn "dnslocal: some lookups failed (outside zone: is upstreams set to $standin_ip:53?)"
  return "$failed"
}

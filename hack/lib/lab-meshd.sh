# shellcheck shell=bash
# meshd in the lab: meshes the lab nodes and shows it. Source it (after common.sh); it defines functions only.
#
#   lab_meshd BIN_DIR NODE_NS:CONFIG...
#
# Every node's meshd creates its key on first start; lab_meshd reads each node's public key and first IPv4
# underlay address, gives every node the others as static peers and a mesh IPv4 address (10.99.0.N/32, N from
# the order of the arguments) by rewriting the `meshd: {...}` line of its config (meshd reloads it), waits
# until every node sees every peer up, then prints `meshd status` per node and pings every node's mesh
# addresses (IPv4 and the IPv6 ULA one) from every other node. Needs jq.

LAB_MESHD_TIMEOUT=${LAB_MESHD_TIMEOUT:-20}

lab_meshd_key() { # BIN CONFIG -> public key (empty until meshd published it)
  "$1" status --config "$2" --json 2>/dev/null | jq -r '.details.publicKey // empty'
}

lab_meshd_ip() { # NS -> first global IPv4 address
  ip -n "$1" -4 -o addr show scope global | awk '{ split($4, a, "/"); print a[1]; exit }'
}

lab_meshd_up() { # BIN CONFIG PEERS -> 0 when every peer is up
  local json
  json=$("$1" status --config "$2" --json 2>/dev/null) || return 1
  [ "$(jq '[.details.peers[]? | select(.state == "up")] | length' <<<"$json")" -eq "$3" ]
}

lab_meshd() {
  [ "$#" -ge 3 ] || die "usage: lab_meshd BIN_DIR NODE_NS:CONFIG NODE_NS:CONFIG..."
  command -v jq >/dev/null 2>&1 || die "lab_meshd needs jq"
  local bin=$1/meshd pair ns cfg i j key ip peers failed=0 deadline v6
  shift
  local -a nss=() cfgs=() keys=() ips=()
  for pair in "$@"; do
    nss+=("${pair%%:*}")
    cfgs+=("${pair#*:}")
  done
  local n=${#nss[@]}
  say "meshd: keys and underlay addresses of $n nodes"
  for i in $(seq 0 $((n - 1))); do
    deadline=$((SECONDS + LAB_MESHD_TIMEOUT))
    key=""
    while [ -z "$key" ] && [ "$SECONDS" -lt "$deadline" ]; do
      key=$(lab_meshd_key "$bin" "${cfgs[$i]}")
      [ -n "$key" ] || sleep 0.2
    done
    [ -n "$key" ] || die "meshd in ${nss[$i]} published no public key (see its log)"
    keys+=("$key")
    ips+=("$(lab_meshd_ip "${nss[$i]}")")
    note "${nss[$i]}: ${ips[$i]}  $key"
  done
  say "meshd: static peers for every node (configs rewritten, meshd reloads them)"
  for i in $(seq 0 $((n - 1))); do
    peers=""
    for j in $(seq 0 $((n - 1))); do
      [ "$i" -ne "$j" ] || continue
      peers+="${peers:+, }{name: ${nss[$j]}, publicKey: \"${keys[$j]}\", endpoints: [\"${ips[$j]}:51821\"], allowedIPs: [\"10.99.0.$((j + 1))/32\"]}"
    done
    cfg=${cfgs[$i]}
    sed "s|^meshd: {\(.*\)}\$|meshd: {\1, addresses: [\"10.99.0.$((i + 1))/32\"], peers: [$peers]}|" "$cfg" >"$cfg.new"
    mv "$cfg.new" "$cfg"
  done
  for i in $(seq 0 $((n - 1))); do
    deadline=$((SECONDS + LAB_MESHD_TIMEOUT))
    until lab_meshd_up "$bin" "${cfgs[$i]}" $((n - 1)); do
      if [ "$SECONDS" -ge "$deadline" ]; then warn "meshd: ${nss[$i]} does not see every peer up"; failed=1; break; fi
      sleep 0.2
    done
  done
  for i in $(seq 0 $((n - 1))); do
    say "meshd status in ${nss[$i]}"
    "$bin" status --config "${cfgs[$i]}" | sed 's/^/    /' || failed=1
  done
  say "meshd: pings across the mesh"
  for i in $(seq 0 $((n - 1))); do
    for j in $(seq 0 $((n - 1))); do
      [ "$i" -ne "$j" ] || continue
      v6=$("$bin" status --config "${cfgs[$j]}" --json | jq -r '.details.meshAddress')
      for dst in "10.99.0.$((j + 1))" "$v6"; do
        if ip netns exec "${nss[$i]}" ping -c 1 -W 2 "$dst" >/dev/null 2>&1; then
          note "${nss[$i]} -> ${nss[$j]} $dst ok"
        else
          note "${nss[$i]} -> ${nss[$j]} $dst FAILED"; failed=1
        fi
      done
    done
  done
  return "$failed"
}

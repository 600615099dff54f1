# shellcheck shell=bash
# A network lab from namespaces: a "switch" namespace holding a bridge, and node namespaces joined to it by
# veth pairs. Nothing is created in the host's namespace. Source it after common.sh; functions only.
#
#   netlab_switch SW BR [ADDR4/LEN ADDR6/LEN]   switch namespace SW with bridge BR (optionally addressed)
#   netlab_node   SW BR NODE PORT ADDR4/LEN ADDR6/LEN
#                                               namespace NODE with eth0 joined to BR as PORT
#   netlab_del_ns NS                            kill what runs in NS, then delete it
#   netlab_list PREFIX                          the namespaces whose name starts with PREFIX

netlab_switch() {
  local sw=$1 br=$2 a4=${3:-} a6=${4:-}
  ip netns add "$sw"
  ip -n "$sw" link set lo up
  ip -n "$sw" link add "$br" type bridge
  ip -n "$sw" link set "$br" up
  [ -z "$a4" ] || ip -n "$sw" addr add "$a4" dev "$br"
  [ -z "$a6" ] || ip -n "$sw" -6 addr add "$a6" dev "$br" nodad
}

netlab_node() {
  local sw=$1 br=$2 node=$3 port=$4 a4=$5 a6=$6
  ip netns add "$node"
  ip -n "$node" link set lo up
  ip -n "$sw" link add "$port" type veth peer name eth0 netns "$node"
  ip -n "$sw" link set "$port" master "$br" up
  ip -n "$node" addr add "$a4" dev eth0
  ip -n "$node" -6 addr add "$a6" dev eth0 nodad
  ip -n "$node" link set eth0 up
}

# Processes left in a namespace are ours (we created it): TERM, a short grace, then KILL, by pid.
netlab_del_ns() {
  local ns=$1 pids
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086 # a list of pids
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 30); do
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -z "$pids" ] && break
      sleep 0.1
    done
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  fi
  ip netns del "$ns" 2>/dev/null || true
}

netlab_list() {
  ip netns list 2>/dev/null | awk -v p="$1" 'index($1, p) == 1 { print $1 }'
}

#!/usr/bin/env python3
"""The Grafana dashboards of deploy/grafana/, generated from the panel lists below (one source of truth).

    hack/operator/dashboards.py           write deploy/grafana/{apiprism,meshd,dnslocal,node}.json
    hack/operator/dashboards.py --check   exit 1 when a committed dashboard differs from what this writes

Each dashboard has a Prometheus data source variable and a target variable (`instance` for a daemon's
dashboard, `node` for the node's), uses only metrics the daemons export (hack/operator/metrics_check.py
checks them against live daemons), and imports into Grafana 10/11 (schemaVersion 39). Standard library only.
"""
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
OUT = REPO / "deploy/grafana"
R = "$__rate_interval"

# (title, [(expr, legend)], unit, kind) per panel; kind: timeseries or stat. `$sel` is the target selector.
APIPRISM = [
    ("Upstreams: up, usable, configured", [
        ('sum(apiprism_upstream_state{state="up", $sel})', "up"),
        ("sum(apiprism_upstreams_usable{$sel})", "usable (not down)"),
        ("sum(apiprism_upstreams{$sel})", "configured"),
    ], "short", "timeseries"),
    ("Upstream state (1 = up)", [('apiprism_upstream_state{state="up", $sel}', "{{upstream}}")], "short", "timeseries"),
    ("Upstream connect RTT (smoothed)", [("apiprism_upstream_rtt_seconds{$sel}", "{{upstream}}")], "s", "timeseries"),
    ("Open connections by upstream", [("apiprism_upstream_active_connections{$sel}", "{{upstream}}")], "short", "timeseries"),
    ("Client connections /s", [
        (f"sum(rate(apiprism_connections_total{{$sel}}[{R}]))", "accepted"),
        (f"sum(rate(apiprism_rejected_connections_total{{$sel}}[{R}]))", "rejected (no upstream)"),
        (f"sum(rate(apiprism_failovers_total{{$sel}}[{R}]))", "retried on another upstream"),
    ], "ops", "timeseries"),
    ("Dial errors /s by upstream", [(f"rate(apiprism_upstream_dial_errors_total{{$sel}}[{R}])", "{{upstream}}")], "ops", "timeseries"),
    ("Bytes /s by upstream", [(f"sum by (upstream, direction) (rate(apiprism_upstream_bytes_total{{$sel}}[{R}]))", "{{upstream}} {{direction}}")], "Bps", "timeseries"),
    ("Health state changes (5m)", [("sum(increase(apiprism_upstream_transitions_total{$sel}[5m]))", "transitions")], "short", "timeseries"),
]

MESHD = [
    ("Peers: up / configured", [("sum(meshd_peers_up{$sel})", "up"), ("sum(meshd_peers{$sel})", "configured")], "short", "timeseries"),
    ("Peer state (0 unknown, 1 up, 2 down)", [("meshd_peer_state{$sel}", "{{peer}}")], "short", "timeseries"),
    ("Peer RTT (active path)", [("meshd_peer_rtt_seconds{$sel}", "{{peer}}")], "s", "timeseries"),
    ("Peers by path", [("count by (path) (meshd_peer_path{$sel} == 1)", "{{path}}")], "short", "timeseries"),
    ("Received bytes /s by peer", [(f"rate(meshd_peer_rx_bytes{{$sel}}[{R}])", "{{peer}}")], "Bps", "timeseries"),
    ("Sent bytes /s by peer", [(f"rate(meshd_peer_tx_bytes{{$sel}}[{R}])", "{{peer}}")], "Bps", "timeseries"),
    ("WireGuard handshake age", [("meshd_peer_handshake_age_seconds{$sel}", "{{peer}}")], "s", "timeseries"),
    ("Probes /s", [
        (f"sum(rate(meshd_probes_sent_total{{$sel}}[{R}]))", "sent"),
        (f"sum(rate(meshd_probes_answered_total{{$sel}}[{R}]))", "answered"),
        (f"sum(rate(meshd_probes_rejected_total{{$sel}}[{R}]))", "rejected"),
    ], "ops", "timeseries"),
    ("Path failovers (5m)", [("sum by (peer) (increase(meshd_peer_failovers_total{$sel}[5m]))", "{{peer}}")], "short", "timeseries"),
    ("Reconcile", [
        ("meshd_reconcile_seconds{$sel}", "last pass (s)"),
        (f"sum(rate(meshd_reconcile_errors_total{{$sel}}[{R}]))", "errors /s"),
    ], "short", "timeseries"),
    ("Kernel changes /s", [
        (f"sum(rate(meshd_wireguard_peer_ops_total{{$sel}}[{R}]))", "WireGuard peer ops"),
        (f"sum(rate(meshd_route_changes_total{{$sel}}[{R}]))", "route changes"),
    ], "ops", "timeseries"),
    ("Discovery: registries watching, affiliates", [
        ("meshd_discovery_registry_up{$sel}", "{{registry}} up"),
        ("meshd_discovery_affiliates{$sel}", "{{registry}} affiliates"),
    ], "short", "timeseries"),
    ("Discovery: records rejected (15m)", [
        ("sum by (registry, reason) (increase(meshd_discovery_rejected_total{$sel}[15m]))", "{{registry}} {{reason}}"),
    ], "short", "timeseries"),
    ("MSS clamp in place", [("meshd_mss_clamp_ok{$sel}", "clamp ok")], "short", "timeseries"),
    ("Peers by source", [("meshd_peers_by_source{$sel}", "{{source}}")], "short", "timeseries"),
    ("Refused prefixes (trust boundary)", [
        ("meshd_refused_prefixes{$sel}", "refused now"),
        ("sum by (peer, reason) (increase(meshd_prefixes_refused_total{$sel}[1h]))", "{{peer}} {{reason}} (new in 1h)"),
    ], "short", "timeseries"),
    ("Relayed peers: granted, failed paths (15m)", [
        ("meshd_relay_grants{$sel}", "granted"),
        ("sum by (reason) (increase(meshd_relay_paths_failed_total{$sel}[15m]))", "failed: {{reason}}"),
    ], "short", "timeseries"),
    ("Relay for others: allocations, forwarded and dropped /s", [
        ("meshd_relay_allocations{$sel}", "allocations"),
        (f"sum(rate(meshd_relay_forwarded_packets_total{{$sel}}[{R}]))", "forwarded /s"),
        (f"sum by (reason) (rate(meshd_relay_dropped_total{{$sel}}[{R}]))", "dropped /s: {{reason}}"),
    ], "short", "timeseries"),
]

DNSLOCAL = [
    ("Queries /s by result", [(f"sum by (result) (rate(dnslocal_queries_total{{$sel}}[{R}]))", "{{result}}")], "ops", "timeseries"),
    ("Answered without an upstream", [(
        f'sum(rate(dnslocal_queries_total{{result=~"hit|stale|coalesced", $sel}}[{R}])) / sum(rate(dnslocal_queries_total{{$sel}}[{R}]))',
        "cache hit ratio")], "percentunit", "timeseries"),
    ("SERVFAIL ratio", [(
        f'sum(rate(dnslocal_queries_total{{result="servfail", $sel}}[{R}])) / sum(rate(dnslocal_queries_total{{$sel}}[{R}]))',
        "servfail")], "percentunit", "timeseries"),
    ("Queries /s by type", [(f"sum by (type) (rate(dnslocal_queries_total{{$sel}}[{R}]))", "{{type}}")], "ops", "timeseries"),
    ("Upstream latency p50 / p99", [
        (f"histogram_quantile(0.5, sum by (le, upstream) (rate(dnslocal_upstream_latency_seconds_bucket{{$sel}}[{R}])))", "p50 {{upstream}}"),
        (f"histogram_quantile(0.99, sum by (le, upstream) (rate(dnslocal_upstream_latency_seconds_bucket{{$sel}}[{R}])))", "p99 {{upstream}}"),
    ], "s", "timeseries"),
    ("Upstream up", [("dnslocal_upstream_up{$sel}", "{{upstream}}")], "short", "timeseries"),
    ("Upstream errors /s by kind", [(f"sum by (upstream, kind) (rate(dnslocal_upstream_errors_total{{$sel}}[{R}]))", "{{upstream}} {{kind}}")], "ops", "timeseries"),
    ("Cache entries, misses in flight", [("dnslocal_cache_entries{$sel}", "entries"), ("dnslocal_inflight{$sel}", "in flight")], "short", "timeseries"),
    ("Shed, dropped, prefetched /s", [
        (f"sum(rate(dnslocal_shed_total{{$sel}}[{R}]))", "shed"),
        (f"sum(rate(dnslocal_dropped_total{{$sel}}[{R}]))", "dropped"),
        (f"sum(rate(dnslocal_prefetches_total{{$sel}}[{R}]))", "prefetched"),
    ], "ops", "timeseries"),
]

NODE = [
    ("Daemons ready", [("hybridnet_ready{$sel} * on (instance) group_left (daemon) hybridnet_build_info{$sel}", "{{daemon}}")], "short", "timeseries"),
    ("Config generation, rejected versions", [
        ("hybridnet_config_generation{$sel} * on (instance) group_left (daemon) hybridnet_build_info{$sel}", "{{daemon}} generation"),
        ("hybridnet_config_reload_errors_total{$sel} * on (instance) group_left (daemon) hybridnet_build_info{$sel}", "{{daemon}} rejected"),
    ], "short", "timeseries"),
    ("API: usable upstreams, open connections", [
        ("sum(apiprism_upstreams_usable{$sel})", "usable upstreams"),
        ("sum(apiprism_active_connections{$sel})", "open connections"),
    ], "short", "timeseries"),
    ("Mesh: peers up / configured", [("sum(meshd_peers_up{$sel})", "up"), ("sum(meshd_peers{$sel})", "configured")], "short", "timeseries"),
    ("Mesh throughput", [
        (f"sum(rate(meshd_peer_rx_bytes{{$sel}}[{R}]))", "received"),
        (f"sum(rate(meshd_peer_tx_bytes{{$sel}}[{R}]))", "sent"),
    ], "Bps", "timeseries"),
    ("DNS queries /s by result", [(f"sum by (result) (rate(dnslocal_queries_total{{$sel}}[{R}]))", "{{result}}")], "ops", "timeseries"),
    ("DNS upstreams up", [("sum(dnslocal_upstream_up{$sel})", "up"), ("count(dnslocal_upstream_up{$sel})", "configured")], "short", "timeseries"),
    ("MSS clamp in place", [("meshd_mss_clamp_ok{$sel}", "clamp ok")], "short", "timeseries"),
]

# name: (title, panels, target variable, the query listing its values)
DASHBOARDS = {
    "apiprism": ("hybridnet / apiprism", APIPRISM, "instance", 'label_values(hybridnet_build_info{daemon="apiprism"}, instance)'),
    "meshd": ("hybridnet / meshd", MESHD, "instance", 'label_values(hybridnet_build_info{daemon="meshd"}, instance)'),
    "dnslocal": ("hybridnet / dnslocal", DNSLOCAL, "instance", 'label_values(hybridnet_build_info{daemon="dnslocal"}, instance)'),
    "node": ("hybridnet / node", NODE, "node", "label_values(hybridnet_build_info, node)"),
}

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(i, title, targets, unit, kind):
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {"datasource": DS, "refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
            for j, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(name):
    title, panels, var, query = DASHBOARDS[name]
    sel = f'{var}=~"${var}"'
    return {
        "uid": f"hybridnet-{name}",
        "title": title,
        "tags": ["hybridnet"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            {"name": var, "label": var, "type": "query", "datasource": DS, "query": query,
             "refresh": 2, "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": [panel(i, t, [(e.replace("$sel", sel), lg) for e, lg in tg], u, k)
                   for i, (t, tg, u, k) in enumerate(panels)],
    }


def render(name):
    return json.dumps(dashboard(name), indent=2) + "\n"


def main():
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] and not check:
        print(__doc__, file=sys.stderr)
        return 2
    stale = []
    for name in DASHBOARDS:
        path = OUT / f"{name}.json"
        text = render(name)
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path.relative_to(REPO)))
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)}: run hack/operator/dashboards.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Builds each overlay of deploy/kubernetes with `kubectl kustomize` and checks what comes out.

    check_kubernetes.py [--kubectl KUBECTL] [--bin-dir DIR] [--k8s-version 1.30.0]

- core objects (Namespace, ServiceAccount, RBAC, ConfigMap, Service, DaemonSet, admission policy) against the
  Kubernetes OpenAPI schemas, strictly (unknown fields are errors), with kubernetes-validate (PyPI);
- the Prometheus Operator objects, which those schemas do not cover, structurally: ServiceMonitor endpoints name
  ports of a Service its selector matches, the PrometheusRule's groups are the plain rules file's, and
  `promtool check rules` accepts them;
- the DaemonSet: a container per daemon, its probes on that daemon's admin port from the ConfigMap's config,
  and (with --bin-dir) that config passes `<daemon> check-config`.
Exits 1 with one line per problem.
"""
import argparse
import pathlib
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
OVERLAYS = ["standalone", "prometheus-operator"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
DAEMONS = {"apiprism": 7446, "meshd": 7447, "dnslocal": 7448}
RULES = REPO / "deploy/prometheus/hybridnet.rules.yml"


def build(kubectl, overlay):
    path = REPO / "deploy/kubernetes/overlays" / overlay
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kubectl} kustomize {path} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def admin_port(config, daemon):
    addr = ((config.get(daemon) or {}).get("admin")) or f"127.0.0.1:{DAEMONS[daemon]}"
    return int(str(addr).rsplit(":", 1)[1])


def check_daemonset(name, objs, bin_dir, problems):
    ds = [o for o in objs if o["kind"] == "DaemonSet"]
    cms = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    if len(ds) != 1:
        problems.append(f"{name}: {len(ds)} DaemonSets, want 1")
        return
    spec = ds[0]["spec"]["template"]["spec"]
    config_text = cms.get("hybridnet", {}).get("data", {}).get("config.yaml")
    if config_text is None:
        problems.append(f"{name}: no ConfigMap hybridnet with config.yaml")
        return
    config = next((d for d in yaml.safe_load_all(config_text) if d and d.get("kind") == "HybridNetConfig"), {})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    if volumes.get("config", {}).get("configMap", {}).get("name") != "hybridnet":
        problems.append(f"{name}: the config volume does not mount ConfigMap hybridnet")
    containers = {c["name"]: c for c in spec["containers"]}
    for daemon in DAEMONS:
        c = containers.get(daemon)
        if c is None:
            problems.append(f"{name}: no container {daemon}")
            continue
        port = admin_port(config, daemon)
        for probe in ("livenessProbe", "readinessProbe"):
            got = c.get(probe, {}).get("httpGet", {}).get("port")
            if got != port:
                problems.append(f"{name}: {daemon} {probe} on port {got}, its admin is on {port}")
        if bin_dir:
            if not (pathlib.Path(bin_dir) / daemon).is_file():
                raise SystemExit(f"{bin_dir}/{daemon} is missing: build the daemons first")
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                f.write(config_text)
                f.flush()
                out = subprocess.run([str(pathlib.Path(bin_dir) / daemon), "check-config", "--config", f.name],
                                     capture_output=True, text=True, check=False)
            if out.returncode != 0:
                problems.append(f"{name}: {daemon} check-config rejects the ConfigMap: {out.stderr.strip()}")
    return config


def check_servicemonitor(name, objs, config, problems):
    services = [o for o in objs if o["kind"] == "Service"]
    for sm in (o for o in objs if o["kind"] == "ServiceMonitor"):
        if sm.get("apiVersion") != "monitoring.coreos.com/v1":
            problems.append(f"{name}: ServiceMonitor apiVersion {sm.get('apiVersion')}")
        selector = sm["spec"]["selector"].get("matchLabels", {})
        namespaces = sm["spec"].get("namespaceSelector", {}).get("matchNames", [])
        matched = [s for s in services
                   if selector.items() <= s["metadata"].get("labels", {}).items()
                   and s["metadata"].get("namespace") in namespaces]
        if len(matched) != 1:
            problems.append(f"{name}: the ServiceMonitor selects {len(matched)} Services, want 1")
            continue
        ports = {p["name"]: p["port"] for p in matched[0]["spec"]["ports"]}
        seen = set()
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in ports:
                problems.append(f"{name}: ServiceMonitor endpoint port {ep.get('port')} is not a Service port")
                continue
            seen.add(ep["port"])
            daemon = ep["port"].split("-")[0]
            if daemon in DAEMONS and ports[ep["port"]] != admin_port(config, daemon):
                problems.append(f"{name}: {ep['port']} is {ports[ep['port']]}, {daemon}'s admin port differs")
            if daemon in DAEMONS and not admin_port_reachable(config, daemon):
                problems.append(f"{name}: {daemon}'s admin listens on loopback: the ServiceMonitor cannot scrape it")
        missing = {f"{d}-metrics" for d in DAEMONS} - seen
        if missing:
            problems.append(f"{name}: the ServiceMonitor does not scrape {sorted(missing)}")


def admin_port_reachable(config, daemon):
    addr = str(((config.get(daemon) or {}).get("admin")) or "127.0.0.1")
    host = addr.rsplit(":", 1)[0].strip("[]")
    return not (host.startswith("127.") or host == "::1")


def check_prometheusrule(name, objs, problems):
    plain = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for pr in (o for o in objs if o["kind"] == "PrometheusRule"):
        if pr.get("apiVersion") != "monitoring.coreos.com/v1":
            problems.append(f"{name}: PrometheusRule apiVersion {pr.get('apiVersion')}")
        if pr["spec"].get("groups") != plain["groups"]:
            problems.append(f"{name}: the PrometheusRule's groups differ from {RULES.relative_to(REPO)}")
        with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
            yaml.safe_dump({"groups": pr["spec"]["groups"]}, f)
            f.flush()
            out = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            problems.append(f"{name}: promtool rejects the PrometheusRule: {out.stdout}{out.stderr}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--bin-dir", help="where apiprism, meshd and dnslocal are (for check-config)")
    ap.add_argument("--k8s-version", default="1.30.0", help="Kubernetes schemas to validate against")
    args = ap.parse_args()
    problems = []
    for overlay in OVERLAYS:
        objs = build(args.kubectl, overlay)
        kinds = sorted(o["kind"] for o in objs)
        for o in objs:
            if o["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(o, args.k8s_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{overlay}: {o['kind']}/{o['metadata']['name']}: {e.message} at {list(e.path)}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{overlay}: {o['kind']}/{o['metadata']['name']}: no schema ({e})")
        config = check_daemonset(overlay, objs, args.bin_dir, problems) or {}
        check_servicemonitor(overlay, objs, config, problems)
        check_prometheusrule(overlay, objs, problems)
        has_crds = any(k in CRD_KINDS for k in kinds)
        if (overlay == "prometheus-operator") != has_crds:
            problems.append(f"{overlay}: Prometheus Operator objects {'present' if has_crds else 'missing'}")
        print(f"{overlay}: {len(objs)} objects ({', '.join(kinds)})")
    for p in problems:
        print(f"PROBLEM {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

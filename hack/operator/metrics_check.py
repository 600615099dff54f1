#!/usr/bin/env python3
"""Checks that every metric the alerting rules and the Grafana dashboards name is exported by the daemons.

    metrics_check.py SCRAPE...      SCRAPE: a file holding one daemon's /metrics text (or an http:// URL)

The names come from deploy/prometheus/hybridnet.rules.yml and deploy/grafana/*.json (every token that starts
with a daemon's prefix: apiprism_, meshd_, dnslocal_, hybridnet_); the scrapes are the real daemons' output
(hack/lab.sh and integration/tests/operator.rs pass them). A name is exported when a scrape declares its
family (`# TYPE`), with the OpenMetrics suffixes (_total for counters, _bucket/_sum/_count for histograms,
_info for info). Prints one line per name (where it was found, and whether it had samples); exits 1 when one
is missing. Standard library only.
"""
import pathlib
import re
import sys
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
SOURCES = [REPO / "deploy/prometheus/hybridnet.rules.yml", *sorted((REPO / "deploy/grafana").glob("*.json"))]
NAME = re.compile(r"\b((?:apiprism|meshd|dnslocal|hybridnet)_[a-z0-9_]*[a-z0-9])\b")
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"],
            "gauge": [""], "unknown": [""], "stateset": [""], "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
            "summary": ["_sum", "_count", ""]}


def referenced():
    """Every metric name the rules and dashboards use, with the files naming it."""
    names = {}
    for path in SOURCES:
        for name in NAME.findall(path.read_text(encoding="utf-8")):
            names.setdefault(name, set()).add(path.name)
    return names


def read(source):
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=5) as r:  # noqa: S310 (a URL the caller gives)
            return r.read().decode("utf-8", "replace")
    return pathlib.Path(source).read_text(encoding="utf-8", errors="replace")


def exported(text):
    """{sample name: has samples} for every sample name a scrape's TYPE lines allow."""
    families = {}
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            families[m.group(1)] = m.group(2)
    samples = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}
    names = {}
    for family, kind in families.items():
        names.setdefault(family, any(n.startswith(family) for n in samples))  # the family's own name
        for suffix in SUFFIXES.get(kind, [""]):
            name = family + suffix
            names[name] = name in samples
    return names


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    found = {}
    for source in argv:
        label = pathlib.Path(source).name if not source.startswith("http") else source
        for name, has_samples in exported(read(source)).items():
            found.setdefault(name, []).append((label, has_samples))
    missing = 0
    for name, files in sorted(referenced().items()):
        where = found.get(name)
        if not where:
            missing += 1
            print(f"MISSING  {name:48} (named in {', '.join(sorted(files))})")
            continue
        samples = "samples" if any(s for _, s in where) else "declared, no samples yet"
        print(f"ok       {name:48} {samples}; in {', '.join(sorted({w for w, _ in where}))}")
    total = len(referenced())
    print(f"{total - missing} of {total} metric names in the rules and dashboards are exported by the daemons")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

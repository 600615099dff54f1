#!/usr/bin/env python3
"""Renders each Grafana dashboard of deploy/grafana/ to a PNG from a real Prometheus (Grafana cannot run here).

    render_dashboards.py PROMETHEUS_URL START END OUT_DIR [--var instance=REGEX] [--var node=REGEX]

Every panel's queries are the dashboard's own PromQL, evaluated by Prometheus (`/api/v1/query_range`) over
[START, END] (Unix seconds) with `$instance`/`$node` replaced by the given regexes (default `.*`) and
`$__rate_interval` by 4 scrape intervals; the series are drawn with matplotlib (Debian's python3-matplotlib),
two panels a row, in the dashboard's order, with its titles, units and legends. hack/lab.sh --screenshots
runs it against a Prometheus that scraped the lab's node1.
"""
import json
import math
import pathlib
import re
import sys
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
RATE_INTERVAL = "4s"


def query_range(url, expr, start, end, step):
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def unit_formatter(unit):
    def fmt(v, _pos):
        if unit == "percentunit":
            return f"{v * 100:.0f}%"
        if unit == "s":
            # Three significant digits: sub-millisecond RTTs (0.25 ms, 0.3 ms) stay apart on the axis.
            return f"{v * 1000:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"
        if unit in ("Bps", "ops"):
            suffix = "B/s" if unit == "Bps" else "/s"
            for scale, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
                if abs(v) >= scale:
                    return f"{v / scale:.3g} {p}{suffix}"
            return f"{v + 0.0:.3g} {suffix}"  # + 0.0: no "-0"
        return f"{v:g}"
    return FuncFormatter(fmt)


def render(path, url, start, end, out_dir, variables):
    dash = json.loads(path.read_text(encoding="utf-8"))
    panels = dash["panels"]
    rows = math.ceil(len(panels) / 2)
    plt.style.use("dark_background")
    fig, axes = plt.subplots(rows, 2, figsize=(16, 3.2 * rows), squeeze=False)
    fig.suptitle(f"{dash['title']}  (rendered from the hybridnet lab's metrics by hack/operator/render_dashboards.py)",
                 fontsize=13, x=0.01, ha="left")
    step = max(1, (end - start) // 240)
    empty = []
    for ax, p in zip(axes.flat, panels):
        ax.set_facecolor("#181b1f")
        ax.set_title(p["title"], fontsize=10, loc="left")
        drawn = 0
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for k, v in variables.items():
                expr = expr.replace(f"${k}", v)
            for series in query_range(url, expr, start, end, step):
                xs = [float(x) - start for x, _ in series["values"]]
                ys = [float(y) if y not in ("NaN", "+Inf", "-Inf") else float("nan") for _, y in series["values"]]
                ax.plot(xs, ys, linewidth=1.3, label=legend(t.get("legendFormat", ""), series["metric"]))
                drawn += 1
        ax.yaxis.set_major_formatter(unit_formatter(p["fieldConfig"]["defaults"].get("unit", "short")))
        ax.grid(alpha=0.2)
        ax.set_xlim(0, end - start)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        if drawn:
            ax.legend(fontsize=7, loc="upper left", framealpha=0.3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, alpha=0.6)
            empty.append(p["title"])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out = out_dir / f"{path.stem}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"{out}: {len(panels)} panels" + (f", no data in: {'; '.join(empty)}" if empty else ""))


def main(argv):
    args = [a for a in argv if not a.startswith("--var")]
    variables = {"instance": ".*", "node": ".*"}
    for i, a in enumerate(argv):
        if a == "--var" and i + 1 < len(argv):
            k, _, v = argv[i + 1].partition("=")
            variables[k] = v
            args.remove(argv[i + 1])
    if len(args) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    url, start, end, out_dir = args[0], int(args[1]), int(args[2]), pathlib.Path(args[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted((REPO / "deploy/grafana").glob("*.json")):
        render(path, url, start, end, out_dir, variables)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env bash
# The operator kit's static checks (hack/test.sh runs them): the alerting rules (promtool check and unit tests),
# the PrometheusRule in sync with them, the Grafana dashboards (generated, and naming only metrics the daemons
# register), and the Kubernetes overlays (kubectl kustomize + schema and structural checks).
#
#   hack/operator/check.sh [BIN_DIR]    BIN_DIR: the daemons, for check-config of the ConfigMap (optional)
#
# Needs promtool (Debian: prometheus), kubectl (Debian: kubernetes-client) and Debian's python3 with venv; the
# Python packages (hack/operator/requirements.txt, pinned) go into a venv in target/py-operator.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin_dir=${1:-}

for cmd in promtool kubectl /usr/bin/python3; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "hack/operator/check.sh: $cmd is missing" >&2; exit 1; }
done
venv=target/py-operator
reqs=hack/operator/requirements.txt
if ! cmp -s "$reqs" "$venv/requirements.txt" 2>/dev/null; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv" || { echo "hack/operator/check.sh: cannot create a Python venv (python3-venv)" >&2; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check --require-virtualenv -r "$reqs" \
    || { echo "hack/operator/check.sh: cannot install $reqs from PyPI" >&2; exit 1; }
  cp "$reqs" "$venv/requirements.txt"
fi

promtool check rules deploy/prometheus/hybridnet.rules.yml
promtool test rules deploy/prometheus/hybridnet.rules.test.yml
/usr/bin/python3 hack/operator/sync_rules.py --check
if [ -e hack/operator/dashboards.py ]; then
  /usr/bin/python3 hack/operator/dashboards.py --check
fi
"$venv/bin/python" hack/operator/check_kubernetes.py ${bin_dir:+--bin-dir "$bin_dir"}

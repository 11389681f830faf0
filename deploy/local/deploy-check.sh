#!/usr/bin/env bash
# `make deploy-check`: validate deploy/ offline. Kubernetes manifests against the API schemas
# (kubernetes-validate, strict), the compose files (docker-compose config), the Prometheus config
# (promtool check config, and that it is the template's rendering), the Grafana files (JSON/YAML).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_commands promtool:prometheus docker-compose:docker-compose
command -v kubernetes-validate >/dev/null || die "kubernetes-validate not found: run make setup"

say "Prometheus config"
python3 "$DEPLOY/prometheus/render.py" --check | sed 's/^/    /'
promtool check config "$DEPLOY/prometheus/prometheus.yml" 2>&1 | sed 's/^/    /'

say "compose files (docker-compose config)"
for variant in "" docker-compose.local.yml docker-compose.gpu.yml; do
  docker-compose -f "$DEPLOY/docker-compose.yml" ${variant:+-f "$DEPLOY/$variant"} config -q
  echo "    docker-compose.yml${variant:+ + $variant}: valid"
done

say "Kubernetes manifests (kubernetes-validate --strict, API 1.27 and the newest it knows)"
for version in 1.27.0 ""; do
  kubernetes-validate --strict --quiet ${version:+-k "$version"} "$DEPLOY"/k8s/*.yaml
done
echo "    $(ls "$DEPLOY"/k8s/*.yaml | wc -l) files valid"

say "Grafana provisioning and dashboard"
python3 - "$DEPLOY/grafana" <<'PY'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
for path in sorted(root.rglob("*.json")):
    panels = json.loads(path.read_text())["panels"]
    print(f"    {path.relative_to(root)}: {len(panels)} panels, valid JSON")
for path in sorted(root.rglob("*.yml")):
    text = path.read_text()
    assert "apiVersion: 1" in text, f"{path}: not a Grafana provisioning file"
    print(f"    {path.relative_to(root)}: provisioning file")
PY
say "deploy-check: OK"

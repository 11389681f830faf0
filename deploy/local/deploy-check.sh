#!/usr/bin/env bash
# `make deploy-check`: validate deploy/ offline. The Prometheus config and alert rules (promtool check
# config; promtool test rules on synthetic series; both rendered files up to date), the compose files
# (docker-compose config), every Kubernetes overlay rendered by `kubectl kustomize` and checked against
# the API schemas (kubernetes-validate --strict) and by checkov, the Dockerfiles by checkov, and the
# Grafana files. CHECKOV names the checkov binary (the Makefile installs a pinned one under .tools/).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_commands promtool:prometheus docker-compose:docker-compose kubectl:kubernetes-client
command -v kubernetes-validate >/dev/null || die "kubernetes-validate not found: run make setup"
CHECKOV=${CHECKOV:-checkov}
command -v "$CHECKOV" >/dev/null || die "checkov not found ($CHECKOV): run it through make deploy-check"
WORK=$(mktemp -d /var/tmp/moe-deploy-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Checks left out, each for a reason; every other check of checkov's kubernetes and dockerfile sets runs.
SKIPPED_CHECKS=(
  CKV_K8S_43  # image by digest: the overlays name a release tag; put `digest:` in an overlay's images entry
  CKV_K8S_15  # imagePullPolicy Always: release tags are never reused, and IfNotPresent lets a node start
              # pods while the registry is down
  CKV_DOCKER_2  # HEALTHCHECK in the image: one image, two services; compose and k8s define each one's probe
  CKV_DOCKER_7  # base image tag: checkov reads FROM ${BASE_IMAGE} as untagged; the default is a fixed tag
)

say "Prometheus config and alert rules"
python3 "$DEPLOY/prometheus/render.py" --check | sed 's/^/    /'
promtool check config "$DEPLOY/prometheus/prometheus.yml" 2>&1 | sed 's/^/    /'
(cd "$DEPLOY/prometheus" && promtool test rules alerts.test.yml) 2>&1 | sed 's/^/    /'

say "compose files (docker-compose config)"
for variant in "" docker-compose.local.yml docker-compose.gpu.yml; do
  docker-compose -f "$DEPLOY/docker-compose.yml" ${variant:+-f "$DEPLOY/$variant"} config -q
  echo "    docker-compose.yml${variant:+ + $variant}: valid"
done

say "Kubernetes overlays: kubectl kustomize (kubectl $(kubectl version --client -o json | python3 -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'))"
for overlay in "$DEPLOY"/k8s/overlays/*/; do
  name=$(basename "$overlay")
  mkdir -p "$WORK/k8s"
  kubectl kustomize "$overlay" 2>"$WORK/kustomize.log" >"$WORK/k8s/$name.yaml" \
    || { cat "$WORK/kustomize.log" >&2; die "kubectl kustomize $overlay failed"; }
  echo "    overlays/$name: $(grep -c '^kind:' "$WORK/k8s/$name.yaml") objects"
done

say "rendered overlays against the API schemas (kubernetes-validate --strict, API 1.27 and the newest it knows)"
# The Prometheus Operator's kinds (PodMonitor, PrometheusRule) have no schema there: the rule's content
# is the promtool-tested rules file (render.py --check above); tests/test_deploy_files.py checks the rest.
for version in 1.27.0 ""; do
  kubernetes-validate --strict --quiet --no-warn ${version:+-k "$version"} "$WORK"/k8s/*.yaml
done
echo "    $(ls "$WORK"/k8s/*.yaml | wc -l) overlays valid"

say "checkov (kubernetes on the rendered overlays, dockerfile on deploy/docker), skipping ${SKIPPED_CHECKS[*]}"
skip=$(IFS=,; echo "${SKIPPED_CHECKS[*]}")
for scan in "kubernetes $WORK/k8s" "dockerfile $DEPLOY/docker"; do
  set -- $scan
  if ! "$CHECKOV" --framework "$1" -d "$2" --skip-check "$skip" --compact --quiet --skip-download \
      >"$WORK/checkov.log" 2>&1; then
    cat "$WORK/checkov.log" >&2; die "checkov found problems ($1)"
  fi
  echo "    $1: $(grep -o 'Passed checks: [0-9]*, Failed checks: [0-9]*' "$WORK/checkov.log")"
done

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

#!/usr/bin/env bash
# `make cluster` / `make cluster-down`: the compose cluster of compose-test (3 expert servers, a gateway,
# Prometheus) built on a local Debian base, left running for you. `up` starts dockerd if none runs (it
# keeps running); `down` removes what `up` made: the containers, their network, the model volume (so the
# next `up` writes the model afresh) and the build extras; and stops that dockerd if nothing else runs
# on it. The images stay, as build cache (docker image rm moe-serve:cpu moe-serve-prometheus:local
# moe-serve-base:bookworm reclaims them).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PROJECT=${MOE_COMPOSE_PROJECT:-moe-serve}
export MOE_GATEWAY_PORT=${MOE_GATEWAY_PORT:-50050}
export MOE_PROMETHEUS_PORT=${MOE_PROMETHEUS_PORT:-9090}

up() {
  say "[1/5] tools"; ensure_tools
  say "[2/5] Docker engine"; ensure_dockerd
  say "[3/5] base image"; ensure_base_image
  local log; log=$(mktemp /var/tmp/moe-cluster-build.XXXXXX.log)
  say "[4/5] images"; prepare_build_extra; build_images "$log"; rm -f "$log"
  say "[5/5] starting the cluster (project $PROJECT)"
  compose up -d --no-build gateway prometheus 2>&1 | sed 's/^/    /'
  say "waiting for the gateway's gRPC health (it waits for the expert servers)"
  if ! compose exec -T gateway moe-client --address 127.0.0.1:50050 --timeout 5 health --wait 300; then
    compose logs --no-color --tail=40 >&2
    die "the gateway did not become healthy; the cluster is still up (make cluster-down stops it)"
  fi
  cat <<MSG

moe-serve cluster is running (project $PROJECT):
  gateway     127.0.0.1:$MOE_GATEWAY_PORT     moe-client --address 127.0.0.1:$MOE_GATEWAY_PORT forward --shape 2,10,512
  Prometheus  http://127.0.0.1:$MOE_PROMETHEUS_PORT   (targets: /targets; try moe_expert_tokens_total)
  logs        docker-compose -p $PROJECT -f deploy/docker-compose.yml -f deploy/docker-compose.local.yml logs -f
  stop        make cluster-down
MSG
}

down() {
  if ! docker info >/dev/null 2>&1; then say "no Docker engine runs: nothing to stop"; return 0; fi
  say "stopping the cluster (project $PROJECT)"
  compose down --volumes --remove-orphans 2>&1 | sed 's/^/    /'
  rm -f "$DEPLOY"/build-extra/ca-certificates.crt "$DEPLOY"/build-extra/torch-*.whl
  if [ -f "$STATE/dockerd.pid" ] && [ -z "$(docker ps -q)" ]; then
    STARTED_DOCKERD=1 stop_dockerd
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac

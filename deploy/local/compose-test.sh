#!/usr/bin/env bash
# `make compose-test`: build the images on a local Debian base, start the compose cluster (3 expert servers,
# a gateway, Prometheus), wait for gRPC health, run the client against the gateway's published port and
# check its answer against the in-process reference, check that Prometheus scraped every service, and
# bring it all down. Cleans up after itself, also on failure; stops dockerd if it started it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PROJECT=${MOE_COMPOSE_PROJECT:-moe-serve-ci}
WORK=$(mktemp -d /var/tmp/moe-compose-test.XXXXXX)
PATH="$ROOT/.venv/bin:$PATH"  # the host's moe-client and moe-serve (make setup)
command -v moe-client >/dev/null || die "moe-client not found: run make setup first"

export MOE_GATEWAY_PORT=${MOE_GATEWAY_PORT:-$(free_port)}
export MOE_PROMETHEUS_PORT=${MOE_PROMETHEUS_PORT:-$(free_port)}
GATEWAY=127.0.0.1:$MOE_GATEWAY_PORT
PROMETHEUS=http://127.0.0.1:$MOE_PROMETHEUS_PORT

UP=""
cleanup() {
  local status=$?
  if [ -n "$UP" ]; then
    if [ "$status" != 0 ]; then
      say "failed: service logs follow"
      compose logs --no-color --tail=40 >&2 || true
    fi
    say "bringing the cluster down"
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  stop_dockerd
  rm -rf "$WORK"
  if [ "$status" = 0 ]; then say "compose-test: PASSED in $(($(date +%s) - T0)) s"
  else say "compose-test: FAILED (status $status) after $(($(date +%s) - T0)) s"; fi
}
trap cleanup EXIT

say "[1/7] tools"; ensure_tools
say "[2/7] Docker engine"; ensure_dockerd
compose down -v --remove-orphans >/dev/null 2>&1 || true  # leftovers of an interrupted run
say "[3/7] base image"; ensure_base_image
say "[4/7] images"; prepare_build_extra; build_images "$WORK/build.log"

say "[5/7] starting the cluster (project $PROJECT): gateway on $GATEWAY, Prometheus on $PROMETHEUS"
UP=1
compose up -d --no-build gateway prometheus 2>&1 | sed 's/^/    /'
moe-serve create-model "$WORK/model" >/dev/null &  # the same embedded model on the host, for the check
model_pid=$!
say "waiting for the gateway's gRPC health (it waits for the expert servers)"
if ! moe-client --address "$GATEWAY" --timeout 5 health --wait 300; then die "the gateway did not become healthy"; fi
wait "$model_pid"

say "[6/7] client against $GATEWAY"
moe-client --address "$GATEWAY" info | sed 's/^/    /'
moe-client --address "$GATEWAY" forward --shape 4,16,512 --repeat 3 | sed 's/^/    /'
if ! moe-serve verify --gateway "$GATEWAY" --checkpoint "$WORK/model" --tokens 256 | sed 's/^/    /'; then
  die "the cluster's output differs from the in-process reference"
fi

say "[7/7] Prometheus scraped every service"
if ! python3 "$DEPLOY/local/check_prometheus.py" --url "$PROMETHEUS" --experts 3 --forwards 4 --timeout 120 \
    | sed 's/^/    /'; then
  die "Prometheus did not see every service"
fi

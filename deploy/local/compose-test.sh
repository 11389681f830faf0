#!/usr/bin/env bash
# `make compose-test`: build the images on a local Debian base, start the compose cluster (3 expert servers,
# a gateway, Prometheus), wait for gRPC health, run the client against the gateway's published port and
# check its answer against the in-process reference; kill one expert container (SIGKILL) under load and
# require that no request fails, then restart it and see it serve again; check that Prometheus scraped
# every service and loaded the alert rules; bring it all down. Cleans up after itself, also on failure;
# stops dockerd if it started it.
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

say "[1/8] tools"; ensure_tools
say "[2/8] Docker engine"; ensure_dockerd
compose down -v --remove-orphans >/dev/null 2>&1 || true  # leftovers of an interrupted run
say "[3/8] base image"; ensure_base_image
say "[4/8] images"; prepare_build_extra; build_images "$WORK/build.log"
say "the image's versions (moe-serve --version) are constraints.txt's"
docker run --rm --read-only "${MOE_IMAGE:-moe-serve:cpu}" moe-serve --version >"$WORK/versions.txt"
sed 's/^/    /' "$WORK/versions.txt"
python3 - "$WORK/versions.txt" "$ROOT/constraints.txt" <<'PY' || die "the image's versions differ from constraints.txt"
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
lines = [l.split("#")[0].strip() for l in open(sys.argv[2])]
pins = {norm(n): v for n, v in (l.split("==") for l in lines if l)}
image = dict(l.strip().rsplit(" ", 1) for l in open(sys.argv[1]) if " cuda " not in l)
wrong = {k: (v, pins[k]) for k, v in image.items() if k in pins and v.split("+")[0] != pins[k]}
print(f"    {sum(k in pins for k in image)} pinned packages checked" if not wrong else f"    image vs pin: {wrong}")
sys.exit(1 if wrong else 0)
PY

say "[5/8] starting the cluster (project $PROJECT): gateway on $GATEWAY, Prometheus on $PROMETHEUS"
UP=1
compose up -d --no-build gateway prometheus 2>&1 | sed 's/^/    /'
moe-serve create-model "$WORK/model" >/dev/null &  # the same embedded model on the host, for the check
model_pid=$!
say "waiting for the gateway's gRPC health (it waits for the expert servers)"
if ! moe-client --address "$GATEWAY" --timeout 5 health --wait 300; then die "the gateway did not become healthy"; fi
wait "$model_pid"

say "[6/8] client against $GATEWAY"
moe-client --address "$GATEWAY" info | sed 's/^/    /'
moe-client --address "$GATEWAY" forward --shape 4,16,512 --repeat 3 | sed 's/^/    /'
if ! moe-serve verify --gateway "$GATEWAY" --checkpoint "$WORK/model" --tokens 256 | sed 's/^/    /'; then
  die "the cluster's output differs from the in-process reference"
fi
# Containers are other hosts to the gateway: its RunExperts calls go over the servers' TCP side channels.
# (Counted by server: a link closed after a call timed out is opened again, and logged again.)
side=$(compose logs --no-color gateway 2>/dev/null | grep -o "expert server [^ ]* ([^)]*): RunExperts over the TCP side channel" \
  | sort -u | wc -l || true)
echo "    the gateway calls ${side:-0} of 3 expert servers over their TCP side channel"
[ "${side:-0}" -ge 3 ] || die "the gateway does not use the expert servers' TCP side channels"

say "[7/8] expert-1 killed under load (every expert has another replica), then restarted"
# The restarted process's own counter: RunExperts calls it answered OK since it started, so > 0 means the
# gateway found it again and routes to it.
served_since_start() {
  compose exec -T "$1" python3 -c 'import re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=5).read().decode()
print(int(sum(float(v) for v in re.findall(r"^moe_requests_total[{](?=[^}]*rpc=.RunExperts.)(?=[^}]*code=.OK.)[^}]*[}] (\S+)", text, re.M))))'
}
rejoined() {
  local n=0
  for _ in $(seq 120); do
    n=$(served_since_start "$1" 2>/dev/null || echo 0)
    [ "${n:-0}" -gt 0 ] && { echo "    $1 serves again: $n RunExperts calls answered since its restart"; return 0; }
    sleep 1
  done
  echo "    $1 did not serve again within 120 s" >&2; return 1
}
export -f compose say die served_since_start rejoined
export PROJECT DEPLOY T0
if ! (cd "$ROOT" && python -m scripts.load_during --address "$GATEWAY" --checkpoint "$WORK/model" \
    --step "compose kill expert-1" \
    --step "compose start expert-1 && rejoined expert-1" | sed 's/^/    /'); then
  die "requests failed while an expert server was down, or it did not rejoin"
fi

say "[8/8] Prometheus scraped every service and loaded the alert rules"
if ! python3 "$DEPLOY/local/check_prometheus.py" --url "$PROMETHEUS" --experts 3 --forwards 4 --timeout 120 \
    | sed 's/^/    /'; then
  die "Prometheus did not see every service"
fi

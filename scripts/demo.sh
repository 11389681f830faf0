#!/usr/bin/env bash
# `make demo`: the embedded model on two expert servers and a gateway on loopback, one client call,
# a check against the in-process reference, then a clean shutdown. Needs the venv's tools on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR=${MOE_DEMO_DIR:-.demo}
BASE_PORT=${MOE_DEMO_PORT:-50050}
GATEWAY=127.0.0.1:$BASE_PORT
WORKER1=127.0.0.1:$((BASE_PORT + 1))
WORKER2=127.0.0.1:$((BASE_PORT + 2))
MODEL=$DEMO_DIR/model
LOGS=$DEMO_DIR/logs
mkdir -p "$LOGS"

for port in "$BASE_PORT" $((BASE_PORT + 1)) $((BASE_PORT + 2)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is in use; set MOE_DEMO_PORT to another base port" >&2
    exit 1
  fi
done

[ -f "$MODEL/config.json" ] || moe-serve create-model "$MODEL"

pids=()
stop_all() {
  [ ${#pids[@]} -eq 0 ] && return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  pids=()
  return $status
}
trap 'stop_all; exit 1' INT TERM
trap 'stop_all' EXIT

show() {  # print a service's log so far, indented under its name
  echo "---- $1 ----"
  sed 's/^/  /' "$LOGS/$1.log"
}

moe-expert-server --checkpoint "$MODEL" --name worker1 --experts 0-3 --host 127.0.0.1 --port "${WORKER1##*:}" \
  >"$LOGS/worker1.log" 2>&1 &
pids+=($!)
moe-expert-server --checkpoint "$MODEL" --name worker2 --experts 4-7 --host 127.0.0.1 --port "${WORKER2##*:}" \
  >"$LOGS/worker2.log" 2>&1 &
pids+=($!)
moe-gateway --checkpoint "$MODEL" --servers "$WORKER1,$WORKER2" --host 127.0.0.1 --port "$BASE_PORT" \
  >"$LOGS/gateway.log" 2>&1 &
pids+=($!)

if ! moe-client --address "$GATEWAY" health --wait 90 >/dev/null; then
  for name in worker1 worker2 gateway; do show $name; done
  echo "demo: the gateway did not become healthy" >&2
  exit 1
fi
for name in worker1 worker2 gateway; do show $name; done
echo
moe-client --address "$GATEWAY" forward --shape 2,10,512
echo
moe-serve verify --gateway "$GATEWAY" --checkpoint "$MODEL" --tokens 256
echo
echo "Stopping the cluster (SIGTERM)..."
trap - EXIT
stop_all
echo "All services stopped cleanly. Logs: $LOGS/"

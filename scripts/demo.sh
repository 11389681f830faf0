#!/usr/bin/env bash
# `make demo`: the embedded model on two expert servers and a gateway on loopback, one client call,
# a check against the in-process reference; beside it the embedded causal LM (random weights, so its
# text is gibberish) on two more expert servers, a gateway and the OpenAI-compatible HTTP API, streaming
# a short generation through gRPC and through HTTP with curl; then a clean shutdown. Needs the venv's
# tools on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR=${MOE_DEMO_DIR:-.demo}
BASE_PORT=${MOE_DEMO_PORT:-50050}
GATEWAY=127.0.0.1:$BASE_PORT
WORKER1=127.0.0.1:$((BASE_PORT + 1))
WORKER2=127.0.0.1:$((BASE_PORT + 2))
MODEL=$DEMO_DIR/model
LM=$DEMO_DIR/tiny-lm
LM_GATEWAY=127.0.0.1:$((BASE_PORT + 3))
HTTP_PORT=${MOE_DEMO_HTTP_PORT:-8000}
LOGS=$DEMO_DIR/logs
mkdir -p "$LOGS"

for port in "$BASE_PORT" $((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3)) $((BASE_PORT + 4)) \
    $((BASE_PORT + 5)) "$HTTP_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is in use; set MOE_DEMO_PORT (or MOE_DEMO_HTTP_PORT) to another" >&2
    exit 1
  fi
done

[ -f "$MODEL/config.json" ] || moe-serve create-model "$MODEL"
[ -f "$LM/tokenizer_config.json" ] || moe-serve create-model --causal-lm "$LM"

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
# The causal LM's cluster starts beside it (its services load while the first is shown).
for i in 1 2; do
  moe-expert-server --checkpoint "$LM" --name "lm-worker$i" --experts "$([ $i = 1 ] && echo 0-3 || echo 4-7)" \
    --host 127.0.0.1 --port $((BASE_PORT + 3 + i)) --log-level WARNING >"$LOGS/lm-worker$i.log" 2>&1 &
  pids+=($!)
done
moe-gateway --checkpoint "$LM" --servers "127.0.0.1:$((BASE_PORT + 4)),127.0.0.1:$((BASE_PORT + 5))" \
  --host 127.0.0.1 --port $((BASE_PORT + 3)) >"$LOGS/lm-gateway.log" 2>&1 &
pids+=($!)
moe-openai --checkpoint "$LM" --gateway "$LM_GATEWAY" --host 127.0.0.1 --port "$HTTP_PORT" --log-level WARNING \
  >"$LOGS/openai.log" 2>&1 &
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

if ! moe-client --address "$LM_GATEWAY" health --wait 90 >/dev/null; then
  for name in lm-worker1 lm-worker2 lm-gateway; do show $name; done
  echo "demo: the causal LM's gateway did not become healthy" >&2
  exit 1
fi
echo "The embedded causal LM ($LM: qwen3_moe, random weights, so the text is gibberish), greedy, through gRPC:"
moe-client --address "$LM_GATEWAY" generate "The capital of France is" --max-new-tokens 12
echo
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$HTTP_PORT/health" >/dev/null && break; sleep 0.2; done
echo "The same model through the OpenAI API (moe-openai on :$HTTP_PORT), streamed as server-sent events:"
echo "\$ curl -sN http://127.0.0.1:$HTTP_PORT/v1/chat/completions -H 'Content-Type: application/json' -d '{...}'"
curl -sSN "http://127.0.0.1:$HTTP_PORT/v1/chat/completions" -H "Content-Type: application/json" -d '{
  "model": "tiny-lm", "messages": [{"role": "user", "content": "Hello! Who are you?"}],
  "max_tokens": 6, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}' | grep -v '^$'
echo
echo "Stopping the cluster (SIGTERM)..."
trap - EXIT
stop_all
echo "All services stopped cleanly. Logs: $LOGS/"

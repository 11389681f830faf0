# moe-serve: `make demo` runs the demo cluster, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test protos lint bench bench-load soak clean deploy-check compose-test cluster cluster-down

setup: $(STAMP)

$(STAMP): requirements-dev.txt client/pyproject.toml services/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

## Regenerate client/moe_client/pb from protos/ (tests fail if the committed stubs drift).
protos: setup
	$(BIN)/python scripts/gen_protos.py

## Two expert servers and a gateway on loopback, a client call, then a clean shutdown.
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -q tests

## Validate deploy/ offline: k8s manifests, compose files, Prometheus config, Grafana files.
deploy-check: setup
	PATH="$(abspath $(BIN)):$$PATH" bash deploy/local/deploy-check.sh

## The docker-compose cluster for real (needs root: dockerd, debootstrap): build, up, client, Prometheus, down.
compose-test: setup
	PATH="$(abspath $(BIN)):$$PATH" bash deploy/local/compose-test.sh

## Start the same cluster and leave it running (gateway on 127.0.0.1:50050, Prometheus on :9090).
cluster:
	bash deploy/local/cluster.sh up

cluster-down:
	bash deploy/local/cluster.sh down

## 10 minutes of Forward + Generate load on 2 replicas and a gateway, a replica killed each minute (docs/reliability.md).
soak: setup
	$(BIN)/python -m scripts.soak --duration 600 --chaos-every 60
## Load benchmark (about 10 minutes on 2 cores): 1-128 concurrent Generate/Forward clients on a loopback
## cluster, batching and overlap on and off; results into docs/benchmarks.md.
bench-load: setup
	$(BIN)/python -m benchmarks.load --write-doc docs/benchmarks.md

bench: bench-load

## Transport and MoE-layer benchmarks, ours vs torch.distributed.rpc vs in-process; prints tables and
## writes JSON to bench-results/ (docs/benchmarks.md). BENCH_ARGS=--full for more points (slower).
bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check client services tests scripts benchmarks

clean:
	rm -rf $(VENV) .demo

# moe-serve: `make demo` runs the demo cluster, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help setup demo test protos lint bench bench-load bench-links soak clean deploy-check compose-test cluster cluster-down

## List the targets and what each does (the default goal).
help:
	@awk '/^## /{doc = doc (doc ? " " : "") substr($$0, 4); next} \
	     /^[a-z][a-z-]*:/{if (doc) {split($$0, t, ":"); printf "%-14s %s\n", t[1], doc}; doc = ""; next} \
	     {doc = ""}' $(MAKEFILE_LIST)

## Create .venv and install the client, the services and the development tools (again when
## requirements-dev.txt or a pyproject.toml changes).
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

## The test suite (real servers on loopback, a real Prometheus; about 3 minutes on 2 cores).
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

## Stop the cluster that `make cluster` started.
cluster-down:
	bash deploy/local/cluster.sh down

## 10 minutes of Forward + Generate load on 2 replicas and a gateway, a replica killed each minute (docs/reliability.md).
soak: setup
	$(BIN)/python -m scripts.soak --duration 600 --chaos-every 60
## Transport and MoE-layer benchmarks, ours vs torch.distributed.rpc vs in-process; prints tables and
## writes JSON to bench-results/ (docs/benchmarks.md). BENCH_ARGS=--full for more points (slower).
bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

## Load benchmark (about 10 minutes on 2 cores): 1-128 concurrent Generate/Forward clients on a loopback
## cluster, batching and overlap on and off; prints the tables (LOAD_ARGS="--write-doc docs/benchmarks.md"
## rewrites that doc's section).
bench-load: setup
	$(BIN)/python -m benchmarks.load $(LOAD_ARGS)

## Expert servers across shaped links (root: network namespaces, tc tbf at 1/10/25 Gbit/s, a delaying relay
## for 0-200 us RTT; about 25 minutes on 2 cores): bytes/s against the rate, a MoE layer against RTT +
## bytes/rate, Generate; then the sizing model's check (docs/deployment-sizing.md). LINKS_ARGS=--quick.
bench-links: setup
	$(BIN)/python -m benchmarks.shaped_links $(LINKS_ARGS)
	$(BIN)/python -m benchmarks.sizing --check bench-results/shaped-links.json

# buf, pinned, from npm into a folder of this clone (.tools/, git-ignored; no global install).
BUF_VERSION := 1.75.0
BUF := .tools/buf-$(BUF_VERSION)/node_modules/.bin/buf
$(BUF):
	npm install --prefix .tools/buf-$(BUF_VERSION) --no-save --no-audit --no-fund --loglevel=error \
	  @bufbuild/buf@$(BUF_VERSION)
	$@ --version

## ruff, then buf on protos/ (buf.yaml): `buf lint`, and `buf breaking` against the previous commit
## (BUF_AGAINST=<buf input> for another baseline, e.g. '.git#branch=main,subdir=protos').
lint: setup $(BUF)
	$(BIN)/ruff check client services tests scripts benchmarks
	$(BUF) lint
	@against='$(BUF_AGAINST)'; \
	if [ -z "$$against" ] && git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null 2>&1; then \
	  against='.git#ref=HEAD~1,subdir=protos'; fi; \
	if [ -z "$$against" ]; then \
	  echo "buf breaking: not checked: no previous commit here (a shallow or first-commit clone, or no git)"; \
	else echo "$(BUF) breaking protos --against '$$against'"; $(BUF) breaking protos --against "$$against"; fi

## Remove .venv, the demo's files and the tools make lint installed.
clean:
	rm -rf $(VENV) .demo .tools

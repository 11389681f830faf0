# moe-serve: `make demo` runs the demo cluster, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test protos lint bench clean

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

## Transport and MoE-layer benchmarks, ours vs torch.distributed.rpc vs in-process; prints tables and
## writes JSON to bench-results/ (docs/benchmarks.md). BENCH_ARGS=--full for more points (slower).
bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check client services tests scripts

clean:
	rm -rf $(VENV) .demo

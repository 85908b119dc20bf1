# The two commands: `make run` and `make test`. Everything else is a convenience.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= routes.yaml
# Exact versions of every dependency, resolved from pyproject.toml's ranges by `make lock`.
LOCK   := constraints.txt
LATEST := .venv-latest

.PHONY: run test lint bench docs venv peers clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed: on Debian run 'apt-get install -y python3-venv'"; exit 1; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

## make run: install and run the gateway on routes.yaml (REST on :8080, admin/metrics on :8081)
run: $(STAMP)
	$(BIN)/gateway validate $(CONFIG)
	$(BIN)/gateway run --config $(CONFIG)

## make test: install, start the peers the tests need, run the whole suite
test: $(STAMP) peers
	@bash scripts/get-helm.sh >/dev/null
	$(BIN)/pytest -q

peers:
	@bash scripts/peers.sh

lint: $(STAMP)
	$(BIN)/ruff check gateway connectors tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

.PHONY: lock test-latest

## make lock: re-resolve constraints.txt (Python 3.11, Linux x86_64), keeping its pins where pyproject.toml
## still allows them; LOCK_FLAGS=--upgrade moves all to the newest, --upgrade-package NAME one
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q 'uv>=0.5'
	$(BIN)/uv pip compile pyproject.toml --all-extras --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --custom-compile-command 'make lock' --quiet $(LOCK_FLAGS) -o $(LOCK)

## make test-latest: the suite on the newest releases pyproject.toml allows (no lock), in its own venv;
## run it on a schedule: a failure names an upper bound or a lock to move
test-latest: peers
	@test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	@bash scripts/get-helm.sh >/dev/null
	$(LATEST)/bin/pytest -q

## make docs: the documentation site from docs/ into site/ (generated parts: docs/gen_reference.py)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP)
	@bash scripts/peers.sh --bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var site .pytest_cache .mypy_cache .ruff_cache

# The two commands: `make run` and `make test`. Everything else is a convenience.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= routes.yaml

.PHONY: run test lint bench venv peers clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed: on Debian run 'apt-get install -y python3-venv'"; exit 1; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
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

bench: $(STAMP)
	@bash scripts/peers.sh --bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

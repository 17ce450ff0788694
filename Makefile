# lmstack: `make serve` runs the platform, `make test` passes the tests. Both bootstrap .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP     := $(VENV)/.installed-dev

.PHONY: install install-dev proto test lint serve shell bench clean

install: $(RUNTIME_STAMP) proto

install-dev: $(DEV_STAMP) proto

# Idempotent: re-runs only when pyproject.toml changes (or .venv is gone).
# torch==2.13.0 goes first: an unpinned torch would pull a multi-GB CUDA build.
# Serving needs only the runtime dependencies; the tests add the dev extra (transformers, Ray, ...).
$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	touch $(RUNTIME_STAMP)

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(PIP) install -q -e '.[dev]'
	touch $(DEV_STAMP)

# gRPC stubs are generated from proto/ (never committed), into services/gen/.
proto: $(RUNTIME_STAMP)
	$(PY) -m services.protogen

lint: install-dev
	$(VENV)/bin/ruff check .

test: install-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/lmstack serve

# A shell with .venv activated, so `lmstack ...` is on PATH (exit returns to the old shell).
shell: install
	@echo "lmstack's venv is active in this shell; 'exit' leaves it."
	@. $(VENV)/bin/activate && exec $${SHELL:-/bin/bash} -i

bench: install-dev
	$(PY) bench/tokenizer.py
	$(PY) bench/generate.py
	$(PY) bench/serving.py
	$(PY) bench/finetune.py

clean:
	rm -rf $(VENV) services/gen .pytest_cache .ruff_cache

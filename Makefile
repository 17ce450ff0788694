# lmstack: `make serve` runs the platform, `make test` passes the tests. Both bootstrap .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install proto test lint serve bench clean

install: $(STAMP) proto

# Idempotent: re-runs only when pyproject.toml changes (or .venv is gone).
# torch==2.13.0 goes first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# gRPC stubs are generated from proto/ (never committed), into services/gen/.
proto: $(STAMP)
	$(PY) -m services.protogen

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/lmstack serve

bench: install
	$(PY) bench/tokenizer.py
	$(PY) bench/generate.py
	$(PY) bench/serving.py
	$(PY) bench/finetune.py

clean:
	rm -rf $(VENV) services/gen .pytest_cache .ruff_cache

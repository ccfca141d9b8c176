# Two entry points (see README): `make serve` runs the service, `make test` runs the checks.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# CPU installs pin torch 2.13.0. GPU servers: make TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install serve test lint bench

$(VENV)/.installed: pyproject.toml client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -c constraints.txt -e ./client -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/rdserve serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/bandit -q -c pyproject.toml -r app models

test: install lint
	bash scripts/ensure-redis
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/run

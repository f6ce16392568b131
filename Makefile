# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTHON ?= python3

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# pyproject.toml pins torch==2.13.0 so pip takes the CPU wheel on local disk
# instead of a multi-GB CUDA build (see README "GPU install" for GPUs).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: setup
	dvc repro
	dvc push --quiet || echo "warning: dvc push to the local remote failed" >&2
	@echo
	@echo "Zoo built at $(CURDIR)/data/zoo"
	@echo "  teachers:   data/zoo/teachers/<style>/  (diffusers StableDiffusionPipeline folders)"
	@echo "  base:       data/zoo/base/"
	@echo "  samples:    data/zoo/samples.png  (rows: base, then each teacher)"
	@echo "  manifest:   data/zoo/zoo.json  (sizes, timings, classifier accuracy)"

test: setup
	$(BIN)/ruff check dmm pipelines tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -ra

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -ra -m "not slow"

lint: setup
	$(BIN)/ruff check dmm pipelines tests benchmarks
	$(BIN)/ruff format --check dmm pipelines tests benchmarks

bench: setup
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

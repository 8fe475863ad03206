# The README's two commands:  `make train`  and  `make test`.
# Each creates .venv on first use: torch==2.13.0 first (the CPU build on this machine), then the project,
# so that the project's `torch>=` range is already satisfied and pip pulls no CUDA packages.
#
# The container image (Dockerfile, deploy/image/, deploy/README.md "Image"; needs podman, not run by .ci/run):
#   make image        deploy/image/build.sh: podman build from the local base localhost/evergreen-base:<release>
#                     (build it once with deploy/image/build-base.sh, mmdebstrap); TORCH_VARIANT=cu126 for CUDA
#   make image-test   build, then deploy/image/test.sh: a cartpole run and a replay shard's health in the image

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRESET ?= cartpole
ARGS   ?=

.PHONY: train test test-all lint bench proto clean image image-test

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

image:  ## the container image (deploy/image/build.sh; environment: IMAGE, TAG, TORCH_VARIANT, BASE_IMAGE)
	bash deploy/image/build.sh

image-test: image  ## build the image, then run it (deploy/image/test.sh)
	bash deploy/image/test.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

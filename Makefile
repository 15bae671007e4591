# Two commands on a fresh machine:
#   make run    set up .venv, then run the whole pipeline locally on the embedded defaults
#   make test   set up .venv, then run the test suite
# torch is installed first, alone, at the tested release; every later install is constrained by
# constraints.txt (which pins that same torch), so no dependency can swap it for another build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# pytest-xdist workers: the suite waits on many subprocesses (pipeline stages, servers), so two workers on two
# cores overlap those waits; TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2

IMAGE_REGISTRY ?= ghcr.io/flowgrpo
IMAGE_TAG      ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGES         := $(patsubst images/%.Dockerfile,%,$(wildcard images/*.Dockerfile))

.PHONY: setup run test lint clean images

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/flowgrpo run --preset shapes

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 $(PYTEST_ARGS)

# one linter, one formatter, and the layering as import-linter contracts (pyproject.toml [tool.importlinter])
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs flowgrpo-runs local_outputs .pytest_cache

# One image per recipe in images/, tagged <registry>/flowgrpo-<recipe>:<version> (the names the pipeline and
# the reward Deployments use). BuildKit reads images/<recipe>.Dockerfile.dockerignore, which keeps .venv out.
images:
	@docker info >/dev/null 2>&1 || { echo "make images: no Docker engine here ('docker info' failed); the recipes are still linted and checked by 'make test' (tests/test_images.py)" >&2; exit 1; }
	@for image in $(IMAGES); do \
	  echo "== $(IMAGE_REGISTRY)/flowgrpo-$$image:$(IMAGE_TAG)"; \
	  DOCKER_BUILDKIT=1 docker build -f images/$$image.Dockerfile -t $(IMAGE_REGISTRY)/flowgrpo-$$image:$(IMAGE_TAG) . || exit 1; \
	done

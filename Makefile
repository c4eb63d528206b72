# fedmtl: the two commands a new user runs first are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test test-slow test-deploy test-compose lint typecheck proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/fedmtl simulate configs/quickstart.toml

test: $(VENV)/.installed
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "slow and not compose" --ignore=tests/test_deploy_e2e.py

test-deploy: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow tests/test_deploy_e2e.py

# Builds docker/Dockerfile, runs a SuperLink and three SuperNode containers with docker compose
# or podman-compose, tears them down; skipped where neither is usable. BASE_IMAGE: the image's
# base (default: the Dockerfile's CUDA PyTorch image), e.g. a local Debian one on hosts without
# a registry. -s prints the measured wall time of each step.
BASE_IMAGE ?=
test-compose: $(VENV)/.installed
	FEDMTL_BASE_IMAGE=$(BASE_IMAGE) $(BIN)/python -m pytest -q -s -m compose tests/test_compose_e2e.py

lint: $(VENV)/.installed
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check fedmtl tests benchmarks
	$(BIN)/ruff format --check fedmtl tests benchmarks

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# Regenerate fedmtl/proto/*_pb2*.py from the .proto files (grpcio-tools is a dev extra).
proto: $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		fedmtl/proto/muscle_stream.proto

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

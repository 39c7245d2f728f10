# The two commands of the README: `make serve` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine takes torch's CPU wheel from local disk when pinned; on a CUDA host, set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: venv serve test lint typecheck pytest test-slow bench bench-engine docker-check docker-smoke clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

venv: $(BIN)/.installed

serve: venv
	$(BIN)/chatmed-serve $(ARGS)

lint: venv
	$(BIN)/ruff check engine server tests bench
	$(BIN)/ruff format --check engine server tests bench

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest

test: lint typecheck docker-check pytest

test-slow: venv
	$(BIN)/pytest -m slow -s -q

bench: venv
	$(BIN)/python -m bench.compare $(ARGS)

bench-engine: venv
	$(BIN)/python -m bench.engine $(ARGS)

# Compose file valid, Dockerfiles lint-clean (hadolint), pins current; no docker daemon needed.
docker-check: venv
	VENV=$(VENV) bash docker/check.sh

# Builds the CPU image and serves the demo under docker compose, starting a docker daemon if none runs.
docker-smoke: venv
	VENV=$(VENV) bash docker/smoke.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

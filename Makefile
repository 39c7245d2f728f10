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

test: lint typecheck pytest

test-slow: venv
	$(BIN)/pytest -m slow -s -q

bench-engine: venv
	$(BIN)/python -m bench.engine $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

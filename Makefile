# One command each: `make run` and `make test` create/reuse .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-stress lint format proto bench bench-model clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m service

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-stress: $(STAMP)
	$(BIN)/python -m pytest -q -s -m stress tests/stress

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: $(STAMP)
	$(BIN)/python -m service.grpc.codegen

bench-model: $(STAMP)
	$(BIN)/python -m bench.model

bench: $(STAMP)
	$(BIN)/python -m bench.server

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

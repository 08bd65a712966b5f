# One command each: `make run` and `make test` create/reuse .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

IMAGE ?= levit-serve
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
ENGINE ?= docker

.PHONY: install run test test-stress lint format proto bench bench-model bench-startup bench-memory device-wheels clean \
	deploy-tools deploy-check image image-gpu compose-up compose-down test-container chart-schema \
	v2-tools test-v2 test-v2-perf peers-tools bench-peers

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m service

# Debian's chromium and playwright (in .venv) for the page's browser tests, tests/test_page.py
.PHONY: browser-tools
browser-tools: $(STAMP)
	bash scripts/browser_tools.sh

test: $(STAMP) browser-tools
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
	$(BIN)/python -m bench.startup

# The peer servers (TorchServe, LitServe, MLServer, plain FastAPI) and their shared checkpoint, in .peers/
peers-tools:
	bash bench/peers/install.sh

# levit-serve side by side with the peers, one load generator for all (report: .peers/report.md)
bench-peers: $(STAMP) peers-tools
	$(BIN)/python -m bench.peers

# Time to ready per engine, cold (empty artifact and Inductor caches) and warm
bench-startup: $(STAMP)
	$(BIN)/python -m bench.startup

# The server's memory after start-up (PSS of every process), default linears and oneDNN pinned
bench-memory: $(STAMP)
	$(BIN)/python -m bench.memory --configs "default;onednn:LEVIT_LINEARS=onednn" --repeat 2

# Wheels a lent device machine lacks (cp312), into .whl/, for `bench/device.sh` (docs/gpu.md)
device-wheels: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/device_wheels.sh

deploy-tools:
	bash scripts/ci_deploy_tools.sh

# Open Inference Protocol (KServe v2): tritonclient and perf_analyzer in their own venvs under .tools/
v2-tools:
	bash scripts/v2_tools.sh

test-v2: $(STAMP) v2-tools
	$(BIN)/python -m pytest -q tests/test_v2.py tests/test_v2_tools.py

test-v2-perf: $(STAMP)
	bash scripts/v2_tools.sh perf
	$(BIN)/python scripts/v2_perf.py

deploy-check: $(STAMP) deploy-tools
	$(BIN)/python -m pytest -q tests/deploy

image:
	$(ENGINE) build -f docker/Dockerfile -t $(IMAGE):$(VERSION) .

image-gpu:
	$(ENGINE) build -f docker/Dockerfile.gpu -t $(IMAGE):$(VERSION)-gpu .

compose-up:
	docker compose -f docker/compose.yaml up -d --build --wait

compose-down:
	docker compose -f docker/compose.yaml down

test-container: $(STAMP)
	DEPLOY_CONTAINER_TEST=1 $(BIN)/python -m pytest -q tests/test_deploy_container.py

chart-schema: $(STAMP)
	$(BIN)/python scripts/chart_schema.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

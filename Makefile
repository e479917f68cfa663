# The two set-up commands: `make test` and `make demo` create .venv and install the project when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch 2.14.1 and torchvision 0.29.1 are the releases this project is developed and tested against.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo lint typecheck bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e ".[dev,vision,transformers]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# The main job: torchvision's raft_small converted into DEQ-Flow, trained briefly on synthetic flow (CPU, minutes).
demo: $(STAMP)
	$(PY) -m integrations.flow demo --out flow_demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Static types of the engine (implicit/), configured in pyproject.toml.
typecheck: $(STAMP)
	$(PY) -m mypy

# Benchmarks side by side with TorchDEQ 0.1.0, installed only here.
bench: $(STAMP)
	$(PY) -m pip install --quiet torchdeq==0.1.0
	$(PY) -m benchmarks.solver_overhead

clean-venv:
	rm -rf $(VENV)

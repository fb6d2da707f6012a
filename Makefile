# capsx: `make train` and `make test` work on a fresh clone (they create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test-packages train test bench gpu-check ui lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test-packages:  ## Debian's chromium and postgresql for the browser and database tests, where root apt-get can (else they skip)
	@bash scripts/install_test_packages.sh

train: install  ## the quickstart: a small CapsNet on the embedded `shapes` data set (no download)
	$(BIN)/capsx train recipes/quickstart.yaml

test: install test-packages  ## the whole suite, then its numerics-sensitive tests under a lower CPU class (CI runs exactly this)
	$(BIN)/python -m pytest -q
	$(BIN)/python tests/lower_isa.py -q

bench: install  ## the paper's CapsNet: capsx against the plain reference, train and inference images/s
	$(BIN)/capsx bench recipes/mnist-capsnet.yaml

gpu-check: install  ## on a CUDA machine: GPU tests, step times, memory, NCCL, resume, bench, pictures (<= 5 min)
	$(BIN)/python scripts/gpu_check.py

ui: install  ## MLflow UI on 127.0.0.1:5000 over runs/mlflow.db
	$(BIN)/capsx ui

lint: install
	$(BIN)/ruff check capsx tests
	$(BIN)/mypy capsx

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Set-up and everyday commands. `make test` and `make demo` install what they need into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-fast demo lint format bench-degradation clean-venv

install: $(STAMP)

# Re-installs when pyproject.toml changes. torch/torchvision come from pyproject's pins (>=2.14,<2.15).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "restore needs Python >= 3.10; set PYTHON=python3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# Iterating: skip the tests marked slow (CI and `make test` run everything).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/python scripts/demo_degradation.py --out outputs/demo

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench-degradation: install
	$(BIN)/python benchmarks/degradation.py

clean-venv:
	rm -rf $(VENV)

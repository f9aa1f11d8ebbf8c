# The two set-up commands (README): `make demo` runs the dry-run study, `make test` the test suite.
# Both create .venv and install the pinned stack from this repository's own files on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.emtune-installed
SPEC ?= search_spaces/dryrun.yaml
# The study `make demo` writes: output_dir (studies/) / the spec's name (the shipped specs are named
# after their file).
DEMO_STUDY ?= studies/$(basename $(notdir $(SPEC)))
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast mutants install clean docs

install: $(STAMP)

# torch first, alone and exact: with no torch installed, a range would make pip fetch a CUDA build of
# several GB; the pinned CPU wheel is what the project is tested with.
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
	nice -n 19 $(PY) tests/mutation/mutants.py

# docs/spec.md is generated from the spec's models (a test fails when it is stale).
docs: $(STAMP)
	$(PY) -m emtune.spec_reference > docs/spec.md

# Only what `make demo` made: its study folder. Other studies, .venv and caches stay.
clean:
	rm -rf $(DEMO_STUDY)

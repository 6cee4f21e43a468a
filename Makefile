# Single-node entry points. Every target that needs the venv depends on `setup`, so each is one
# command on a fresh machine. Each runs the `vqr1` command line; cluster runs use `ray job submit`
# (README, Cluster training).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
VQR1 := $(PY) -m cluster.cli
STAMP := $(VENV)/.installed-cpu
# uv installs the ~230 wheels in seconds where pip takes minutes. It reads no pip.conf, so pip's
# find-links (where a machine keeps the CPU torch wheel) are passed on. A torch already in .venv is kept.
# Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set, every Ray worker
# and engine process would otherwise compile torch, vLLM and transformers again (make test: 37 min instead of 20).
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell python3 -m pip config get global.find-links 2>/dev/null))
# pip's warnings about this machine's extra-index folders are noise; keep real errors.
PIP_QUIET := sed -E "/is ignored: it is neither a file nor a directory/d"
PRESET ?= cpu-default
ARGS ?=
SEEDS ?= 0

.PHONY: setup test test-long test-fast lint bench train proof proof-all ablation tint-check eval mlflow-ui base-model clean

setup: $(STAMP)

$(STAMP): pyproject.toml cluster/cpu_compat.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q 'uv==0.13.10' 2>&1 | $(PIP_QUIET)
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) -e '.[cpu,dev]'
	$(PY) -m cluster.cpu_compat install
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=10 -m "not long" $(ARGS)

# The base-model pipeline's 400-step cold start on the tiny preset, checked against its format target, the
# k = 0 loop against a plain loop written out, LoRA's exact resume, evaluations between steps and a
# colocated run that loses processes (~12 min).
test-long: setup
	$(PY) -m pytest -q -m long $(ARGS)

# Without the real-engine and distributed tests (minutes instead of ~20).
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not long" $(ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m bench.run $(ARGS)

# A real GRPO run of the preset, evaluated before and after (cpu-default: 200 steps, ~14 min with setup on a
# 2-core EPYC).
train: setup
	$(VQR1) train --config $(PRESET) $(ARGS)

# The learning proof: the `proof` preset (300 steps, 16-25 min a run), seed 0 (SEEDS="0 1 2" for more).
proof: setup
	$(VQR1) proof --config proof --seeds $(SEEDS) $(ARGS)

# Seeds 0, 1, 2 and the permuted-label control, with the mean and spread of the gains (~1 h 20 min).
proof-all: setup
	$(VQR1) proof --config proof --seeds 0 1 2 --control also $(ARGS)

# The control alone: the proof's run with the MOS labels permuted in the reward (~20 min).
ablation: setup
	$(VQR1) proof --config proof --control only $(ARGS)

# The loop's own learning test: rank red > gray > blue views, seed 0 and the control (~30 min).
tint-check: setup
	$(VQR1) proof --config tint-check --seeds 0 --control also $(ARGS)

eval: setup
	$(VQR1) eval --config $(PRESET) $(ARGS)

mlflow-ui: setup
	@echo "MLflow's Model training view (charts, system metrics): http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

base-model: setup
	$(VQR1) base-model --preset small --threads 2 --out outputs/base-model $(ARGS)

clean:
	rm -rf outputs .cache .pytest_cache

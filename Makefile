# The few targets people type. Each one creates or reuses the virtualenv in $(VENV) first.
#   make demo   the whole path on CPU: shards -> 2-rank ZeRO-3 pre-training -> resume -> export -> fine-tune
#   make test   the test suite (CPU; starts real DeepSpeed, DALI, MLflow and, where installed, Slurm)
#   make test-fast  the edit-test loop: everything that starts no process and trains no real run (< 6 min)
#   make faults fault injection on 2 CPU ranks: FAULTS_N random SIGKILLs + every other trial, then the table
#   make lint   ruff lint + format check
# GPU users: `make venv TORCH_SPEC=torch DALI_EXTRA=dali-cuda12` picks the CUDA builds instead.

VENV        ?= .venv
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.13.0
DALI_EXTRA  ?= dali-cuda13
PYTEST_ARGS ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed-$(DALI_EXTRA)

.PHONY: venv demo test test-fast faults lint format clean

venv: $(STAMP)

# torch first and pinned, so that the dependency resolver never pulls a multi-GB CUDA build by accident.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,$(DALI_EXTRA)]"
	$(PY) -c "import torch, deepspeed, nvidia.dali, mlflow, webdataset, pretrain, data_pipeline"
	touch $@

demo: venv
	$(PY) -m pretrain.demo

test: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

FAST_MARKERS := not slow and not multiprocess and not slurm and not mlflow_server
test-fast: venv
	$(VENV)/bin/pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

# Long: ~2-3 min per trial on 2 shared cores. Needs root for the full-disk tmpfs and the local Slurm cluster
# (those trials report why they did not run otherwise). FAULTS_ARGS="--only kill,corrupt" picks trials.
FAULTS_N    ?= 20
FAULTS_ARGS ?=
faults: venv
	$(PY) -m tests.faults.run --n $(FAULTS_N) $(FAULTS_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs demo_out .pytest_cache .ruff_cache

# The few targets people type. Each one creates or reuses the virtualenv in $(VENV) first.
#   make demo   the whole path on CPU: shards -> 2-rank ZeRO-3 pre-training -> resume -> export -> fine-tune
#   make test   the test suite (CPU; starts real DeepSpeed, DALI, MLflow and, where installed, Slurm)
#   make test-fast  the edit-test loop: everything that starts no process and trains no real run (< 6 min)
#   make lint   ruff lint + format check
# GPU users: `make venv TORCH_SPEC=torch DALI_EXTRA=dali-cuda12` picks the CUDA builds instead.

VENV        ?= .venv
PYTHON      ?= python3
TORCH_SPEC  ?= torch==2.13.0
DALI_EXTRA  ?= dali-cuda13
PYTEST_ARGS ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed-$(DALI_EXTRA)

.PHONY: venv demo test test-fast lint format clean

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

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs demo_out .pytest_cache .ruff_cache

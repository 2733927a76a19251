# Two commands for a newcomer: `make demo` (set up + main job) and `make test`
# (set up + whole test suite). Everything lives in a local virtualenv, .venv.
#
# torch is installed before the package so that pip never resolves a CUDA build
# on a machine without a GPU: with no NVIDIA driver we ask for torch==2.13.0,
# which these machines serve as a CPU build from local disk.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_CPU_PIN ?= torch==2.13.0

.PHONY: demo test bench setup-test setup-examples setup-bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install torch; \
	else \
	  $(BIN)/pip install "$(TORCH_CPU_PIN)"; \
	fi
	@touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

$(VENV)/.examples: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[examples]"
	@touch $@

$(VENV)/.bench: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[bench]"
	@touch $@

setup-test: $(VENV)/.test
setup-examples: $(VENV)/.examples
setup-bench: $(VENV)/.bench

demo: $(VENV)/.examples
	$(BIN)/python examples/train_gpt.py

test: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/mypy matrixopt
	$(BIN)/python -m pytest -n 2 tests

bench: $(VENV)/.bench
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info

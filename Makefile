# Two entry points, each doing all of its own set-up in .venv:
#   make demo   generate an image with the bundled model (offline, CPU, seconds)
#   make test   run the test suite (offline)
# TORCH picks the PyTorch build: the default installs 2.13.0 (CPU-only where that wheel is local);
# use `make demo TORCH=torch` for the newest release with CUDA.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
# open-clip-torch carries CLIP's BPE merges file (SD 1.5's tokenizer, built offline from it);
# --no-deps: its torchvision requirement would pull in a second torch.
	$(BIN)/python -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $@

demo: $(STAMP)
	$(BIN)/sdaccel generate "a red circle on a blue background" --preset tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples

clean:
	rm -rf $(VENV) outputs .pytest_cache

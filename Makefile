# Two entry points, each doing all of its own set-up in .venv:
#   make demo   generate an image with the bundled model (offline, CPU, seconds)
#   make test   run the test suite (offline), the documentation's strict build included
# and `make docs` (the documentation site, built strictly into build/site), `make docs-serve`.
# TORCH picks the PyTorch build: the default installs 2.13.0 (CPU-only where that wheel is local);
# use `make demo TORCH=torch` for the newest release with CUDA.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint docs docs-serve clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
# The test extra includes the docs extra (MkDocs, pinned): tests/test_docs.py builds the site.
	$(BIN)/python -m pip install -q -e ".[test,docs]"
# open-clip-torch carries CLIP's BPE merges file (SD 1.5's tokenizer, built offline from it);
# --no-deps: its torchvision requirement would pull in a second torch.
	$(BIN)/python -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $@

demo: $(STAMP)
	$(BIN)/sdaccel generate "a red circle on a blue background" --preset tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples docs

docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict --site-dir build/site

docs-serve: $(STAMP)
	$(BIN)/python -m mkdocs serve

clean:
	rm -rf $(VENV) outputs .pytest_cache build/site

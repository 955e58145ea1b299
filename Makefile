# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test install sync nbtest pytest readme clean

# Create the virtual environment and install the package with its dev extra.
# torch/torchvision are pinned in settings.ini to the releases that pip finds on the build machines' disk.
$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=23" "setuptools>=64" wheel packaging
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: generate the built-in benchmark, run the baselines and write $(DEMO_OUT)/report.md with figures.
demo: $(STAMP)
	$(BIN)/sd_evaluate --out $(DEMO_OUT)
	@echo "report written to $(DEMO_OUT)/report.md"

# Every check, in order: notebooks/package/README in sync, notebook tests, pytest.
test: $(STAMP)
	$(MAKE) sync nbtest pytest

sync: $(STAMP)
	PATH=$(BIN):$$PATH bash tools/check_sync.sh

nbtest: $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/nbdev_test --n_workers 2

pytest: $(STAMP)
	$(BIN)/python -m pytest -q tests/

readme: $(STAMP)
	$(BIN)/python tools/make_readme.py

clean:
	rm -rf $(VENV) runs _proc _docs *.egg-info

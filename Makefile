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

# The main job: train the `demo` preset (spectral initialisation) and, at the same wall-time budget, the same model
# with random initial slots; train the same model with the slot-conditioned latent diffusion decoder for a shorter
# budget (its samples go into the report); score all three next to the training-free baselines on the held-out test
# split, and write $(DEMO_OUT)/report.md with figures. The trained model is $(DEMO_OUT)
# (`sd_segment --method checkpoint --checkpoint $(DEMO_OUT)`).
demo: $(STAMP)
	$(BIN)/sd_train --config demo --out $(DEMO_OUT)
	$(BIN)/sd_train --config demo --out $(DEMO_OUT)/baselines/random_init slots.init=random
	$(BIN)/sd_train --config demo --out $(DEMO_OUT)/baselines/diffusion_decoder decoder.kind=diffusion optim.max_minutes=3
	$(BIN)/sd_evaluate --out $(DEMO_OUT) --checkpoint "spectral-init model=$(DEMO_OUT)" "random-init model=$(DEMO_OUT)/baselines/random_init" "diffusion-decoder model=$(DEMO_OUT)/baselines/diffusion_decoder"
	@echo "report written to $(DEMO_OUT)/report.md"

# Every check, in order: notebooks/package/README in sync, notebook tests, pytest.
test: $(STAMP)
	$(MAKE) sync nbtest pytest

sync: $(STAMP)
	PATH=$(BIN):$$PATH bash tools/check_sync.sh

nbtest: $(STAMP)
	OMP_NUM_THREADS=1 PATH=$(BIN):$$PATH $(BIN)/nbdev_test --n_workers 2

pytest: $(STAMP)
	$(BIN)/python -m pytest -q tests/

readme: $(STAMP)
	$(BIN)/python tools/make_readme.py

clean:
	rm -rf $(VENV) runs _proc _docs *.egg-info

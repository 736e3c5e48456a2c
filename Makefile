# Two commands do all the set-up: `make demo` and `make test`. Both are idempotent:
# the stamp files below record what is installed, so a second run installs nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
MODEL  ?= models/edgefed-demo
PROMPT ?= def fibonacci(n):

.PHONY: demo test test-fast install install-test bench lint clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: ==2.13.0 is a CPU build on local disk; letting a dependency pull torch fetches a CUDA build.
$(VENV)/.torch: | $(PY)
	$(PIP) install torch==2.13.0
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[test]'
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/edgefed generate --model $(MODEL) --prompt '$(PROMPT)' --greedy --max-new-tokens 64

test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

bench: install-test
	$(PY) benchmarks/bench_decode.py

# ruff, then the package dependency direction (import-linter contracts in pyproject.toml).
$(VENV)/.installed-lint: $(VENV)/.installed
	$(PIP) install ruff==0.17.6 import-linter==2.17
	@touch $@

lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

clean-venv:
	rm -rf $(VENV)

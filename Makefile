# Every target installs what it needs, and only that, into .venv first (a
# fresh clone needs nothing but python3 >= 3.10 with venv): the demo, the
# package and tqdm; the tests, the extras they test; lint, ruff and mypy too.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# The extras the test suite exercises (make test, test-all).
TEST_EXTRAS := test,progress,dask,loky,joblib
DEMO_STAMP  := $(VENV)/.demo-stamp
STAMP       := $(VENV)/.installed-stamp
LINT_STAMP  := $(VENV)/.lint-stamp

.PHONY: install demo test test-all stress lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PIP) -e '.[progress]'
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml Makefile | $(VENV)/bin/python
	$(PIP) -e '.[$(TEST_EXTRAS)]'
	touch $(STAMP)

$(LINT_STAMP): $(STAMP)
	$(PIP) -e '.[$(TEST_EXTRAS),lint]'
	touch $(LINT_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m pool_manager demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Before a release: the stress cases bigger and repeated, and the caps'
# property-based model with more examples (make test runs both, smaller).
stress: $(STAMP)
	POOL_MANAGER_STRESS=4 POOL_MANAGER_STRESS_ROUNDS=5 \
		$(BIN)/python -m pytest -q tests/test_stress.py tests/test_budget_model.py

# `make test-all`: for each Python the package supports that this machine has
# (python3.X on the PATH if it runs, else pyenv's newest 3.X), a venv of its
# own (.venv-3.X) with the test extras, the suite, then CPython's own
# concurrent.futures tests of that version run against BaseWorkerPool
# (tests/test_cpython_executor_suite.py; it says why when it skips: pytest's
# status 5, nothing collected). A version that is not installed is skipped
# with a note; any failure fails the target, after every version has run.
TEST_VERSIONS ?= 3.10 3.11 3.12 3.13
PYENV_ROOT    ?= $(HOME)/.pyenv
CPYTHON_SUITE := tests/test_cpython_executor_suite.py

test-all:
	@failed=""; \
	for version in $(TEST_VERSIONS); do \
	  python=""; \
	  if python$$version -c "" >/dev/null 2>&1; then python=python$$version; \
	  else python=$$(ls -d $(PYENV_ROOT)/versions/$$version.*/bin/python$$version 2>/dev/null \
	                  | sort -V | tail -n 1); fi; \
	  if [ -z "$$python" ]; then echo "== Python $$version: not found, skipped"; continue; fi; \
	  venv=.venv-$$version; \
	  echo "== Python $$version ($$python) in $$venv"; \
	  if [ ! -f $$venv/.installed-stamp ] || [ pyproject.toml -nt $$venv/.installed-stamp ] \
	     || [ Makefile -nt $$venv/.installed-stamp ]; then \
	    $$python -m venv $$venv \
	    && $$venv/bin/python -m pip install --quiet --disable-pip-version-check \
	         -e '.[$(TEST_EXTRAS)]' \
	    && touch $$venv/.installed-stamp \
	    || { failed="$$failed $$version(install)"; continue; }; \
	  fi; \
	  $$venv/bin/python -m pytest --ignore=$(CPYTHON_SUITE) \
	    || failed="$$failed $$version(suite)"; \
	  POOL_MANAGER_CPYTHON_SUITE=full $$venv/bin/python -m pytest $(CPYTHON_SUITE); status=$$?; \
	  if [ $$status -ne 0 ] && [ $$status -ne 5 ]; then \
	    failed="$$failed $$version(cpython-suite)"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "== failed:$$failed"; exit 1; fi; \
	echo "== every version passed"

lint: $(LINT_STAMP)
	$(BIN)/ruff check pool_manager tests benchmarks
	$(BIN)/ruff format --check pool_manager tests benchmarks
	$(BIN)/mypy

# The benchmark suite (the package benchmarks/, run from this directory as
# `python -m benchmarks.suite`) runs in an environment of its own, with the
# peers it measures pool_manager against (benchmarks/requirements.txt). Options
# go in BENCH_ARGS, e.g. `make bench BENCH_ARGS=--quick` (see benchmarks/README.md).
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
BENCH_ARGS  ?=

$(BENCH_STAMP): pyproject.toml benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-e . -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m benchmarks.suite $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .venv-3.* build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache

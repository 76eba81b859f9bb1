# netlib developer commands. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test check lint typecheck pytest core bench soak docs clean

# test + dev (ruff, mypy) + cli (prompt_toolkit for the interactive chat client, rich)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,cli]'
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,dev,cli,docs]'
	touch $(DOCS_STAMP)

# The reliable-UDP core compiled with mypyc (tools/compile_core.py): rebuilt when its
# sources change; where it cannot be built (no C compiler) netlib runs the core as Python.
core: $(STAMP)
	@$(BIN)/python tools/compile_core.py || true

demo: $(STAMP) core  ## run the main demo: servers on loopback, driven by the client, then stopped
	$(BIN)/python -m netlib demo

test: check  ## lint, type-check and run the whole test suite

check: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Tests that time nothing run three at a time (they wait on subprocesses as much as they
# compute); the ones marked serial (they measure time, memory or CPU) run alone after
# them. compileall first: the tests start netlib in hundreds of subprocesses, and
# PYTHONDONTWRITEBYTECODE would have each of them compile it again.
# The core's own tests run once more with the core as Python (NETLIB_PURE_PYTHON=1):
# both forms of it must behave the same.
pytest: $(STAMP) core
	$(BIN)/python -m compileall -q netlib benchmarks tests > /dev/null
	$(BIN)/pytest -q -n 3 -m "not serial"
	NETLIB_PURE_PYTHON=1 $(BIN)/pytest -q -n 3 -m "not serial" tests/sansio/test_reliable_*.py
	$(BIN)/pytest -q -m serial

docs: $(DOCS_STAMP)  ## build the documentation site into docs/_build/html; warnings are errors
	$(BIN)/sphinx-build -E -W --keep-going -n -q -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

bench: $(STAMP) core  ## run the benchmarks (several minutes)
	$(BIN)/python benchmarks/tcp_echo.py

soak: $(STAMP) core  ## robustness row R18: 30 minutes of mixed traffic, then the verdict
	$(BIN)/python benchmarks/soak.py --minutes 30 --warmup 5

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis docs/_build \
		netlib/sansio/reliable/_compiled

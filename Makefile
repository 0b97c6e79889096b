# Two commands: `make demo` and `make test`. Each does every set-up step it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-packages
LOCKS := requirements/main.txt requirements/test.txt
# The locks name no index or mirror: whatever index pip is configured with must serve these
# exact files (their hashes are in the lock).
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
LOCK_ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist: one worker per core, each test file on one worker (module-scoped servers
# start once; xdist's loadgroup cannot group under pytest 9). PYTEST_WORKERS=0: no workers.
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: demo test test-fast lint lock bench setup system-packages clean

setup: $(STAMP) $(SYSTEM_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Installs what CI tested: every package from the hashed lock (pip refuses any other file),
# then the project itself, resolving nothing (--no-deps). Re-run when a lock changes.
$(STAMP): $(LOCKS) pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements/test.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Re-resolve the locks from pyproject.toml after changing its dependencies, then commit them.
# Existing pins are kept; `make lock LOCK_ARGS=--upgrade` (or --upgrade-package NAME) updates.
# test.txt is constrained by main.txt, so both install the same runtime versions.
lock: | $(BIN)/python
	$(BIN)/pip install --quiet 'pip-tools>=7.4'
	$(PIP_COMPILE) $(LOCK_ARGS) -o requirements/main.txt pyproject.toml
	$(PIP_COMPILE) $(LOCK_ARGS) --extra test -c requirements/main.txt \
		-o requirements/test.txt pyproject.toml

# WeasyPrint needs Pango; the browser tests need Debian's Chromium (never a downloaded browser).
$(SYSTEM_STAMP): scripts/system-packages.sh | $(BIN)/python
	bash scripts/system-packages.sh
	touch $@

demo: setup
	$(BIN)/portal demo

test: setup lint
	$(BIN)/pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop, not a substitute for `make test`: SQLite only, without the browser,
# deployment and slow tests, and without lint.
test-fast: $(STAMP)
	PORTAL_TEST_DATABASE_URL= $(BIN)/pytest $(XDIST) -m "not browser and not slow" \
		--ignore=tests/deploy $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

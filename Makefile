# Two commands: `make demo` and `make test`. Each does every set-up step it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-packages
PYTEST_ARGS ?=

.PHONY: demo test lint bench setup system-packages clean

setup: $(STAMP) $(SYSTEM_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# WeasyPrint needs Pango; the browser tests need Debian's Chromium (never a downloaded browser).
$(SYSTEM_STAMP): scripts/system-packages.sh | $(BIN)/python
	bash scripts/system-packages.sh
	touch $@

demo: setup
	$(BIN)/portal demo

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Two commands do everything on a fresh clone:
#   make demo   -- create .venv, install, run the main job
#   make test   -- create .venv, install, lint, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/engram compare --preset demo --experts-moved 8

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_hashing.py
	$(BIN)/python benchmarks/bench_lookup.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

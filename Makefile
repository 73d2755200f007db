# Two commands do everything on a fresh clone:
#   make demo   -- create .venv, install, run the main job
#   make test   -- create .venv, install, lint, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench install clean science-quick science-full report

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

# The paper's five experiments (engram sweep; resumable: run again to continue), then the report.
SCIENCE := benchmarks/science
EXPERIMENTS := alloc scaling layers ablations tokens

science-quick: $(STAMP)
	for e in $(EXPERIMENTS); do $(BIN)/engram sweep $$e --preset quick --out $(SCIENCE) || exit 1; done
	$(BIN)/engram report $(foreach e,$(EXPERIMENTS),$(SCIENCE)/$(e)-quick) --out $(SCIENCE)/quick

science-full: $(STAMP)
	for e in $(EXPERIMENTS); do $(BIN)/engram sweep $$e --preset full --out $(SCIENCE) || exit 1; done
	$(MAKE) report

# benchmarks/science/REPORT.md as committed: both tiers of every sweep and the demo models' probes.
PROBES := gates engram moe lens cka collisions collisions-demo-preset ruler-engram ruler-moe ruler-finetune \
	ruler-finetune-600-engram ruler-finetune-600-moe ruler-retrieval ruler-untied
# Sweeps on the prose corpus (engram sweep ... --data benchmarks/science/corpora/man-pages) have folders of their own.
PROSE_SWEEPS = $(patsubst %/sweep.json,%,$(wildcard $(SCIENCE)/*-man-pages-*/sweep.json))
# Sweeps with --set overrides (e.g. the token sweep against a baseline started at the unigram prior) too.
SET_SWEEPS = $(filter-out $(PROSE_SWEEPS),$(patsubst %/sweep.json,%,$(wildcard $(SCIENCE)/*-set-*/sweep.json)))
report: $(STAMP)
	$(BIN)/engram report $(foreach t,quick full,$(foreach e,$(EXPERIMENTS),$(SCIENCE)/$(e)-$(t))) $(PROSE_SWEEPS) $(SET_SWEEPS) \
		$(foreach p,$(PROBES),$(SCIENCE)/probes-demo/$(p)) --out $(SCIENCE)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

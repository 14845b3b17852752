# Each target sets up .venv on its own: torch first (pinned, CPU build), then the package.
PY     := .venv/bin/python
PIP    := .venv/bin/pip
STAMP  := .venv/.installed

.PHONY: demo test reproduce lint bench mutate clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/taskbalance demo kendall

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q -n auto --dist loadgroup -m "not reproduction"

# the full reproductions left out of `make test` for CI time (MMoE paper run: ~4 min)
reproduce: $(STAMP)
	$(PY) -m pytest -q -m reproduction

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/speed.py

# mutation testing of one method file against its own test file (docs/mutation.md):
# make mutate FILE=src/taskbalance/aggregation/mgda.py [QUICK=1] [MAX=20]; ALL=1 for every file
mutate: $(STAMP)
	$(PY) benchmarks/mutate.py $(if $(ALL),--all) $(if $(QUICK),--quick) $(if $(MAX),--max $(MAX)) $(FILE)

clean:
	rm -rf .venv runs .pytest_cache .ruff_cache .hypothesis

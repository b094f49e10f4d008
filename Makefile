# The two entry points named at the top of README.md.
#   make demo   set up .venv, then train bert_demo on the packaged MiniLM
#   make test   set up .venv, then ruff, mypy and pytest
#   make bench  set up .venv, then every benchmarks/bench_*.py table
#   make docs   set up .venv, then build the site into docs/_build/html (a warning fails it)
# Extra arguments for the demo: make demo ARGS="--preset paper"

PY := .venv/bin/python
ARGS ?=

.PHONY: setup demo test lint typecheck pytest bench docs

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m bert_demo train $(ARGS)

lint: setup
	$(PY) -m ruff check gradtools bert_demo benchmarks tests examples docs

typecheck: setup
	$(PY) -m mypy

pytest: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# Every benchmark script prints its side-by-side ratio table (the numbers in benchmarks/RESULTS.md).
bench: setup
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# The documentation site, built strictly: -n reports every broken cross-reference, -W makes
# any warning an error, -E rereads every page (no stale cache hides a warning).
# tests/test_docs.py runs the same build, so `make test` covers it.
docs: setup
	$(PY) -m sphinx -E -b html -n -W --keep-going docs docs/_build/html
	@echo "open docs/_build/html/index.html"

# The single entry point for people and CI. Each target builds .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: run the example approval workflow end to end on the embedded SQLite store (no server needed)
demo: $(STAMP)
	$(BIN)/python examples/approval.py

## test: run the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest

## lint: ruff, ruff format and mypy --strict on the package
lint: $(STAMP)
	$(BIN)/ruff check celery_checkpoint tests examples bench
	$(BIN)/ruff format --check celery_checkpoint tests examples bench
	$(BIN)/mypy --strict celery_checkpoint

## bench: run the benchmarks and print the comparison tables
bench: $(STAMP)
	$(BIN)/python bench/store_bench.py
	$(BIN)/python bench/redis_bench.py
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/sqlite_bench.py
	$(BIN)/python bench/postgres_bench.py
	$(BIN)/python bench/celery_bench.py
	$(BIN)/python bench/timers_bench.py
	$(BIN)/python bench/keys_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

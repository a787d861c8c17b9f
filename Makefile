# deid — the README's two commands are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

export DBT_PROFILES_DIR ?= $(CURDIR)
export DBT_SEND_ANONYMOUS_USAGE_STATS := false

.PHONY: demo demo-ingest test test-fast lint check bench bench-lambda demo-postgres clean

# The embedded pipeline only (dbt-duckdb, DuckDB, Faker).
$(VENV)/.demo: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[duckdb,synth]'
	touch $@

# The embedded pipeline plus tokenize-at-ingest (pyarrow, PyYAML, boto3).
$(VENV)/.ingest: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[duckdb,synth,ingest]'
	touch $@ $(VENV)/.demo

# Everything the test suite and benchmarks need.
$(VENV)/.dev: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e '.[dev]'
	touch $@ $(VENV)/.demo $(VENV)/.ingest

profiles.yml:
	cp profiles.yml.example $@

demo: $(VENV)/.demo profiles.yml
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

demo-ingest: $(VENV)/.ingest profiles.yml
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo_ingest.sh

# Everything, in random order (pytest-randomly): the PostgreSQL tier included, whose server
# scripts/ensure_postgres.sh installs where it can or names the command that does.
test: $(VENV)/.dev
	bash scripts/ensure_postgres.sh
	$(BIN)/ruff check udfs tools tests scripts bench
	$(BIN)/mypy
	$(BIN)/pytest

# The unit tier: no dbt, no PostgreSQL, no server subprocess (well under 30 s).
test-fast: $(VENV)/.dev
	$(BIN)/pytest -m "not e2e and not postgres and not slow"

# Column lineage over the compiled SQL: the step the documented build runs before `dbt build`.
check: $(VENV)/.demo profiles.yml
	$(BIN)/dbt compile --quiet
	$(BIN)/deid check

lint: $(VENV)/.dev profiles.yml
	$(BIN)/ruff check udfs tools tests scripts bench
	$(BIN)/sqlfluff lint models analyses
	$(BIN)/mypy

bench: $(VENV)/.dev
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_lambda.py

bench-lambda: $(VENV)/.dev
	$(BIN)/python bench/bench_lambda.py

demo-postgres: $(VENV)/.dev
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo_postgres.sh

clean:
	rm -rf target logs dbt_packages warehouse.duckdb raw.duckdb .deid ingest_out

# The two commands of a fresh machine: `make run` and `make test`. `make dev` starts the Dagster UI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RAW ?= data_raw
LAKE ?= lake
MANIFEST ?= duckdb/warehouse.duckdb
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: run test lint dev sample clean bench bench-quick

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Exit code 1 means "ingested, some records were rejected": the bundled sample has deliberate
# bad records, so that is the expected outcome of `make run`.
run: $(BIN)/.installed
	@$(BIN)/load-to-bronze --raw $(RAW) --lake $(LAKE) --manifest $(MANIFEST); rc=$$?; [ $$rc -le 1 ] || exit $$rc

lint: $(BIN)/.installed
	$(BIN)/ruff check bronze_assets bronze_assets_tests schemas
	$(BIN)/mypy bronze_assets schemas

test: lint
	$(BIN)/pytest -q -p no:cacheprovider

dev: $(BIN)/.installed
	mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml

# The benchmark: the project against the bare limit and the peers, measured side by side
# (report in lake/_bench/). The peers (dlt) come from the optional `bench` extra. The package's
# bytecode is compiled first, as an installed package's is: where PYTHONDONTWRITEBYTECODE is set,
# an editable install would otherwise compile its modules again in every measured run.
bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m compileall -q bronze_assets schemas
	$(BIN)/python -m bronze_assets.bench --lake $(LAKE)

bench-quick: $(BIN)/.installed
	$(BIN)/python -m bronze_assets.bench --quick --lake $(LAKE)

sample: $(BIN)/.installed
	$(BIN)/python -m bronze_assets.sample --out $(RAW)

clean:
	rm -rf $(LAKE)/bronze $(LAKE)/_rejects $(LAKE)/_staging duckdb

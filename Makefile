# Tidemark — the two commands: `make run` (the whole pipeline with demo traffic) and `make test`.
# Both install what they need: the virtualenv with the Python packages, and the Kafka jars.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test venv kafka-jars lint bench-ingest clean

run: venv kafka-jars ## Kafka + API/sinks + stream worker + demo traffic; Ctrl-C stops everything
	$(BIN)/tidemark run

test: venv kafka-jars ## the whole suite against a real broker and the embedded ClickHouse engine
	bash infra/system-deps.sh
	bash infra/test.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

kafka-jars: ## resolve Apache Kafka from Maven Central (cached in infra/kafka/lib)
	infra/kafka/kafka.sh jars

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy tidemark schemas sinks api streams consumers

bench-ingest: venv kafka-jars
	$(BIN)/python bench/ingest.py

clean:
	rm -rf .tidemark .pytest_cache

# segexp: `make demo` trains on synthetic HC18 into ./mlruns; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-slow test-all lint format demo ui server postgres browser bench data clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -m "not slow" -q

# The slow tests (end-to-end blame, concurrent writers, kills, bf16 vs fp32): CI runs them too.
test-slow: install
	$(BIN)/python -m pytest -m slow -q

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check segexp tests benchmarks
	$(BIN)/ruff format --check segexp tests benchmarks

format: install
	$(BIN)/ruff format segexp tests benchmarks
	$(BIN)/ruff check --fix segexp tests benchmarks

mlruns/data/hc18_synthetic: | install
	$(BIN)/segexp make-data hc18 $@ --n 240 --seed 0

data: mlruns/data/hc18_synthetic

demo: install mlruns/data/hc18_synthetic
	$(BIN)/segexp train experiment=hc18_seed dataset=hc18_synthetic trainer.max_epochs=15

# Localhost only; `segexp ui --host 0.0.0.0 --allow-remote` is the explicit way out.
# WORK_DIR: the work dir of the runs to browse (default ./mlruns).
WORK_DIR ?= $(CURDIR)/mlruns
ui: install
	$(BIN)/segexp ui --work-dir $(WORK_DIR) --port 5000

# A team tracking server on 127.0.0.1:5000: PostgreSQL (data in mlruns/postgres) + `mlflow server`
# proxying artifacts to mlruns/artifacts; train with `segexp train tracking.uri=http://127.0.0.1:5000`.
server: install postgres
	$(BIN)/segexp server --work-dir $(CURDIR)/mlruns --port 5000

# Debian's PostgreSQL server programs (installing needs root); the team-server test skips without.
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq postgresql)

# Debian's chromium + playwright for the MLflow UI browser test (skipped without them).
browser: install
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/python -m pip install --quiet -e '.[dev,browser]'

clean:
	rm -rf mlruns/outputs mlruns/cache

# segexp vs the reference LGG trainer head to head, every precision x layout x compile, RSS,
# blame cost (prints; not a test). BENCH_ARGS, e.g. `--batches 3 --no-compile`.
bench: install
	PYTHONUNBUFFERED=1 $(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

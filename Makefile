# segexp: `make demo` trains on synthetic HC18 into ./mlruns; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-slow test-all lint format demo demo-blame demo-hc18 ui server postgres browser slurm bench data clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Two pytest workers, each file on one (its module fixtures built once): run serially, the suite
# keeps one of the 2 cores idle while a test waits on a subprocess, a server or a store.
# `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -m "not slow" -q -n $(PYTEST_WORKERS) --dist loadfile

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

# The headline on synthetic HC18 (~6 min on 2 cores): A, then B with three changes (one harmful:
# lr 1e-5), then `segexp blame` screens the changes at low fidelity and confirms the suspects at
# full fidelity, ending with the verdict and the compute it spent.
DEMO_RUN = $(BIN)/segexp train experiment=hc18_seed dataset=hc18_synthetic model.batch_norm=true \
	dataset.image_size=64 trainer.enable_progress_bar=false
demo-blame: install mlruns/data/hc18_synthetic
	@set -e; log=mlruns/demo-blame.log; : > $$log; echo "training A and B (log: $$log)"; \
	a=$$($(DEMO_RUN) trainer.max_epochs=8 2>>$$log | sed -n 's/^run \([0-9a-f]\{32\}\) .*/\1/p'); \
	b=$$($(DEMO_RUN) trainer.max_epochs=10 optimizer.lr=1e-5 optimizer.weight_decay=1e-4 \
		2>>$$log | sed -n 's/^run \([0-9a-f]\{32\}\) .*/\1/p'); \
	test -n "$$a" -a -n "$$b" || { tail -20 $$log; exit 1; }; \
	echo "A=$$a B=$$b: segexp blame $$a $$b --seeds 2 hydra/launcher=joblib"; \
	$(BIN)/segexp blame $$a $$b --seeds 2 hydra/launcher=joblib --out mlruns/demo-blame \
		>> $$log 2>&1 || { tail -30 $$log; exit 1; }; \
	grep -E '^(fidelity|screen check|[AB] check|confirmed|.* screened out|compute:)' $$log; \
	sed -n '3p' mlruns/demo-blame/report.md

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

# A one-node SLURM cluster here (slurm-wlm + munge from apt, as root; state in /tmp/segexp-slurm):
# the slow tests in tests/test_slurm.py submit to it. `.ci/slurm stop` ends it.
slurm: install
	.ci/slurm

clean:
	rm -rf mlruns/outputs mlruns/cache

# segexp vs the reference LGG trainer head to head, every precision x layout x compile, RSS,
# blame cost (prints; not a test). BENCH_ARGS, e.g. `--batches 3 --no-compile`.
bench: install
	PYTHONUNBUFFERED=1 $(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

# Benchmark, not a test: the full `experiment=hc18_best` training on the real HC18 data,
# then wall time, the best-epoch and last-epoch figures and the best epoch per head-size range
# (`segexp.evaluation.hc_range_report` of its val_cases.csv). HC18_ROOT=... points elsewhere.
HC18_ROOT ?= ../shared/data/hc18
demo-hc18:
	@if [ ! -f "$(HC18_ROOT)/training_set_pixel_size_and_HC.csv" ]; then \
		echo "demo-hc18: no HC18 data at $(HC18_ROOT) (official layout; set HC18_ROOT=/path/to/hc18)"; \
		exit 1; fi
	$(MAKE) install
	PYTHONUNBUFFERED=1 $(BIN)/python -c "$$DEMO_HC18" $(abspath $(HC18_ROOT))

define DEMO_HC18
import sys, time
from pathlib import Path
from segexp import config, tracking
from segexp.train import train
cfg = config.compose(['experiment=hc18_best', 'dataset=hc18', f'dataset.root={sys.argv[1]}',
                      'trainer.enable_progress_bar=false'])
start = time.time()
final = train(cfg)
minutes = (time.time() - start) / 60
client, _ = tracking.open_store(cfg.tracking, Path(cfg.work_dir))
run = client.get_run(final['run_id'])
keys = ['val/dice', 'val/hc_mae_mm', 'val/hc_bias_mm', 'val/hd95_mm', 'val/hc_outliers_10mm', 'val/hc_flagged']
epochs = len(client.get_metric_history(run.info.run_id, 'val/dice'))
print(f'\nhc18_best: {minutes:.1f} min, {epochs} epochs, {60 * minutes / epochs:.0f} s/epoch (incl. loading and final evaluation), precision {run.data.tags.get("segexp.precision")}')
print(f'best epoch {final["best_epoch"]}: ' + ', '.join(f'{k}={final[k + "_best"]:.3f}' for k in keys))
print(f'last epoch {epochs - 1}:  ' + ', '.join(f'{k}={run.data.metrics[k]:.3f}' for k in keys))
import pandas as pd
from segexp.evaluation import hc_range_report
cases = pd.read_csv(Path(run.data.tags['segexp.output_dir']) / 'val_cases.csv')
print('\nbest epoch per head-size range (reference HC):\n' + hc_range_report(cases))
endef
export DEMO_HC18

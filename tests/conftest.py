"""Shared fixtures: synthetic datasets made once per session, a fresh MLflow store per test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from segexp import config, data, tracking

SHARED_HC18 = Path(__file__).resolve().parents[2] / "shared" / "data" / "hc18"


def shared_hc18_count() -> int:
    """How many training images the shared HC18 CSV lists (rows, header excluded)."""
    import pandas as pd

    return len(pd.read_csv(SHARED_HC18 / "training_set_pixel_size_and_HC.csv"))


TINY = [
    "dataset.image_size=32",
    "dataset.batch_size=4",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    # explicit speed settings: no probe per test (auto is tested in test_speed and test_train)
    "trainer.precision=32-true",
    "performance.channels_last=false",
    "performance.compile=false",
]


@pytest.fixture(scope="session")
def hc18_root(tmp_path_factory) -> Path:
    return data.make_hc18(tmp_path_factory.mktemp("hc18") / "hc18", n=24, seed=0, n_test=3)


@pytest.fixture(scope="session")
def lgg_root(tmp_path_factory) -> Path:
    return data.make_lgg(
        tmp_path_factory.mktemp("lgg") / "kaggle_3m", n=4, seed=0, size=64, slices=(20, 24)
    )


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite schema made once (creating it costs seconds) and copied per test."""
    root = tmp_path_factory.mktemp("store")
    tracking.open_store({}, root)
    return root / "mlflow.db"


@pytest.fixture
def work_dir(tmp_path, store_template) -> Path:
    """A segexp work dir (store, outputs, cache) in tmp_path, its SQLite store pre-created."""
    shutil.copy(store_template, tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture
def client(work_dir) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")


def make_cfg(work_dir: Path, *overrides: str):
    """Compose conf/train.yaml with CLI-style overrides, as `segexp train` would."""
    return config.compose([f"work_dir={work_dir}", *overrides])


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def an_epoch_is_logged(client: MlflowClient, experiment: str = "hc18_synthetic") -> bool:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return bool(runs) and bool(steps(client, runs[0].info.run_id, "val/dice"))


def segexp_train(work_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "segexp.cli", "train", f"work_dir={work_dir}", *overrides]
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_from_a_terminal,
    )


def as_from_a_terminal() -> None:
    """Ctrl-C reaches the child as from a shell: a child inherits an ignored SIGINT, and
    Lightning's interrupt handling in an in-process test leaves the test process ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_long_run(work_dir: Path, client: MlflowClient, hc18_root: Path) -> subprocess.Popen:
    """`segexp train` in a subprocess with outputs in work_dir/out, once an epoch is logged."""
    proc = segexp_train(
        work_dir,
        *TINY,
        f"dataset.root={hc18_root}",
        "trainer.max_epochs=500",
        "hydra.run.dir=" + str(work_dir / "out"),
    )
    wait_for(lambda: an_epoch_is_logged(client))
    return proc


def predict_args(run_id: str, hc18_root: Path, work_dir: Path) -> list[str]:
    """`segexp predict RUN` on the synthetic HC18 test set, writing work_dir/sub.csv."""
    return [
        "predict",
        run_id,
        "--images",
        str(hc18_root / "test_set"),
        "--pixel-csv",
        str(hc18_root / "test_set_pixel_size.csv"),
        "--out",
        str(work_dir / "sub.csv"),
        "--work-dir",
        str(work_dir),
    ]

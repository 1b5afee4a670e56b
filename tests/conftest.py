"""Shared fixtures: synthetic datasets and the tiny config made once per session, a fresh MLflow
store per test. Helpers that are not fixtures live in helpers.py."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import DictConfig, open_dict

from segexp import config, data, tracking
from segexp.performance import speed


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


@pytest.fixture(scope="session")
def tiny_cfg() -> DictConfig:
    """`segexp train debug=tiny`, composed once per session: copy it (the `cfg` fixture)."""
    return config.compose(["debug=tiny"])


@pytest.fixture
def cfg(tiny_cfg, work_dir, hc18_root) -> DictConfig:
    """A fresh copy of the tiny training config on the synthetic HC18 set, logging to work_dir."""
    cfg = copy.deepcopy(tiny_cfg)
    with open_dict(cfg):
        cfg.work_dir = str(work_dir)
        cfg.dataset.root = str(hc18_root)
    return cfg


@pytest.fixture
def any_load_is_idle(monkeypatch):
    """Speed probes cache whatever else runs (CI and `make test` may share the cores), for the
    tests of caching itself; the contended case has its own test."""
    monkeypatch.setattr(speed, "CONTENDED_SHARE", math.inf)

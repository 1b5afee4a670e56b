"""Tracking: the MLflow store, one run's lifecycle, how a process stops, the team server."""

from .runs import EpochMetricsToMLflow, NonFiniteMetricError, TrackedRun, git_tags
from .server import ServerError, mlflow_command, serve
from .stopping import LAUNCHER_PID_ENV, interrupt, received_signal, watch_launcher
from .store import (
    SERVER_PATIENCE,
    StoreError,
    cleanup_stale_runs,
    experiment_id,
    experiment_url,
    open_store,
    process_alive,
    store_locations,
)

__all__ = [
    "SERVER_PATIENCE",
    "StoreError",
    "cleanup_stale_runs",
    "experiment_id",
    "experiment_url",
    "open_store",
    "process_alive",
    "store_locations",
    "LAUNCHER_PID_ENV",
    "interrupt",
    "received_signal",
    "watch_launcher",
    "EpochMetricsToMLflow",
    "NonFiniteMetricError",
    "TrackedRun",
    "git_tags",
    "ServerError",
    "mlflow_command",
    "serve",
]

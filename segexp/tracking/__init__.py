"""Tracking: the MLflow store, one run's lifecycle, how a process stops, the team server.

Also what reads runs back (stored configs, children, FINISHED twins), the tag names, run names
and progress lines, so a sweep, a blame and a resume agree on them.
"""

from . import tags
from .lookup import (
    MAX_RUNS,
    children,
    finished_run,
    optimized_metric,
    reused_runs,
    run_key,
    stored_config,
)
from .names import run_label, short_key, short_number, short_value
from .progress import Progress
from .runs import EpochMetricsToMLflow, NonFiniteMetricError, TrackedRun, git_tags
from .server import (
    ServerError,
    check_port,
    mlflow_command,
    serve,
    ui_command,
    ui_host_allowed,
)
from .stopping import LAUNCHER_PID_ENV, interrupt, received_signal, watch_launcher
from .store import (
    SERVER_PATIENCE,
    StoreError,
    cleanup_stale_runs,
    experiment_id,
    experiment_url,
    open_store,
    process_alive,
    store_file,
    store_locations,
    work_dir_of,
)

__all__ = [
    "SERVER_PATIENCE",
    "StoreError",
    "cleanup_stale_runs",
    "experiment_id",
    "experiment_url",
    "open_store",
    "process_alive",
    "store_file",
    "store_locations",
    "work_dir_of",
    "LAUNCHER_PID_ENV",
    "interrupt",
    "received_signal",
    "watch_launcher",
    "EpochMetricsToMLflow",
    "NonFiniteMetricError",
    "TrackedRun",
    "git_tags",
    "ServerError",
    "check_port",
    "mlflow_command",
    "serve",
    "ui_command",
    "ui_host_allowed",
    "tags",
    "MAX_RUNS",
    "children",
    "finished_run",
    "optimized_metric",
    "reused_runs",
    "run_key",
    "stored_config",
    "run_label",
    "short_key",
    "short_number",
    "short_value",
    "Progress",
]

"""MLflow's system metrics (CPU, memory, disk, network; GPU through NVML) for a client's run.

MLflow starts its `SystemMetricsMonitor` only inside `mlflow.start_run`, so
MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING does nothing for runs made with `MlflowClient.create_run`,
as segexp's are: `TrackedRun` starts and stops the monitor itself.
"""

from __future__ import annotations

import logging

# One sample (psutil reads, a run lookup and a store write) costs about 12 ms of CPU: every
# 10 s that is ~0.1% of one core. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL still overrides it.
SAMPLE_SECONDS = 10.0


def start(tracking_uri: str, run_id: str, resumed: bool):
    """A started monitor logging `system/*` metrics into the run, or None when it cannot start.

    A resumed run's points continue after its last step. System metrics are diagnostics:
    a monitor that cannot start is reported, never a reason to stop a training.
    """
    # its INFO lines on every start and stop would bury the training's own output
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=SAMPLE_SECONDS,
            resume_logging=resumed,
            tracking_uri=tracking_uri,
        )
        monitor.start()
    except Exception as err:  # psutil missing, the store unreachable
        print(f"segexp: no system metrics for run {run_id} ({type(err).__name__}: {err})")
        return None
    return monitor


def stop(monitor) -> None:
    """Stop the sampling thread, then log one last point: the pending samples and one taken now.

    MLflow's loop drops the samples of the interval a stop cuts short, so without the last
    point a run shorter than one interval would have no system metrics at all.
    """
    monitor.finish()  # joins the thread: it only waits on an event between samples
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # the store is gone: the run's own status matters more
        print(f"segexp: last system metrics not logged ({type(err).__name__}: {err})")

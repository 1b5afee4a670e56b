"""Training a blame's cells: reuse FINISHED twins, launch the rest as one Hydra multirun."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from segexp import sweep, tracking

from .factors import Cell


def reuse(
    client: MlflowClient, experiment_id: str, cells: list[Cell], fingerprint: str | None
) -> list[Cell]:
    """Give each cell without a run its FINISHED twin (config hash, seed, data); the rest."""
    todo = []
    for cell in cells:
        if cell.run_id is None and cell.source is None:
            twin = tracking.finished_run(
                client, experiment_id, cell.hash, cell.training_seed, fingerprint
            )
            cell.run_id = twin and twin.info.run_id
            todo += [] if cell.run_id else [cell]
    return todo


def launch(cells: list[Cell], parent_run_id: str, launcher: list[str], work_dir: Path):
    """Train `cells` as the jobs of one `segexp train -m` through the chosen Hydra launcher."""
    jobs = [{"name": c.name, "overrides": c.overrides, "tags": c.tags} for c in cells]
    jobs_file, listed = sweep.write_jobs(jobs, work_dir)
    command = [sys.executable, "-m", "segexp.cli", "train", "-m", *launcher, f"work_dir={work_dir}"]
    env = {**os.environ, sweep.PARENT_ENV: parent_run_id}
    return subprocess.Popen(command + listed, env=env), jobs_file


def train_cells(
    client: MlflowClient,
    cells: list[Cell],
    parent_run_id: str,
    launcher: list[str],
    work_dir: Path,
    progress: tracking.Progress,
    metric: str,
) -> None:
    """Run the jobs and print a progress line per finished cell with the ETA."""
    if not cells:
        return
    proc, cells_file = launch(cells, parent_run_id, launcher, work_dir)
    by_name, seen = {c.name: c for c in cells}, set()
    try:
        while True:
            finished = proc.poll() is not None
            for run in tracking.children(client, client.get_run(parent_run_id)):
                cell = by_name.get(run.info.run_name)
                if cell is None or run.info.status == "RUNNING" or run.info.run_id in seen:
                    continue
                seen.add(run.info.run_id)
                cell.run_id = run.info.run_id
                value = run.data.metrics.get(metric)
                print(progress.line("cell", cell.name, metric, value, run.info.status), flush=True)
            if finished:
                break
            time.sleep(2)
    finally:
        if proc.poll() is None:  # interrupted here: the jobs end too, their runs KILLED
            proc.terminate()
            proc.wait(timeout=120)
        cells_file.unlink(missing_ok=True)
    if proc.returncode not in (0, 1):  # 1: some job FAILED, which the analysis lists
        raise SystemExit(proc.returncode)


def train_in_process(cells: list[Cell], parent_run_id: str) -> None:
    """Fallback for runs without recorded choices: train the merged configs one by one."""
    from segexp.train import train

    for cell in cells:
        cfg = cell.cfg
        cfg.tracking.parent_run_id = parent_run_id
        cfg.run_name = cell.name
        cfg.tracking.tags = cell.tags
        try:
            cell.run_id = train(cfg, cell.overrides).run_id
        except Exception as err:  # a failed cell is listed in the report, never dropped silently
            print(f"cell {cell.name} failed: {err}")


def failure(client: MlflowClient, run_id: str | None) -> str | None:
    """Why a cell has no result (its run's failure reason, or that no run was made); None if it has."""
    if not run_id:
        return "no run (not trained: budget, or the job failed before its run existed)"
    run = client.get_run(run_id)  # one fetch for the status and the reason
    if run.info.status == "FINISHED":
        return None
    return (
        run.data.tags.get("failure_reason") or run.data.tags.get("stop_reason") or run.info.status
    )

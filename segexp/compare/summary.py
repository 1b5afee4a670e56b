"""A sweep's summary on its parent run: every child's row, replicates pooled, curves, folds."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from . import crossval
from .crossval import CrossValidation, cross_validation, is_cross_validation
from .runs import by_replicates, plot_runs, runs_table, show


def write_summary(client: MlflowClient, parent_run_id: str, runs: list) -> None:
    """summary.csv (one row per run), by_seed.csv (mean/std over seeds), val_dice.png; over folds
    also cv.csv and cv_cases.csv (compare.crossval)."""
    table = runs_table(runs)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        table.to_csv(out / "summary.csv", index=False)
        by_replicates(table).to_csv(out / "by_seed.csv", index=False)
        plot_runs(client, runs, table.attrs["params"], out / "val_dice.png")
        paths = [out / n for n in ("summary.csv", "by_seed.csv", "val_dice.png")]
        cv = is_cross_validation(table) and pooled_folds(client, runs, table)
        if cv:
            paths += crossval.write(cv, out)
            log_cv_metrics(client, parent_run_id, cv)
        for path in paths:
            client.log_artifact(parent_run_id, str(path), "sweep")
    show(table)
    if cv:
        print("\n".join(cv.lines()))


def pooled_folds(client: MlflowClient, runs: list, table: pd.DataFrame) -> CrossValidation | None:
    """The folds pooled, or None with one line saying why (the rest of the summary is written)."""
    try:
        return cross_validation(client, runs, table)
    except (ValueError, MlflowException) as err:  # overlapping folds, a run without its cases
        print(f"cross-validation not pooled: {str(err).splitlines()[0]}")
        return None


def log_cv_metrics(client: MlflowClient, parent_run_id: str, cv: CrossValidation) -> None:
    """A one-config CV's figures on its parent, so the runs table shows them (`cv/...`)."""
    summary = cv.summary()
    if len(summary) != 1:
        return  # several configs: cv.csv holds one row each
    metric = cv.folds.attrs["metric"].removesuffix("_mean")
    row = summary.iloc[0]
    values = {
        f"cv/{metric}_mean": row[f"{metric}_mean"],
        f"cv/{metric}_sd": row[f"{metric}_std"],
        "cv/case_dice": row["case_dice"],
    }
    for key, value in values.items():
        if pd.notna(value):
            client.log_metric(parent_run_id, key, float(value))

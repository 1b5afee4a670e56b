"""What a blame's runs logged beyond the metric: epoch histories, per-case Dice, mask shares.

All of it is read from the MLflow store as data (metric histories, params, CSV artifacts) and
never executed or unpickled.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from .analysis import Analysis

CURVES = ("val/dice", "val/loss", "train/loss")
FLAT = 0.02  # train/loss that fell by less than this share never learned
MISSED = 0.05  # the best epoch's val/dice this far below the run's top: picked on another metric


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(epoch, value) of a metric, in epoch order."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def why(client: MlflowClient, run_id: str | None) -> str:
    """What a run's history says about its result, e.g. "best epoch 2 of 4 by val/loss while
    val/dice reached 0.594 at epoch 3; train/loss flat (0.693 -> 0.690)"; "" when nothing."""
    if not isinstance(run_id, str) or not run_id:
        return ""
    run = client.get_run(run_id)
    curves = {key: history(client, run_id, key) for key in CURVES}
    dice, loss, parts = curves["val/dice"], curves["train/loss"], []
    best = run.data.metrics.get("best_epoch")
    monitor = run.data.params.get("checkpoint.monitor", "its checkpoint metric")
    if dice:
        top_epoch, top = max(dice, key=lambda point: point[1])
        at_best = dict(dice).get(int(best)) if best is not None else None
        if at_best is not None and top - at_best > MISSED:
            parts.append(
                f"best epoch {int(best)} of {len(dice)} by {monitor} while val/dice reached "
                f"{top:.3f} at epoch {top_epoch}"
            )
        elif top <= 0.01:
            parts.append(f"val/dice never above {top:.3f} in {len(dice)} epochs")
    if flat(loss):
        parts.append(f"train/loss flat ({loss[0][1]:.3f} -> {loss[-1][1]:.3f})")
    planned = run.data.params.get("trainer.max_epochs")
    if dice and planned and planned.isdigit() and len(dice) < int(planned):
        parts.append(f"stopped after {len(dice)} of {planned} epochs")
    return "; ".join(parts)


def flat(losses: list[tuple[int, float]]) -> bool:
    """Whether a train/loss history (two epochs at least) never fell by FLAT of its start."""
    return len(losses) >= 2 and losses[0][1] - min(v for _, v in losses) <= FLAT * abs(losses[0][1])


def stalled(client: MlflowClient, results: pd.DataFrame) -> pd.Series:
    """Per row of runs.csv: did the run's train/loss never fall (it never learned)?"""
    return pd.Series(
        [isinstance(r, str) and flat(history(client, r, "train/loss")) for r in results.run_id],
        index=results.index,
    )


def explain(client: MlflowClient, analysis: Analysis) -> None:
    """In place: each left-out run's `why`, from its logged history."""
    for run in analysis.left_out:
        run.why = why(client, run.run_id)


def val_cases(client: MlflowClient, run_ids) -> dict[str, pd.DataFrame]:
    """run id -> its evaluation/val_cases.csv (runs without one are skipped)."""
    found = {}
    for run_id in run_ids:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run_id, "evaluation/val_cases.csv", tmp)
                found[run_id] = pd.read_csv(path)
            except Exception:  # a run without per-case results: nothing to read
                continue
    return found


def mask_levels(cases: dict[str, pd.DataFrame], results: pd.DataFrame) -> pd.DataFrame:
    """Per row of runs.csv, the Dice of an empty and of an all-foreground prediction on that
    run's validation masks (seeds validate on different cases); runs without: the mean."""
    levels = {}
    for run_id, table in cases.items():
        if {"true_pixels", "pixels"} <= set(table.columns):
            true, pixels = table.true_pixels.to_numpy(float), table.pixels.to_numpy(float)
            levels[run_id] = (np.mean(true == 0), np.mean(2 * true / (true + pixels)))  # 0/0: 1
    mean = tuple(np.mean(list(levels.values()), axis=0)) if levels else (0.0, np.nan)
    rows = [levels.get(r, mean) for r in results.run_id]
    return pd.DataFrame(rows, index=results.index, columns=["empty", "full"])


def case_lines(
    cases: dict[str, pd.DataFrame], results: pd.DataFrame, analysis: Analysis, word: str = "seed"
) -> list[str]:
    """Per-case Dice per factor, B's level against A's within each replicate, no p-values.

    `word`: what a replicate is (`seed`, `fold`, or `replicate` for folds x seeds).
    """
    left = {run.run_id for run in analysis.left_out}
    runs = results[results.run_id.isin(cases) & ~results.run_id.isin(left)]
    if runs.empty or "seed" not in runs:
        return []
    per_seed = {s: set(cases[group.run_id.iloc[0]].case_id) for s, group in runs.groupby("seed")}
    shared = set.intersection(*per_seed.values())
    sizes = ", ".join(f"{word} {s}: {len(c)}" for s, c in per_seed.items())
    why = (
        "with split_seed following seed, seeds validate on different cases"
        if word == "seed"
        else "each fold validates its own cases"
    )
    lines = [
        f"- validation cases: {sizes}; {len(shared)} validated by every {word} ({why}). Each "
        f"comparison below pairs runs of the same {word} on the cases both levels validated.",
        f"- no per-case p-values: a run's cases share its {word}'s noise, so the run is the unit "
        "of replication, as in the verdicts above.",
        "",
        "| factor | case pairs | mean Dice at A's level | at B's level | pairs worse at B |",
        "|---|---|---|---|---|",
    ]
    for factor in analysis.factors:
        pairs = []
        for _, group in runs.groupby("seed"):
            means = [
                pd.concat([cases[r] for r in group.run_id[group[factor] == level]])
                .groupby("case_id")
                .dice.mean()
                for level in (0, 1)
                if (group[factor] == level).any()
            ]
            if len(means) == 2:
                pairs.append(pd.concat(means, axis=1, join="inner"))
        if pairs:
            both = pd.concat(pairs).to_numpy(float)
            lines.append(
                f"| {factor} | {len(both)} | {both[:, 0].mean():.3f} | {both[:, 1].mean():.3f} "
                f"| {np.mean(both[:, 1] < both[:, 0]):.0%} |"
            )
    return lines

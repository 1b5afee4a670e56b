"""`segexp compare`: runs side by side, only the params that differ, and their curves overlaid."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from segexp import config
from segexp.plots import epoch_axis, figure, run_styles, save

RESULT_KEYS = ["val/dice_best", "best_epoch"]


def children(client: MlflowClient, parent: Run) -> list[Run]:
    """Child runs of `parent` (a sweep or a blame), oldest first."""
    return client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )


def expand(client: MlflowClient, ids: list[str]) -> tuple[list[Run], list[Run]]:
    """(runs, parents): a parent id stands for its child runs."""
    runs, parents = [], []
    for run_id in ids:
        run = client.get_run(run_id)
        kids = children(client, run)
        if kids:
            parents.append(run)
            runs.extend(kids)
        else:
            runs.append(run)
    return runs, parents


def differing_params(runs: list[Run]) -> list[str]:
    """Params whose value is not the same in every run, bookkeeping (paths, seeds) left out."""
    table = pd.DataFrame([r.data.params for r in runs])
    return [
        k
        for k in table.columns
        if not config.is_bookkeeping(k) and table[k].nunique(dropna=False) > 1
    ]


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: differing params, seed, val/dice_best, best_epoch, status, seconds."""
    params = differing_params(runs)
    rows = []
    for run in runs:
        info = run.info
        seconds = (info.end_time - info.start_time) / 1000 if info.end_time else float("nan")
        rows.append(
            {
                "run_id": info.run_id,
                **{k: run.data.params.get(k) for k in params},
                "seed": run.data.params.get("seed"),
                "overrides": run.data.tags.get("hydra.overrides", ""),
                **{k: run.data.metrics.get(k) for k in RESULT_KEYS},
                "status": info.status,
                "seconds": round(seconds, 1),
            }
        )
    table = pd.DataFrame(rows)
    table.attrs["params"] = params
    return table


def by_replicates(table: pd.DataFrame, by: str = "seed") -> pd.DataFrame:
    """Mean and std of the results of each config over its replicates (`by`, default seed)."""
    params = [p for p in table.attrs.get("params", []) if p != by]
    finished = table[table.status == "FINISHED"]
    keys = params or (lambda _: "all")
    grouped = finished.groupby(keys, dropna=False)
    out = grouped[RESULT_KEYS[0]].agg(["mean", "std", "count"]).add_prefix(f"{RESULT_KEYS[0]}_")
    out["best_epoch_mean"] = grouped["best_epoch"].mean()
    out["seconds_mean"] = grouped["seconds"].mean()
    return out.reset_index()


def show(table: pd.DataFrame) -> None:
    """Print a runs table (overrides left out: the differing params already say it)."""
    shown = table.drop(columns=["overrides"], errors="ignore")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def plot_runs(
    client: MlflowClient, runs: list[Run], params: list[str], path: Path, keys=("val/dice",)
) -> Path:
    """One panel per metric key, one line per run against epoch, labelled by its differing params."""
    fig, axes = figure(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    styles = run_styles(len(runs))
    for ax, key in zip(axes[0], keys, strict=True):
        for run, style in zip(runs, styles, strict=True):
            points = sorted(
                (m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)
            )
            if points:
                label = " ".join(f"{p.rsplit('.', 1)[-1]}={run.data.params.get(p)}" for p in params)
                label = label or run.info.run_name
                if run.data.params.get("seed") is not None:
                    label += f" seed={run.data.params['seed']}"
                ax.plot(*zip(*points, strict=True), label=label, markersize=4, alpha=0.85, **style)
        ax.set(ylabel=key, title=key)
        epoch_axis(ax)
        ax.grid(alpha=0.3)
    # outside the axes: a legend never hides a curve
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save(fig, path)


def compare(
    client: MlflowClient, ids: list[str], by: str | None = None, out: Path | None = None
) -> dict:
    """Print the comparison table (and its replicate grouping); write the curves PNG to `out`."""
    runs, parents = expand(client, ids)
    table = runs_table(runs)
    show(table)
    grouped = None
    if by:
        grouped = by_replicates(table, by)
        print(f"\nby {by}:")
        show(grouped)
    out = Path(out or "compare.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(client, runs, table.attrs["params"], out, keys=("val/dice", "val/loss"))
    print(f"\ncurves: {out}")
    for parent in parents:
        client.log_artifact(parent.info.run_id, str(out), "compare")
    return {"table": table, "grouped": grouped, "plot": out}


def effects(client: MlflowClient, parent_run_id: str, metric: str, out: Path) -> dict:
    """`segexp effects`: which hyperparameter matters across a sweep (or blame), seeds as
    replicates, from its FINISHED child runs; trains nothing."""
    from segexp.importance import importance_table, marginal_means, plot_marginal_means

    parent = client.get_run(parent_run_id)
    finished = [c for c in children(client, parent) if c.info.status == "FINISHED"]
    if not finished:
        raise ValueError(f"run {parent_run_id} has no FINISHED child runs")
    varying = differing_params(finished)
    if not varying:
        raise ValueError(f"the child runs of {parent_run_id} do not differ in any param")
    table = pd.DataFrame([{**c.data.params, metric: c.data.metrics.get(metric)} for c in finished])
    importance = importance_table(table, varying, metric)
    means = marginal_means(table, varying, metric)
    print(f"importance over {len(finished)} runs ({metric}):")
    print(importance.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\nmarginal means (95% CI):")
    print(means.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_marginal_means(means, metric, out)
    print(f"\nplot: {out}")
    client.log_artifact(parent_run_id, str(out), "effects")
    return {"importance": importance, "means": means, "plot": out}

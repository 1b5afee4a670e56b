"""`segexp compare`: runs side by side, only the params that differ, and their curves overlaid."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from segexp import config, tracking
from segexp.evaluation import lower_is_better
from segexp.plots import epoch_axis, figure, run_styles, save


def expand(client: MlflowClient, ids: list[str]) -> tuple[list[Run], list[Run]]:
    """(runs, parents): a parent id stands for its child runs."""
    runs, parents = [], []
    for run_id in ids:
        run = client.get_run(run_id)
        kids = tracking.children(client, run)
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


def runs_table(runs: list[Run], metric: str | None = None) -> pd.DataFrame:
    """One row per run: name, differing params, seed, metric, best_epoch, status, seconds.

    `metric` None: the runs' `optimized_metric`.
    """
    metric = metric or tracking.optimized_metric(runs)
    params = differing_params(runs)
    seeds = {r.data.params.get("seed") for r in runs}
    rows = []
    for run in runs:
        info = run.info
        seconds = (info.end_time - info.start_time) / 1000 if info.end_time else float("nan")
        rows.append(
            {
                "run": info.run_name or info.run_id[:8],
                "run_id": info.run_id,
                **{k: param_value(run.data.params.get(k)) for k in params},
                **({"seed": param_value(run.data.params.get("seed"))} if len(seeds) > 1 else {}),
                "overrides": run.data.tags.get("hydra.overrides", ""),
                metric: run.data.metrics.get(metric),
                "best_epoch": run.data.metrics.get("best_epoch"),
                "status": info.status,
                "seconds": round(seconds, 1),
            }
        )
    table = pd.DataFrame(rows)
    table["best_epoch"] = table["best_epoch"].astype("Int64")  # an epoch is a whole number
    table.attrs["params"], table.attrs["metric"] = params, metric
    return table


def param_value(value: str | None):
    """A param string back to an int or float where it is one (so ints print as ints)."""
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Rows best first (direction from the metric's name), a `best` mark and the gap to it."""

    metric = table.attrs["metric"]
    low = lower_is_better(metric)
    out = table.sort_values(metric, ascending=low, na_position="last").reset_index(drop=True)
    best = out[metric].min() if low else out[metric].max()
    out.insert(0, "best", ["*" if v == best else "" for v in out[metric]])
    out["vs_best"] = out[metric] - best
    out.attrs = table.attrs
    return out


REPLICATES = {"seed": "seed", "fold": "dataset.fold"}  # `--by` names: what varies between draws


def replicate_columns(by: str | list[str]) -> list[str]:
    """`fold,seed` -> ["dataset.fold", "seed"]: the table columns a `--by` pools over."""
    names = by.split(",") if isinstance(by, str) else list(by)
    return [REPLICATES.get(n.strip(), n.strip()) for n in names]


def by_replicates(table: pd.DataFrame, by: str | list[str] = "seed") -> pd.DataFrame:
    """Mean, sd, count and a 95% t CI of the metric per config over its replicates (`by`).

    `by`: `seed`, `fold` (k-fold CV: `dataset.fold`), `fold,seed` or any param; a replicate not
    pooled over stays a key (`--by fold` with several seeds: one row per config and seed).
    """
    from scipy import stats

    metric = table.attrs["metric"]
    pooled = replicate_columns(by)
    params = [p for p in table.attrs.get("params", []) if p not in pooled]
    kept = [c for c in REPLICATES.values() if c in table and c not in pooled and c not in params]
    finished = table[table.status == "FINISHED"]
    keys = params + kept or (lambda _: "all")
    grouped = finished.groupby(keys, dropna=False)
    out = grouped[metric].agg(["mean", "std", "count"])
    half = stats.t.ppf(0.975, (out["count"] - 1).clip(lower=1)) * out["std"] / out["count"] ** 0.5
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    out = out.add_prefix(f"{metric}_")
    out["best_epoch_mean"] = grouped["best_epoch"].mean()
    out["seconds_mean"] = grouped["seconds"].mean()
    out = out.reset_index()
    out.attrs = {**table.attrs, "params": params + kept, "metric": f"{metric}_mean"}
    return out


def show(table: pd.DataFrame) -> None:
    """Print a runs table best first (run ids and overrides left out: names and params say it)."""
    shown = ranked(table).drop(columns=["overrides", "run_id"], errors="ignore")
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
                values = run.data.params
                shown = [(p, values.get(p)) for p in params if p != "seed"]
                # no differing params: the run's own name, which sweeps and blames make distinct
                label = (
                    tracking.run_label(shown, values.get("seed")) if shown else run.info.run_name
                )
                ax.plot(*zip(*points, strict=True), label=label, markersize=4, alpha=0.85, **style)
        ax.set(ylabel=key, title=key)
        epoch_axis(ax)
        ax.grid(alpha=0.3)
    # outside the axes: a legend never hides a curve
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save(fig, path)


def compare(
    client: MlflowClient,
    ids: list[str],
    by: str | None = None,
    out: Path | None = None,
    metric: str | None = None,
    html: Path | None = None,
) -> dict:
    """Print the ranked table (and its replicate grouping); write the curves PNG to `out`."""
    runs, parents = expand(client, ids)
    table = runs_table(runs, metric)
    show(table)
    grouped = None
    if by:
        grouped = by_replicates(table, by)
        print(f"\nby {by} (mean, sd and 95% CI over {by}s):")
        show(grouped)
    out = Path(out or "compare.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(client, runs, table.attrs["params"], out, keys=("val/dice", "val/loss"))
    print(f"\ncurves: {out}")
    if html:
        write_html(table, grouped, out, Path(html))
        print(f"report: {html}")
    for parent in parents:
        client.log_artifact(parent.info.run_id, str(out), "compare")
    return {"table": table, "grouped": grouped, "plot": out}


def write_html(table: pd.DataFrame, grouped: pd.DataFrame | None, plot: Path, path: Path) -> None:
    """One self-contained page: the ranked table(s) and the curves, inlined."""
    import base64

    image = base64.b64encode(plot.read_bytes()).decode()
    parts = [ranked(table).drop(columns=["overrides"], errors="ignore").to_html(index=False)]
    if grouped is not None:
        parts.append(ranked(grouped).to_html(index=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>segexp compare</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px}</style>"
        + "".join(parts)
        + f"<img alt='curves' src='data:image/png;base64,{image}'>"
    )


def effects(client: MlflowClient, parent_run_id: str, metric: str | None, out: Path) -> dict:
    """`segexp effects`: which hyperparameter matters across a sweep (or blame), seeds as
    replicates, from its FINISHED child runs; trains nothing."""
    from .importance import importance_table, marginal_means, plot_marginal_means

    parent = client.get_run(parent_run_id)
    finished = [c for c in tracking.children(client, parent) if c.info.status == "FINISHED"]
    if not finished:
        raise ValueError(f"run {parent_run_id} has no FINISHED child runs")
    metric = metric or tracking.optimized_metric(finished)
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

"""The ablation path's analysis: each step's effect against the previous cell, Holm verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from segexp.evaluation import lower_is_better

from .analysis import Analysis, finite_table, left_out_runs, run_floors, without
from .designs import path_steps
from .ols import Model, seed_blocks, t_tests, verdicts
from .robust import screen


def path_screen(results: pd.DataFrame, factors: list[str], metric: str, floors):
    """The ablation path's runs that never learned or are unusual, and the table without them."""
    observed = results[results[metric].notna()]
    cells = np.unique(observed[factors].to_numpy(int), axis=0, return_inverse=True)[1].ravel()
    z = observed[factors].to_numpy(float) - 0.5
    additive = np.column_stack([np.ones(len(z)), seed_blocks(results, factors, observed), z])
    x = np.column_stack([additive, np.eye(cells.max(initial=0) + 1)[cells]])  # + cell means
    dof = len(z) - np.linalg.matrix_rank(x)
    if dof <= 0:
        return [], results
    fit = Model(x, pd.DataFrame(), int(dof), [], additive.shape[1], cells)
    y = observed[metric].to_numpy(float)
    floors = run_floors(floors, observed, metric)
    found = screen(fit, y, observed[factors].to_numpy(int), floors)
    left = left_out_runs(observed, factors, metric, found)
    return left, without(results, metric, [r.row for r in left])


def path_analysis(
    results: pd.DataFrame,
    factors: list[str],
    metric: str,
    alpha: float = 0.05,
    floors: tuple[float, ...] | pd.DataFrame | None = None,
) -> Analysis:
    """A finished ablation path as an Analysis: one row per step in path order.

    A step's effect is its cell's mean minus the previous cell's, from OLS on cell means plus
    seed blocks (when every cell ran the same seeds), t CI on the residual dof; Holm over the
    steps. The order is picked on the same runs, so early steps lean towards B (winner's curse).
    Runs that never learned or are unusual are left out first, as in `analyze`.
    """
    results, notes = finite_table(results, metric)
    failed = results[results[metric].isna()]
    left, results = path_screen(results, factors, metric, floors)
    steps, missing = path_steps(results, factors, metric, lower_is_better(metric))
    if missing:
        raise ValueError(f"the ablation path is not finished: still needs cells {missing}")
    observed = results[results[metric].notna()]
    cells = [tuple(int(v) for v in c) for c in observed[factors].to_numpy()]
    index = {c: i for i, c in enumerate(dict.fromkeys(cells))}
    dummies = np.eye(len(index))[[index[c] for c in cells]]  # (runs, cells)
    x = np.column_stack([dummies, seed_blocks(results, factors, observed)])
    y = observed[metric].to_numpy(float)
    pinv = np.linalg.pinv(x)
    beta = pinv @ y
    dof = len(y) - np.linalg.matrix_rank(x) if len(index) < len(y) else 0
    s2 = float(((y - x @ beta) ** 2).sum() / dof) if dof > 0 else np.nan
    previous, rows = (0,) * len(factors), []
    for step, (j, cell) in enumerate(steps, start=1):
        effect, se = np.nan, np.nan
        if cell in index and previous in index:
            contrast = np.zeros(x.shape[1])
            contrast[[index[cell], index[previous]]] = 1.0, -1.0
            effect, se = contrast @ beta, math.sqrt(s2 * contrast @ pinv @ pinv.T @ contrast)
        rows.append({"term": factors[j], "kind": "step", "step": step, "effect": effect, "se": se})
        previous = cell
    table = pd.DataFrame(rows)
    fitted = table.effect.notna().to_numpy()
    effect, se = table.effect[fitted].to_numpy()[:, None], table.se[fitted].to_numpy()[:, None]
    out = t_tests(effect, se, dof, alpha, float(np.abs(y).max()))
    for key in ("effect", "se", "ci_low", "ci_high", "p", "p_holm"):
        table.loc[fitted, key] = out[key][:, 0]
    table["verdict"] = np.where(fitted, "no replicates", "inestimable")
    if dof > 0:
        table.loc[fitted, "verdict"] = verdicts(out["effect"], out["p_holm"], metric, alpha)[:, 0]
    table["aliased_with"] = ""
    seed_sd = math.sqrt(s2) if dof > 0 else float("nan")
    result = Analysis(table, metric, list(factors), seed_sd, int(dof), len(y), failed, alpha, notes)
    result.left_out = left
    return result

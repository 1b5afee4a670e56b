"""`segexp effects PARENT`: ANOVA importance and marginal means over a sweep grid, seeds as replicates.

Hyperparameters are multi-level categorical factors (values as strings). Importance is each
parameter's type-II sum of squares as a share of the total; marginal means are least-squares
means of an additive model (each level averaged over the other parameters' levels with equal
weights, so a failed run does not tilt them) with 95% CIs from the pooled seed-to-seed variance.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from segexp.plots import figure, save


def sorted_levels(values) -> list:
    """Levels in numeric order when they all parse as numbers, else as text."""
    levels = list(pd.unique(values))
    try:
        return sorted(levels, key=float)
    except (TypeError, ValueError):
        return sorted(levels, key=str)


def importance_table(df: pd.DataFrame, params: list[str], metric: str) -> pd.DataFrame:
    """Per parameter (and two-way interaction where every level pair ran and dof remain):
    type-II sum of squares, its share of the total SS, F and p; a `residual` row last."""
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    data = df.dropna(subset=[metric])
    params = [p for p in params if data[p].nunique() > 1]  # a constant has no importance
    safe = {p: f"x{i}" for i, p in enumerate(params)}  # formula-safe names for `optimizer.lr`
    frame = pd.DataFrame({safe[p]: data[p].astype(str).to_numpy() for p in params})
    frame["y"] = data[metric].to_numpy(float)
    terms = [f"C({safe[p]})" for p in params]
    mains_dof = sum(frame[safe[p]].nunique() - 1 for p in params)
    pairs = []
    for p, q in itertools.combinations(params, 2):
        combos = frame.groupby([safe[p], safe[q]]).ngroups
        if combos == frame[safe[p]].nunique() * frame[safe[q]].nunique():
            pairs.append((p, q))
    pair_dof = sum(
        (frame[safe[p]].nunique() - 1) * (frame[safe[q]].nunique() - 1) for p, q in pairs
    )
    if len(frame) - 1 - mains_dof - pair_dof < 2:  # too few runs left to estimate the noise
        pairs = []
    terms += [f"C({safe[p]}):C({safe[q]})" for p, q in pairs]
    model = ols("y ~ " + " + ".join(terms), data=frame).fit()
    table = anova_lm(model, typ=2)
    names = list(params) + [f"{p} x {q}" for p, q in pairs] + ["residual"]
    total = float(((frame.y - frame.y.mean()) ** 2).sum())
    return pd.DataFrame(
        {
            "term": names,
            "df": table["df"].to_numpy(),
            "sum_sq": table["sum_sq"].to_numpy(),
            "share": table["sum_sq"].to_numpy() / total if total > 0 else np.nan,
            "F": table["F"].to_numpy(),
            "p": table["PR(>F)"].to_numpy(),
        }
    )


def marginal_means(df: pd.DataFrame, params: list[str], metric: str) -> pd.DataFrame:
    """Least-squares mean of the metric per level of each parameter with a 95% CI.

    Returns rows (param, level, mean, ci_low, ci_high, runs); the variance is pooled within
    configurations (seed-to-seed) when any configuration has two runs, else the additive
    model's residual (noted in the table's attrs["variance"]).
    """
    data = df.dropna(subset=[metric]).reset_index(drop=True)
    y = data[metric].to_numpy(float)
    levels = {p: sorted_levels(data[p].astype(str)) for p in params}
    columns = [np.ones(len(data))]
    for p in params:  # treatment dummies, first level as reference
        columns += [(data[p].astype(str) == lv).to_numpy(float) for lv in levels[p][1:]]
    x = np.column_stack(columns)
    pinv = np.linalg.pinv(x.T @ x)
    beta = pinv @ x.T @ y
    groups = data.groupby([data[p].astype(str) for p in params])[metric]
    dof = len(data) - groups.ngroups
    variance = "within-config (seed-to-seed)"
    if dof > 0:
        s2 = float(((data[metric] - groups.transform("mean")) ** 2).sum() / dof)
    else:
        dof = len(data) - np.linalg.matrix_rank(x)
        s2 = float(((y - x @ beta) ** 2).sum() / dof) if dof > 0 else float("nan")
        variance = "additive-model residual (no replicates)"
    t = stats.t.ppf(0.975, dof) if dof > 0 else float("nan")
    rows = []
    for p in params:
        for lv in levels[p]:
            row = [1.0]
            for q in params:  # the other parameters averaged over their levels
                m = len(levels[q])
                row += [float(lv == v) if q == p else 1 / m for v in levels[q][1:]]
            contrast = np.array(row)
            mean = float(contrast @ beta)
            half = t * math.sqrt(s2 * contrast @ pinv @ contrast) if dof > 0 else float("nan")
            runs = int((data[p].astype(str) == lv).sum())
            rows.append((p, lv, mean, mean - half, mean + half, runs))
    table = pd.DataFrame(rows, columns=["param", "level", "mean", "ci_low", "ci_high", "runs"])
    table.attrs["variance"] = variance
    return table


def plot_marginal_means(table: pd.DataFrame, metric: str, path: Path) -> Path:
    """One panel per parameter: marginal mean per level with its 95% CI."""
    params = list(pd.unique(table.param))
    fig, axes = figure(1, len(params), figsize=(3.2 * len(params), 3.2), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        rows = table[table.param == param]
        x = np.arange(len(rows))
        err = [rows["mean"] - rows.ci_low, rows.ci_high - rows["mean"]]
        ax.errorbar(x, rows["mean"], yerr=np.nan_to_num(err), fmt="o", capsize=4)
        ax.set(xticks=x, title=param, xlabel="level")
        ax.set_xticklabels(rows.level.astype(str), rotation=30, ha="right")
    axes[0][0].set_ylabel(f"{metric} (marginal mean, 95% CI)")
    return save(fig, path)

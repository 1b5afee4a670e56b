"""Split plot: an epochs factor whose shorter budget was read from the longer runs' histories.

Such a run gives two rows of runs.csv: its own, at the longer budget, and the shorter budget's,
read from its history (nested.py). The two share the run's noise, so least squares over them as
independent runs sees half the noise that every factor but epochs has: false verdicts at several
times alpha. A split plot tests each term against the noise of its own stratum: the factors
other than epochs on each run's mean of its two values (the whole plot, between runs); epochs
and its two-way interactions on each run's difference, B's epochs minus A's (the subplot, within
runs). Holm runs over the terms of both strata together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .nested import EPOCHS
from .ols import MIN_DOF, Model, estimable, estimate, holm, verdicts

FITTED = ("hurt", "helped", "within noise")  # verdicts that Holm may change


@dataclass
class Pairs:
    """A runs.csv as whole plots: one row per run, its two budgets' mean and difference."""

    epochs: str  # the epochs factor
    others: list[str]
    whole: pd.DataFrame  # index: the run's row; the others' 0/1, seed, run_id, metric = mean
    diff: pd.Series  # same index: the metric at epochs' level 1 minus at level 0
    long: pd.Series  # same index: the metric of the run's own row
    notes: list[str] = field(default_factory=list)


def pairs(results: pd.DataFrame, factors: list[str], metric: str) -> Pairs | None:
    """The whole plots where some rows were read from another row's run (`read_from`), else None.

    Rows pair by the other factors' levels and seed. A pair whose short row is a run of its own
    (A, reused at its budget) is analysed as if nested: its difference also holds the two runs'
    noise, which errs towards "within noise". Rows without a twin are left out, with a note.
    """
    if EPOCHS not in factors or "seed" not in results or "read_from" not in results:
        return None
    if not results.read_from.notna().any():
        return None
    others = [f for f in factors if f != EPOCHS]
    whole, diff, long, lone = [], [], [], []
    for _, group in results.groupby([*others, "seed"], sort=False):
        at = [group[group[EPOCHS] == level] for level in (0, 1)]
        if len(at[0]) != 1 or len(at[1]) != 1:
            lone += list(group.index)
            continue
        own = next((g for g in at if g.read_from.isna().all()), at[1])  # the run's own row
        row = own.iloc[0].copy()
        values = [float(g[metric].iloc[0]) for g in at]
        row[metric] = (values[0] + values[1]) / 2  # NaN where either failed
        whole.append(row.rename(own.index[0]))
        diff.append(values[1] - values[0])
        long.append(float(own[metric].iloc[0]))
    if not whole:
        return None
    table = pd.DataFrame(whole).drop(columns=[EPOCHS, "read_from"])
    for name in [*others, "seed"]:
        table[name] = table[name].astype(int)
    notes = []
    if lone:
        notes.append(
            f"{len(lone)} runs without a twin at the other epoch budget (rows "
            f"{', '.join(str(i) for i in lone[:10])}) are left out of the split plot"
        )
    index = table.index
    return Pairs(EPOCHS, others, table, pd.Series(diff, index), pd.Series(long, index), notes)


def term_names(factors: list[str]) -> list[str]:
    """The full model's terms in its order: mains, then two-way interactions."""
    k = len(factors)
    return list(factors) + [
        f"{factors[i]} x {factors[j]}" for i in range(k) for j in range(i + 1, k)
    ]


def subplot(found: Pairs, factors: list[str], metric: str, alpha: float, drop=()) -> tuple:
    """Epochs and its interactions from the runs' differences: (effects table, SD, dof, notes).

    drop: whole-plot rows left out (runs that never learned or are unusual).
    """
    keep = found.diff.notna() & ~found.diff.index.isin(list(drop))
    z = found.whole.loc[keep, found.others].to_numpy(float) - 0.5
    y = found.diff[keep].to_numpy(float)
    x = np.column_stack([np.ones(len(y)), z])
    names = [found.epochs] + [
        " x ".join(sorted((found.epochs, f), key=factors.index)) for f in found.others
    ]
    columns = np.arange(x.shape[1])
    dof = len(y) - np.linalg.matrix_rank(x) if len(y) else 0
    notes = []
    if dof < MIN_DOF and len(columns) > 1:  # as ols.model: no interactions without the dof
        x, columns = x[:, :1], columns[:1]
        dof = len(y) - np.linalg.matrix_rank(x) if len(y) else 0
        notes.append(f"{found.epochs}'s interactions not fitted: too few residual dof")
    fitted = np.zeros(len(names), bool)
    fitted[columns] = estimable(x, columns) if len(y) else False
    terms = pd.DataFrame({"term": names, "kind": ["main"] + ["interaction"] * len(found.others)})
    terms["column"] = np.where(fitted, np.arange(len(names)), -1)
    terms["verdict"] = np.where(fitted, "", "inestimable")
    terms["aliased_with"] = ""
    fit = Model(x, terms, int(dof), notes)
    out = estimate(fit, y, metric, alpha) if len(y) else None
    table = terms.drop(columns="column")
    for key in ("effect", "se", "ci_low", "ci_high", "p", "p_holm"):
        table.insert(len(table.columns) - 2, key, np.nan)
        if out is not None:
            table.loc[fitted, key] = out[key][:, 0]
    if out is not None:
        table.loc[fitted, "verdict"] = out["verdict"][:, 0]
    sd = float(out["sd"][0]) if out is not None else math.nan
    return table, sd, int(max(dof, 0)), notes


def combine(whole: pd.DataFrame, sub: pd.DataFrame, factors, metric: str, alpha: float):
    """Both strata's terms in the full model's order, Holm over every fitted term."""
    table = pd.concat([whole, sub], ignore_index=True).set_index("term")
    order = [t for t in term_names(factors) if t in table.index]
    table = table.loc[order].reset_index()
    tested = table.verdict.isin(FITTED).to_numpy() & table.p.notna().to_numpy()
    if tested.any():
        p = table.loc[tested, "p"].to_numpy(float)[:, None]
        adjusted = holm(p)
        table.loc[tested, "p_holm"] = adjusted[:, 0]
        effect = table.loc[tested, "effect"].to_numpy(float)[:, None]
        table.loc[tested, "verdict"] = verdicts(effect, adjusted, metric, alpha)[:, 0]
    return table


def twins(found: Pairs, row, out) -> float:
    """The median own value of the kept runs of `row`'s cell (NaN: none)."""
    levels = found.whole[found.others]
    same = (levels == levels.loc[row]).all(axis=1) & ~levels.index.isin(list(out))
    return float(found.long[same].median()) if same.any() else math.nan


def one_run_sd(whole_sd: float, diff_sd: float) -> float:
    """A run's SD from the strata's: Var(mean) + Var(difference) / 4 (nan where one is)."""
    return math.sqrt(whole_sd**2 + diff_sd**2 / 4)

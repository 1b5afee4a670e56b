"""Least squares on two-level factors coded -1/2 (A's level) and +1/2 (B's level), many responses
at once: which terms the observed cells can estimate, t tests, Holm's adjustment and verdicts.

The coding makes a main effect's coefficient "B's level minus A's level" averaged over the other
factors' levels, and a two-way interaction's "f's effect at g's B level minus at its A level".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from segexp.evaluation import lower_is_better

MIN_DOF = 4  # residual dof needed before two-way interactions are worth fitting


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values down axis 0 (terms), each column (replication) on its own."""
    m = p.shape[0]
    order = np.argsort(p, axis=0)
    ranked = np.take_along_axis(p, order, axis=0) * (m - np.arange(m))[:, None]
    ranked = np.minimum(np.maximum.accumulate(ranked, axis=0), 1.0)
    adjusted = np.empty_like(ranked)
    np.put_along_axis(adjusted, order, ranked, axis=0)
    return adjusted


def verdicts(effect: np.ndarray, p_holm: np.ndarray, metric: str, alpha: float) -> np.ndarray:
    """hurt / helped where the Holm p is below alpha (direction from the metric's name)."""
    good = effect < 0 if lower_is_better(metric) else effect > 0
    return np.where(p_holm < alpha, np.where(good, "helped", "hurt"), "within noise")


def t_tests(effect, se, dof: int, alpha: float, scale: float) -> dict[str, np.ndarray]:
    """CIs, p and Holm p from the t distribution, arrays (terms, reps); zero noise gives p 0 or 1."""
    tol = 1e-9 * max(1.0, scale)  # below this an effect or SE is rounding error
    effect = np.where(np.abs(effect) < tol, 0.0, effect)
    if dof <= 0:
        nan = np.full_like(effect, np.nan)
        return {"effect": effect, "se": nan, "ci_low": nan, "ci_high": nan, "p": nan, "p_holm": nan}
    se = np.where(se < tol, 0.0, se)
    half = stats.t.ppf(1 - alpha / 2, dof) * se
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2 * stats.t.sf(np.abs(effect) / se, dof)
    p = np.where(se == 0, (effect == 0).astype(float), p)
    return {
        "effect": effect,
        "se": se,
        "ci_low": effect - half,
        "ci_high": effect + half,
        "p": p,
        "p_holm": holm(p) if len(p) else p,
    }


def estimable(x: np.ndarray, columns) -> np.ndarray:
    """Per column: is its coefficient estimable (unit vector in the row space of x)?"""
    projector = np.linalg.pinv(x) @ x
    eye = np.eye(x.shape[1])
    return np.array([np.abs(projector[:, j] - eye[:, j]).max() < 1e-8 for j in columns])


def seed_blocks(results: pd.DataFrame, factors: list[str], observed: pd.DataFrame) -> np.ndarray:
    """Seed dummies (one per seed past the first) when every cell was run with the same seeds."""
    if "seed" not in results or results.seed.nunique() < 2:
        return np.zeros((len(observed), 0))
    if results.groupby(factors).seed.agg(frozenset).nunique() > 1:
        return np.zeros((len(observed), 0))
    seeds = sorted(results.seed.unique())
    return np.stack([(observed.seed == s).to_numpy(float) for s in seeds[1:]], axis=1)


@dataclass
class Model:
    x: np.ndarray  # (runs with a value, coefficients)
    terms: pd.DataFrame  # term, kind, column (of x; -1 when not estimable), verdict, aliased_with
    dof: int
    notes: list[str]


def model(results: pd.DataFrame, factors: list[str], metric: str, interactions: bool = True):
    """The OLS model of the runs with a value: +-1/2 coded factors, seed blocks, estimable terms.

    Two-way interactions are fitted when that loses no main effect and leaves MIN_DOF residual
    dof (decided from the observed cells only, never from the metric values).
    """
    observed = results[results[metric].notna()]
    z = observed[factors].to_numpy(float) - 0.5  # (n, k): -1/2 = A's level, +1/2 = B's
    n, k = z.shape
    pairs = list(itertools.combinations(range(k), 2))
    base = np.column_stack([np.ones(n), seed_blocks(results, factors, observed)])
    mains = list(range(base.shape[1], base.shape[1] + k))
    x = np.column_stack([base, z])
    notes = []
    replicated = n > 0 and observed.groupby(factors).size().max() > 1
    columns = np.array(mains + [-1] * len(pairs))
    if interactions and pairs:
        # add interactions one by one, skipping any that would make a main effect inestimable
        main_ok, with_pairs = estimable(x, mains), x
        for p, (i, j) in enumerate(pairs):
            trial = np.column_stack([with_pairs, z[:, i] * z[:, j]])
            if (estimable(trial, mains) == main_ok).all():
                with_pairs, columns[k + p] = trial, trial.shape[1] - 1
        if n - np.linalg.matrix_rank(with_pairs) >= MIN_DOF or not replicated:
            x = with_pairs
            if (columns[k:] < 0).any():
                notes.append(
                    f"{(columns[k:] < 0).sum()} two-way interactions not fitted: with the observed"
                    " cells they would alias main effects, which assume them zero"
                )
        else:  # no verdicts without dof for the noise
            columns[k:] = -1
            notes.append("two-way interactions not fitted: too few residual dof")
    names = list(factors) + [f"{factors[i]} x {factors[j]}" for i, j in pairs]
    fitted = columns >= 0
    fitted[fitted] = estimable(x, columns[fitted])
    terms = pd.DataFrame({"term": names, "kind": ["main"] * k + ["interaction"] * len(pairs)})
    terms["column"] = np.where(fitted, columns, -1)
    terms["verdict"] = np.where(fitted, "", "inestimable")
    terms["aliased_with"] = ""
    # interactions whose columns are equal up to sign on the observed rows: only their sum is known
    cols = {names[k + p]: z[:, i] * z[:, j] for p, (i, j) in enumerate(pairs)}
    for row in terms[(terms.kind == "interaction") & ~fitted].itertuples():
        col = cols[row.term]
        twins = [
            t
            for t, c in cols.items()
            if t != row.term and (np.allclose(c, col) or np.allclose(c, -col))
        ]
        if twins:
            terms.loc[row.Index, ["verdict", "aliased_with"]] = ["aliased", ", ".join(twins)]
    dof = n - np.linalg.matrix_rank(x)
    if not replicated:
        dof = 0
        notes.append("no replicates: no cell has two finished seeds, so no verdicts")
    return Model(x, terms, int(dof), notes)


def estimate(fit: Model, y: np.ndarray, metric: str, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Effects, CIs, p, Holm p and verdicts of the estimable terms for many responses at once.

    Args:
        y: (runs with a value,) or (runs, replications), in the order of the model's rows.
    Returns arrays (estimable terms, replications), terms in fit.terms order.
    """
    y = y.reshape(len(y), -1)
    pinv = np.linalg.pinv(fit.x)
    beta = pinv @ y  # (coefficients, reps); estimable coefficients do not depend on the g-inverse
    s2 = ((y - fit.x @ beta) ** 2).sum(axis=0) / fit.dof if fit.dof > 0 else np.nan
    cols = fit.terms.column[fit.terms.column >= 0].to_numpy()
    var = np.diag(pinv @ pinv.T)[cols]  # = diag((x'x)^-) for these columns
    se = np.sqrt(var[:, None] * s2)
    out = t_tests(beta[cols], se, fit.dof, alpha, float(np.abs(y).max(initial=1.0)))
    out["verdict"] = verdicts(out["effect"], out["p_holm"], metric, alpha)
    if fit.dof <= 0:
        out["verdict"] = np.full(out["effect"].shape, "no replicates")
    return out

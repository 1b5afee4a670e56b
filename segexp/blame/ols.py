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
MAX_SEED_BLOCKS = 64  # more seeds than this: no seed blocks (they would cost a column each)


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


def t_tests(effect, se, dof, alpha: float, scale: float) -> dict[str, np.ndarray]:
    """CIs, p and Holm p from the t distribution, arrays (terms, reps); zero noise gives p 0 or 1.

    dof: one number, or one per replication (reps,); a replication without dof gets NaN.
    """
    tol = 1e-9 * max(1.0, scale)  # below this an effect or SE is rounding error
    effect = np.where(np.abs(effect) < tol, 0.0, effect)
    dof = np.broadcast_to(np.asarray(dof, float), effect.shape[1:])
    usable = dof > 0
    dof = np.where(usable, dof, np.nan)
    se = np.where(usable, np.where(se < tol, 0.0, se), np.nan)
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
    if results.seed.nunique() > MAX_SEED_BLOCKS:  # a column per seed would outgrow the runs
        return np.zeros((len(observed), 0))
    seeds = sorted(results.seed.unique())
    return np.stack([(observed.seed == s).to_numpy(float) for s in seeds[1:]], axis=1)


@dataclass
class Model:
    x: np.ndarray  # (runs with a value, coefficients): intercept, seed blocks, mains, pairs
    terms: pd.DataFrame  # term, kind, column (of x; -1 when not estimable), verdict, aliased_with
    dof: int
    notes: list[str]
    additive: int = 0  # x[:, :additive] is the model without interactions
    cells: np.ndarray | None = None  # (runs,) a cell number per run (same levels, same number)


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
    cells = np.unique(observed[factors].to_numpy(int), axis=0, return_inverse=True)[1]
    return Model(x, terms, int(dof), notes, base.shape[1] + k, cells.reshape(-1))


@dataclass
class Fits:
    """Weighted least squares of many responses at once; arrays over replications R."""

    beta: np.ndarray  # (R, coefficients)
    resid: np.ndarray  # (runs, R): y minus the fit, for kept and left-out runs alike
    leverage: np.ndarray  # (runs, R): x_i (X'WX)^- x_i'
    ginv: np.ndarray  # (R, coefficients, coefficients): (X'WX)^-
    dof: np.ndarray  # (R,) kept runs minus the rank
    sd: np.ndarray  # (R,) residual SD of the kept runs (NaN without dof)


def gram(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(R, p, p): X'WX for each column of weights w (runs, R), as one matrix product."""
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), -1)  # (runs, p * p)
    return (w.T @ outer).reshape(w.shape[1], x.shape[1], x.shape[1])


def wls(x: np.ndarray, y: np.ndarray, keep: np.ndarray | None = None) -> Fits:
    """Least squares of y (runs, R) on x (runs, p) over the kept runs (runs, R) of each column.

    Memory and time are linear in the runs: only p x p matrices are inverted, and only once
    when every replication keeps every run.
    """
    same = keep is None or keep.all()
    keep = np.ones(y.shape, bool) if keep is None else keep
    w = keep.astype(float)
    xtwx = gram(x, w[:, :1]) if same else gram(x, w)
    ginv = np.linalg.pinv(xtwx, rcond=1e-10, hermitian=True)
    rank = np.linalg.matrix_rank(xtwx, rtol=1e-10, hermitian=True) if len(xtwx) else 0
    leverage = ((x @ ginv) * x).sum(axis=-1).T  # (R, runs, p) -> (runs, R)
    if same:  # one inverse for all replications
        ginv, leverage = (
            np.broadcast_to(ginv, (y.shape[1], *ginv.shape[1:])),
            leverage[:, [0] * y.shape[1]],
        )
    beta = np.einsum("rij,rj->ri", ginv, (w * y).T @ x)
    resid = y - x @ beta.T
    dof = w.sum(axis=0) - rank
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt(np.where(dof > 0, (w * resid**2).sum(axis=0) / dof, np.nan))
    return Fits(beta, resid, leverage, ginv, dof.astype(int), sd)


def estimable_in(fits: Fits, x: np.ndarray, keep: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(terms, R): is each column still estimable from each replication's kept runs?"""
    xtwx = gram(x, keep.astype(float))
    projector = fits.ginv @ xtwx  # (R, p, p)
    eye = np.eye(x.shape[1])[:, cols]
    return (np.abs(projector[:, :, cols] - eye).max(axis=1) < 1e-8).T


def estimate(
    fit: Model, y: np.ndarray, metric: str, alpha: float = 0.05, keep: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Effects, CIs, p, Holm p and verdicts of the estimable terms for many responses at once.

    Args:
        y: (runs with a value,) or (runs, replications), in the order of the model's rows.
        keep: (runs, replications) bool, the runs each replication uses (default all).
    Returns arrays (estimable terms, replications), terms in fit.terms order, and `sd` (reps,),
    the residual SD of one run.
    """
    y = y.reshape(len(y), -1)
    keep = np.ones(y.shape, bool) if keep is None else keep
    fits = wls(fit.x, y, keep)
    cols = fit.terms.column[fit.terms.column >= 0].to_numpy()
    dof = fits.dof if fit.dof > 0 else np.zeros_like(fits.dof)
    var = np.diagonal(fits.ginv, axis1=1, axis2=2)[:, cols].T  # (terms, reps)
    effect, se = fits.beta[:, cols].T, np.sqrt(var) * fits.sd
    # leaving runs out can lose a term in some replications (the screen avoids it for real data)
    lost = np.zeros(effect.shape, bool) if keep.all() else ~estimable_in(fits, fit.x, keep, cols)
    effect, se = np.where(lost, np.nan, effect), np.where(lost, np.nan, se)
    out = t_tests(effect, se, dof, alpha, float(np.abs(y).max(initial=1.0)))
    out["verdict"] = verdicts(out["effect"], out["p_holm"], metric, alpha)
    out["verdict"] = np.where(dof > 0, out["verdict"], "no replicates")
    out["verdict"] = np.where(lost, "inestimable", out["verdict"])
    out["sd"] = np.where(dof > 0, fits.sd, np.nan)
    out["dof"] = np.maximum(dof, 0)
    return out

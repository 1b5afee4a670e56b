"""Runs that never learned or disagree with their twins far beyond the rest: found and left out.

Training noise is heavy-tailed (a seed that never took off, a best epoch picked on a spike), and
one such run inflates the least-squares seed SD enough to erase every verdict. Two screens, both
batched over replications (columns of y) so that simulations run the code real tables run:

- Never learned: a metric at the level of a constant prediction (for Dice, an empty mask scores
  0), or a training loss that never fell (the caller reads it from the run's history). Such runs are left out like failed runs, unless a factor explains them (Fisher's exact
  test of learned vs not between its levels, Holm over factors at ALPHA_EXPLAIN): then the level
  that stops training keeps its runs, and the harm shows in the effects. (`analyze` also keeps
  cells in which every run is dead when leaving them out would lose a term.) A dead run that
  scores like the runs of its cell that learned (inside their 99% prediction interval, with the
  pure-error SD of the kept runs) stays too: leaving it out would hide nothing, only cost power.
- Unusual: a LAD-started Huber, then Tukey-bisquare M-fit of the additive model (the IRLS of
  statsmodels' RLM) marks runs beyond CANDIDATE robust SDs; each is tested, mildest first,
  against the least-squares fit of the analysis model on the other runs (a prediction t test,
  Bonferroni over the runs at ALPHA_OUTLIER), and a cleared one rejoins the fit (forward search).
  Well-behaved tables lose a run with chance <= ALPHA_OUTLIER. The last run of a cell stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .ols import Model, estimate, gram, holm, wls

HUBER, BISQUARE = 1.345, 4.685  # the tuning constants of statsmodels' HuberT and TukeyBiweight
CANDIDATE = 3.0  # robust residuals beyond this many robust SDs are tested
ALPHA_OUTLIER = 0.0001  # per table: the chance of leaving out a run when none is unusual
ALPHA_EXPLAIN = 0.001  # family-wise, over factors: "this level stops training" by chance
ALPHA_ALIKE = 0.01  # a dead run inside this prediction interval of its learned twins stays
FLOOR_TOLERANCE = 0.01  # a metric this close to a constant prediction's level never learned
ITERATIONS, LAD_ITERATIONS = 40, 60
SEARCH_STEPS = 30  # candidates tested one by one; more are tested at once


@dataclass
class Screen:
    """Per run and replication (runs, R): what the robust analysis keeps, and why not."""

    kept: np.ndarray  # bool: the runs the robust analysis fits
    dead: np.ndarray  # bool: at a constant prediction's level
    explained: np.ndarray  # bool: dead, but at a level that stops training (kept)
    alike: np.ndarray  # bool: dead, but scored like its cell's runs that learned (kept)
    unusual: np.ndarray  # bool: far from the fit of the others (left out)
    t: np.ndarray  # prediction t of each tested run against the fit of the others (else NaN)
    predicted: np.ndarray  # the analysis model's value of a tested run, fitted without it
    takeoff_p: np.ndarray  # (factors, R) Holm p: learned-or-not differs between the levels


def nan_mad(resid: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(R,) median absolute residual of the kept runs / 0.6745, as statsmodels' RLM (centre 0)."""
    return np.nanmedian(np.where(keep, np.abs(resid), np.nan), axis=0) / stats.norm.ppf(0.75)


def huber_weights(u: np.ndarray) -> np.ndarray:
    return np.minimum(1.0, HUBER / np.maximum(np.abs(u), 1e-300))


def bisquare_weights(u: np.ndarray) -> np.ndarray:
    return np.where(np.abs(u) < BISQUARE, (1 - (u / BISQUARE) ** 2) ** 2, 0.0)


def weighted_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(R, p) coefficients of least squares with weights w (runs, R); x has full column rank."""
    xtwx = gram(x, w)
    ridge = 1e-12 * np.trace(xtwx, axis1=1, axis2=2)[:, None, None] * np.eye(x.shape[1])
    return np.linalg.solve(xtwx + ridge, ((w * y).T @ x)[:, :, None])[:, :, 0]


def lad_fit(x, y, keep, floor: float) -> np.ndarray:
    """(R, p) least absolute deviations by IRLS (statsmodels: QuantReg(q=0.5)), from OLS."""
    w0 = keep.astype(float)
    beta = weighted_fit(x, y, w0)
    for _ in range(LAD_ITERATIONS):
        beta = weighted_fit(x, y, w0 / np.maximum(np.abs(y - x @ beta.T), floor))
    return beta


def huber_fit(x, y, keep, beta, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber IRLS re-estimating the MAD scale each step (statsmodels: RLM(HuberT).fit)."""
    w0 = keep.astype(float)
    for _ in range(ITERATIONS):
        resid = y - x @ beta.T
        scale = np.maximum(nan_mad(resid, keep), floor)
        beta = weighted_fit(x, y, w0 * huber_weights(resid / scale))
    return beta, np.maximum(nan_mad(y - x @ beta.T, keep), floor)


def bisquare_fit(x, y, keep, beta, scale) -> np.ndarray:
    """Tukey bisquare IRLS at a fixed scale (RLM(TukeyBiweight).fit(update_scale=False))."""
    w0 = keep.astype(float)
    for _ in range(ITERATIONS):
        beta = weighted_fit(x, y, w0 * bisquare_weights((y - x @ beta.T) / scale))
    return beta


def m_fit(x, y, keep, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """LAD, then Huber, then bisquare at Huber's scale: (beta (R, p), scale (R,)).

    LAD is a start many far runs cannot drag; a bisquare re-estimating its own scale can chase
    a subset of the runs, so it keeps Huber's.
    """
    y = np.where(keep, y, 0.0)
    beta, scale = huber_fit(x, y, keep, lad_fit(x, y, keep, floor), floor)
    return bisquare_fit(x, y, keep, beta, scale), scale


def keep_one_per_cell(out: np.ndarray, keep: np.ndarray, score, cells: np.ndarray) -> None:
    """In place: where a cell would lose every kept run, the closest one stays."""
    for cell in np.unique(cells):
        rows = np.flatnonzero(cells == cell)
        emptied = (out[rows] & keep[rows]).any(axis=0) & ~(keep[rows] & ~out[rows]).any(axis=0)
        if emptied.any():
            closest = rows[np.argmin(np.where(keep[rows], score[rows], np.inf), axis=0)]
            reps = np.flatnonzero(emptied)
            out[closest[reps], reps] = False


def fisher_p(hit: np.ndarray, level: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Two-sided Fisher exact p per factor and replication (factors, R): hit vs level.

    hit, keep: (runs, R) bool; level: (runs, factors) 0/1. Vectorised hypergeometric tails.
    """
    n = keep.sum(axis=0)  # (R,)
    hits = (hit & keep).sum(axis=0)
    at_b = level.T.astype(float) @ keep  # (factors, R) runs at B's level
    hits_b = level.T.astype(float) @ (hit & keep)  # (factors, R)
    grid = np.arange(int(n.max(initial=0)) + 1)[:, None, None]
    pmf = stats.hypergeom.pmf(grid, n[None, None], hits[None, None], at_b[None])
    observed = stats.hypergeom.pmf(hits_b[None], n[None, None], hits[None, None], at_b[None])
    p = np.where(pmf <= observed * (1 + 1e-7), pmf, 0.0).sum(axis=0)
    return np.where(hits > 0, np.minimum(p, 1.0), 1.0)


def never_learned(
    y, keep, floors, levels: np.ndarray, stalled=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dead, explained, takeoff Holm p): runs at a constant prediction's level (or stalled),
    and which a factor's level explains (it stops training: more dead than the other, by far)."""
    dead = np.zeros(y.shape, bool) if stalled is None else keep & stalled.reshape(len(y), -1)
    floors = np.asarray(floors, float)
    per_run = floors.reshape(len(y), -1) if floors.ndim == 2 else floors[None, :]
    for j in range(per_run.shape[1]):
        dead |= keep & (np.abs(y - per_run[:, j : j + 1]) <= FLOOR_TOLERANCE)  # NaN: no level
    if not dead.any():
        return dead, dead.copy(), np.ones((levels.shape[1], y.shape[1]))
    p = holm(fisher_p(dead, levels, keep))
    share_b = (levels.T.astype(float) @ (dead & keep)) / np.maximum(levels.T @ keep, 1)
    share_a = ((1 - levels.T).astype(float) @ (dead & keep)) / np.maximum((1 - levels.T) @ keep, 1)
    stops = p < ALPHA_EXPLAIN  # (factors, R)
    at_bad = np.zeros(y.shape, bool)
    for j in range(levels.shape[1]):
        bad = np.where(share_b[j] > share_a[j], 1, 0)  # (R,) the level that stops training
        at_bad |= stops[j] & (levels[:, j][:, None] == bad[None])
    return dead, dead & at_bad, p


def like_twins(fit: Model, y, keep, dead, floor: float) -> np.ndarray:
    """(runs, R): dead runs inside the prediction interval of their cell's kept runs (cell
    means, pure-error SD pooled over the cells), where the cell has a kept run."""
    cells, w = fit.cells, keep.astype(float)
    n = np.zeros((cells.max() + 1, y.shape[1]))
    np.add.at(n, cells, w)  # (cells, R): kept runs
    total = np.zeros_like(n)
    np.add.at(total, cells, w * y)
    candidates = dead & ~keep & (n[cells] > 0)
    if not candidates.any():
        return candidates
    resid = y - (total / np.maximum(n, 1))[cells]  # (runs, R), from the cell's mean
    dof = w.sum(axis=0) - (n > 0).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = np.sqrt((w * resid**2).sum(axis=0) / dof)
    t = held_out_t(resid, sd, 1 / np.maximum(n[cells], 1), floor)
    bound = stats.t.ppf(1 - ALPHA_ALIKE / 2, np.where(dof > 0, dof, np.nan))
    return candidates & (np.abs(t) <= bound)  # NaN (no replicated cell): not alike


def screen(
    fit: Model,
    y: np.ndarray,
    levels: np.ndarray,
    floors=(),
    alpha: float = ALPHA_OUTLIER,
    keep_dead: np.ndarray | None = None,
    stalled: np.ndarray | None = None,
) -> Screen:
    """Which runs of each replication y (runs, R) of the model's rows the robust analysis keeps.

    levels: (runs, factors) 0/1, the rows' factor levels (for the take-off test).
    floors: the metric of constant predictions: levels for every run, or (runs, levels).
    keep_dead: (runs, R) dead runs to keep as data all the same.
    stalled: (runs,) runs whose training loss never fell: dead too, whatever their metric.
    """
    y = y.reshape(len(y), -1)
    finite = np.isfinite(y)
    y = np.where(finite, y, 0.0)
    dead, explained, takeoff = never_learned(y, finite, floors, levels, stalled)
    if keep_dead is not None:
        explained |= dead & keep_dead.reshape(y.shape)
    keep = finite & ~(dead & ~explained)
    floor = 1e-9 * max(1.0, float(np.abs(y).max(initial=1.0)))  # noise-free tables
    additive = fit.x[:, : fit.additive]
    # too few runs learned to fit anything (none, say): every run stays data, as it scored
    short = keep.sum(axis=0) < np.linalg.matrix_rank(additive)
    keep[:, short] = finite[:, short]
    alike = like_twins(fit, y, keep, dead, floor)
    keep |= alike
    beta, scale = m_fit(additive, y, keep, floor)
    runs = keep.sum(axis=0)
    dof = np.maximum(runs - np.linalg.matrix_rank(additive), 1)
    score = np.abs(y - additive @ beta.T) / (scale * np.sqrt(runs / dof))  # residuals run short
    out = keep & (score > CANDIDATE)
    keep_one_per_cell(out, keep, score, fit.cells)
    t, predicted = forward_search(fit, y, keep, out, score, floor, alpha)
    return Screen(keep & ~out, dead, explained, alike, out, t, predicted, takeoff)


def held_out_t(resid, sd, leverage, floor: float) -> np.ndarray:
    """Prediction t of runs against a fit: resid / (sd sqrt(1 + leverage)); 0 within `floor`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(resid) > floor, resid / (sd * np.sqrt(1 + leverage)), 0.0)


def prediction_t(fit, y, keep, out, floor, alpha):
    """(t, predicted, beyond) of every run against the fit of the kept runs that are not out.

    beyond: |t| past the Bonferroni bound over the kept runs (no dof: never).
    """
    clean = wls(fit.x, y, keep & ~out)
    t = held_out_t(clean.resid, clean.sd, clean.leverage, floor)
    dof = np.where(clean.dof > 0, clean.dof, np.nan)
    bound = stats.t.ppf(1 - alpha / (2 * keep.sum(axis=0)), dof)
    return t, y - clean.resid, np.abs(t) > bound


def forward_search(fit, y, keep, out, score, floor, alpha):
    """In place on out: test candidates mildest first; a cleared one rejoins the fit. (t, pred).

    Past SEARCH_STEPS candidates (large tables) the rest are tested at once.
    """
    reps = y.shape[1]
    order = np.argsort(np.where(out, score, np.inf), axis=0)
    t, predicted = np.full(y.shape, np.nan), np.full(y.shape, np.nan)
    columns = np.arange(reps)
    for rank in range(min(int(out.sum(axis=0).max(initial=0)), SEARCH_STEPS)):
        rows = order[rank]
        testing = out[rows, columns]  # replications that still have a rank-th candidate
        ti, pi, beyond = prediction_t(fit, y, keep, out, floor, alpha)
        t[rows[testing], columns[testing]] = ti[rows, columns][testing]
        predicted[rows[testing], columns[testing]] = pi[rows, columns][testing]
        cleared = testing & ~beyond[rows, columns]
        out[rows[cleared], columns[cleared]] = False
    rest = out & np.isnan(t)
    if rest.any():
        ti, pi, beyond = prediction_t(fit, y, keep, out, floor, alpha)
        t, predicted = np.where(rest, ti, t), np.where(rest, pi, predicted)
        out &= ~(rest & ~beyond)
    return t, predicted


def robust_estimate(
    fit: Model,
    y: np.ndarray,
    levels: np.ndarray,
    metric: str,
    alpha: float = 0.05,
    floors=(),
    keep_dead: np.ndarray | None = None,
    stalled: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], Screen]:
    """`estimate` of each replication y (runs, R) on the runs its screen keeps; and the screen."""
    found = screen(fit, y, levels, floors, keep_dead=keep_dead, stalled=stalled)
    return estimate(fit, y.reshape(len(y), -1), metric, alpha, keep=found.kept), found

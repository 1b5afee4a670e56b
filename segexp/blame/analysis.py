"""Statistics of `segexp blame`: effects for any two-level design, robust to runs that failed to
learn, Holm verdicts; also the `--seeds auto` stopping rule (the ablation path: ablation.py).

Effects come from least squares on -1/2 / +1/2 coded factors (segexp.blame.ols), so a main effect
is "B's level minus A's level" averaged over the other factors' levels, unbiased for any set of
finished cells; terms those cells cannot separate are reported `inestimable` or `aliased`, never
dropped. Runs that never learned or disagree with their twins far beyond the rest are named and
left out first (segexp.blame.robust); the least squares of every run is kept beside, as `plain`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import robust, sequential, splitplot
from .ols import Model, estimate, holm, model

SIGNIFICANT = ("hurt", "helped")
COLUMNS = ("effect", "se", "ci_low", "ci_high", "p", "p_holm")


@dataclass
class LeftOut:
    """A run the robust analysis leaves out, with what it scored against its twins."""

    row: int  # index label in the results table
    levels: tuple[int, ...]
    seed: int | None
    run_id: str | None
    value: float
    twins: float  # median of the kept runs of the same cell (NaN: none)
    predicted: float  # the model's value for it, fitted without it (NaN: not tested)
    reason: str  # "constant prediction", "train/loss flat" (never learned) or "unusual"
    why: str = ""  # what its history shows (the blame command fills it in)


@dataclass
class Takeoff:
    """A factor whose level changes how often training takes off (or runs are unusual)."""

    factor: str
    what: str  # "learned" or "unusual"
    hits: tuple[int, int]  # runs that learned (or were unusual) at A's and B's level
    runs: tuple[int, int]
    p_holm: float


@dataclass
class Analysis:
    effects: pd.DataFrame  # term, kind, effect, se, ci_low, ci_high, p, p_holm, verdict, ...
    metric: str
    factors: list[str]
    seed_sd: float  # residual SD of one run (NaN without replicates)
    dof: int  # residual degrees of freedom
    runs: int  # runs the estimates use
    failed: pd.DataFrame  # rows of the input whose metric is missing or not finite
    alpha: float = 0.05
    notes: list[str] = field(default_factory=list)
    plain: pd.DataFrame | None = None  # the effects of least squares on every finished run
    plain_seed_sd: float = float("nan")
    left_out: list[LeftOut] = field(default_factory=list)
    takeoff: list[Takeoff] = field(default_factory=list)
    screened_out: list[str] = field(default_factory=list)  # "name (at 2 epochs, ...)": no verdict


def constant_levels(metric: str) -> tuple[float, ...]:
    """The metric's value for a constant prediction where the name tells it (Dice, IoU: empty)."""
    return (0.0,) if any(word in metric.lower() for word in ("dice", "iou")) else ()


def run_floors(floors, observed: pd.DataFrame, metric: str):
    """Constant-prediction levels for the observed runs: a tuple for all, or (runs, levels)."""
    if floors is None:
        return constant_levels(metric)
    if isinstance(floors, pd.DataFrame):
        return floors.reindex(observed.index).to_numpy(float)
    return floors


def finite_table(results: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """The table with inf metrics as failed (NaN), and a note naming them."""
    values = pd.to_numeric(results[metric], errors="coerce")
    infinite = values.notna() & ~np.isfinite(values.to_numpy(float))
    notes = []
    if infinite.any():
        rows = ", ".join(str(i) for i in results.index[infinite][:10])
        notes.append(f"{int(infinite.sum())} runs with an infinite {metric} (rows {rows}) failed")
    return results.assign(**{metric: values.where(~infinite)}), notes


def without(results: pd.DataFrame, metric: str, rows) -> pd.DataFrame:
    """The table with these rows' metric emptied: left out as failed runs are (seeds intact)."""
    return results.assign(**{metric: results[metric].mask(results.index.isin(rows))})


def lost(out: dict, plain: dict) -> bool:
    """Whether leaving runs out made a term inestimable that every run estimates."""
    return bool(((out["verdict"] == "inestimable") & (plain["verdict"] != "inestimable")).any())


def effects_table(fit: Model, out: dict) -> pd.DataFrame:
    table = fit.terms.drop(columns="column")
    fitted = (fit.terms.column >= 0).to_numpy()
    for key in COLUMNS:
        table.insert(len(table.columns) - 2, key, np.nan)
        table.loc[fitted, key] = out[key][:, 0]
    table.loc[fitted, "verdict"] = out["verdict"][:, 0]
    return table


def analyze(
    results: pd.DataFrame,
    factors: list[str],
    metric: str,
    interactions: bool = True,
    alpha: float = 0.05,
    floors: tuple[float, ...] | pd.DataFrame | None = None,
    stalled: pd.Series | None = None,
) -> Analysis:
    """Main effects and two-way interactions by OLS with Holm verdicts, unusual runs left out.

    Args:
        results: one row per planned run: a 0/1 column per factor (0 = A's level), optionally
            `seed` and `run_id`, and the metric (NaN = failed run); other columns are ignored.
        interactions: fit two-way interactions where the observed cells allow (see `model`).
        alpha: family-wise error rate of the verdicts; CIs are per term (1 - alpha).
        floors: the metric's values for constant predictions (default: constant_levels), or
            a frame of them per row of results (same index: each run's validation masks).
        stalled: per row of results (same index), whether the run's training loss never fell.
    """
    results, notes = finite_table(results, metric)
    if results[metric].notna().sum() == 0:
        raise ValueError(f"no run has a value of {metric}: nothing to analyse")
    if (nested := splitplot.pairs(results, factors, metric)) is not None:
        return split_plot(nested, results, factors, metric, interactions, alpha, floors, stalled)
    fit = model(results, factors, metric, interactions)
    observed = results[results[metric].notna()]
    y = observed[metric].to_numpy(float)
    plain = estimate(fit, y, metric, alpha)
    result = Analysis(
        effects_table(fit, plain), metric, list(factors), float(plain["sd"][0]),
        int(plain["dof"][0]), len(y), results[results[metric].isna()], alpha, notes + fit.notes,
    )  # fmt: skip
    if fit.dof > 0:
        floors = run_floors(floors, observed, metric)
        screened(result, results, fit, plain, floors, stalled, interactions)
    return result


def split_plot(nested, results, factors, metric, interactions, alpha, floors, stalled):
    """`analyze` of a table whose epochs were read from histories: see splitplot.py."""
    whole = analyze(nested.whole, nested.others, metric, interactions, alpha, floors, stalled)
    out = [run.row for run in whole.left_out]
    sub, sd, dof, notes = splitplot.subplot(nested, factors, metric, alpha, out)
    result = Analysis(
        splitplot.combine(whole.effects, sub, factors, metric, alpha), metric, list(factors),
        splitplot.one_run_sd(whole.seed_sd, sd), whole.dof, 2 * whole.runs,
        results[results[metric].isna()], alpha, whole.notes + nested.notes + notes,
    )  # fmt: skip
    result.notes.append(
        f"split plot: {nested.epochs} and its interactions are tested within runs (each run's "
        f"difference between its budgets: residual SD {sd:.3g}, dof {dof}), the other factors "
        f"between runs (each run's mean of its two budgets, residual dof {whole.dof})"
    )
    if whole.plain is not None:
        every, every_sd, _, _ = splitplot.subplot(nested, factors, metric, alpha)
        result.plain = splitplot.combine(whole.plain, every, factors, metric, alpha)
        result.plain_seed_sd = splitplot.one_run_sd(whole.plain_seed_sd, every_sd)
    for run in whole.left_out:  # the run's own row and value, its cell with its epochs
        run.levels = tuple(int(v) for v in results.loc[run.row, factors])
        run.value, run.twins = float(nested.long[run.row]), splitplot.twins(nested, run.row, out)
    result.left_out, result.takeoff = whole.left_out, whole.takeoff
    return result


def screened(result: Analysis, results, fit, plain: dict, floors, stalled, interactions) -> None:
    """In place: the analysis without the runs that never learned or are unusual, named."""
    factors, metric, alpha = result.factors, result.metric, result.alpha
    observed = results[results[metric].notna()]
    y, levels = observed[metric].to_numpy(float), observed[factors].to_numpy(int)
    flat = None if stalled is None else stalled.reindex(observed.index, fill_value=False)
    flat = None if flat is None else flat.to_numpy(bool)
    out, screen = robust.robust_estimate(fit, y, levels, metric, alpha, floors, stalled=flat)
    if lost(out, plain):  # a level or cell where no run learned: those runs are its effect
        whole = pd.Series(screen.dead[:, 0]).groupby(fit.cells).transform("all").to_numpy()
        out, screen = robust.robust_estimate(
            fit, y, levels, metric, alpha, floors, whole[:, None], flat
        )
    result.left_out = left_out_runs(observed, factors, metric, screen, flat)
    result.takeoff = takeoffs(observed, factors, screen, alpha)
    alike = int((screen.alike & screen.kept).sum())
    if (kept_dead := int((screen.dead & screen.kept).sum()) - alike) > 0:
        result.notes.append(
            f"{kept_dead} runs that never learned are kept as data: no run of their cell (or of"
            " their factor level) learned, so that is the configuration's result"
        )
    if alike:
        result.notes.append(
            f"{alike} runs that never learned are kept as data: each scored like its cell's runs"
            " that learned (inside the 99% prediction interval), so leaving it out hides nothing"
        )
    if not result.left_out:
        return
    kept = screen.kept[:, 0]
    if lost(out, plain):  # a cell lost every run: model what is left
        fit = model(without(results, metric, observed.index[~kept]), factors, metric, interactions)
        out = estimate(fit, y[kept], metric, alpha)
        result.notes += [n for n in fit.notes if n not in result.notes]
    result.plain, result.plain_seed_sd = result.effects, result.seed_sd
    result.effects, result.seed_sd = effects_table(fit, out), float(out["sd"][0])
    result.dof, result.runs = int(out["dof"][0]), int(kept.sum())


def left_out_runs(observed, factors, metric: str, screen, stalled=None) -> list[LeftOut]:
    """The runs the screen left out, each with its twins' median and the model's value."""
    out = []
    kept = screen.kept[:, 0]
    levels = observed[factors].to_numpy(int)
    cells = np.unique(levels, axis=0, return_inverse=True)[1].ravel()
    values = observed[metric].to_numpy(float)
    twins = pd.Series(np.where(kept, values, np.nan)).groupby(cells).transform("median")
    for i in np.flatnonzero(~kept):
        out.append(
            LeftOut(
                observed.index[i],
                tuple(int(v) for v in levels[i]),
                int(observed.seed.iloc[i]) if "seed" in observed else None,
                observed.run_id.iloc[i] if "run_id" in observed else None,
                float(values[i]),
                float(twins.iloc[i]),
                float(screen.predicted[i, 0]),
                reason(screen, i, stalled),
            )
        )
    return out


def reason(screen, i: int, stalled) -> str:
    """Why run i is out: "constant prediction", "train/loss flat" or "unusual"."""
    if not screen.dead[i, 0]:
        return "unusual"
    return "train/loss flat" if stalled is not None and stalled[i] else "constant prediction"


def takeoffs(observed: pd.DataFrame, factors, screen, alpha: float) -> list[Takeoff]:
    """Factors whose levels differ in how many runs learned, or were unusual (Fisher, Holm)."""
    levels = observed[factors].to_numpy(int)
    keep = np.ones(screen.kept.shape, bool)
    tests = [("learned", screen.dead, screen.takeoff_p[:, 0])]
    if screen.unusual.any():
        p = holm(robust.fisher_p(screen.unusual, levels, keep))[:, 0]
        tests.append(("unusual", screen.unusual, p))
    found = []
    for what, hit, p in tests:
        for j in np.flatnonzero(p < alpha):
            at = [levels[:, j] == 0, levels[:, j] == 1]
            hits = [int(hit[a, 0].sum()) for a in at]
            runs = [int(a.sum()) for a in at]
            if what == "learned":
                hits = [r - h for r, h in zip(runs, hits, strict=True)]
            found.append(Takeoff(factors[j], what, tuple(hits), tuple(runs), float(p[j])))
    return found


def seeds_decision(
    results: pd.DataFrame,
    factors: list[str],
    metric: str,
    max_rounds: int,
    margin: float | None = None,
    alpha: float = 0.05,
    round_index: int | None = None,
    spending: str = "obf",
) -> dict:
    """`--seeds auto`: after a round of seeds, which terms are settled and whether to stop.

    Each look tests at its round's share of alpha (sequential.look_levels: spent by information
    fraction, shares fixed in advance and summing to alpha, so a false hurt/helped verdict at the
    stopping look stays below alpha whatever the stopping); report the final analysis at that
    look's level (returned). A term is settled when its verdict is hurt/helped, or when its CI at
    that level lies inside +-margin (practically zero; margin defaults to 0.5 x the current seed
    SD, itself an estimate), or when it is inestimable or aliased (more seeds cannot help).
    round_index: the look, 0 after the first round (default: from the table's planned seeds);
    spending: "obf", or "bonferroni" (alpha / max_rounds at every look, for comparisons).
    Returns {stop, settled: {term: reason}, open: [terms], alpha, analysis}.
    """
    level = sequential.look_level(results, max_rounds, alpha, spending, round_index)
    result = analyze(results, factors, metric, alpha=level)
    margin = 0.5 * result.seed_sd if margin is None else margin
    table = result.effects
    done = sequential.settled(table.verdict, table.ci_low, table.ci_high, margin)
    within = f"within +-{margin:.3g}"
    settled = {
        term: verdict if verdict in sequential.FINAL else within
        for term, verdict in zip(table.term[done], table.verdict[done], strict=True)
    }
    still_open = table.term[~done].tolist()
    return {
        "stop": not still_open,
        "settled": settled,
        "open": still_open,
        "alpha": level,
        "analysis": result,
    }

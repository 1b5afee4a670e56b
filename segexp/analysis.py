"""Statistics of `segexp blame` v2: OLS effects for any two-level design, Holm verdicts, the report.

Each changed key is a factor coded -1/2 (A's value) and +1/2 (B's value), so a main effect's
coefficient is "B's level minus A's level" averaged over the other factors' levels, and a
two-way interaction's is how much more f's effect is at g's B level than at its A level. Least
squares on the runs that finished is unbiased for any set of observed cells; terms the observed
cells cannot separate are reported as `inestimable` or `aliased`, never dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

LOWER_IS_BETTER = ("loss", "hd95", "mae", "error")
MIN_DOF = 4  # residual dof needed before two-way interactions are worth fitting
SIGNIFICANT = ("hurt", "helped")
COLORS = {"hurt": "tab:red", "helped": "tab:green"}


def lower_is_better(metric: str) -> bool:
    """v1's rule: a metric named like a loss or an error is better when lower."""
    return any(word in metric for word in LOWER_IS_BETTER)


@dataclass
class Analysis:
    effects: pd.DataFrame  # term, kind, effect, se, ci_low, ci_high, p, p_holm, verdict, ...
    metric: str
    factors: list[str]
    seed_sd: float  # residual SD of one run (NaN without replicates)
    dof: int  # residual degrees of freedom
    runs: int  # runs with a metric value
    failed: pd.DataFrame  # rows of the input whose metric is missing
    alpha: float = 0.05
    notes: list[str] = field(default_factory=list)


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


def analyze(
    results: pd.DataFrame,
    factors: list[str],
    metric: str,
    interactions: bool = True,
    alpha: float = 0.05,
) -> Analysis:
    """Main effects and two-way interactions by OLS with Holm-adjusted verdicts.

    Args:
        results: one row per planned run: a 0/1 column per factor (0 = A's level), optionally
            `seed`, and the metric (NaN = failed run); other columns are ignored.
        interactions: fit two-way interactions where the observed cells allow (see `model`).
        alpha: family-wise error rate of the verdicts; CIs are per term (1 - alpha).
    """
    if results[metric].notna().sum() == 0:
        raise ValueError(f"no run has a value of {metric}: nothing to analyse")
    fit = model(results, factors, metric, interactions)
    y = results[metric].dropna().to_numpy(float)
    out = estimate(fit, y, metric, alpha)
    table = fit.terms.drop(columns="column")
    fitted = (fit.terms.column >= 0).to_numpy()
    for key in ("effect", "se", "ci_low", "ci_high", "p", "p_holm"):
        table.insert(len(table.columns) - 2, key, np.nan)
        table.loc[fitted, key] = out[key][:, 0]
    table.loc[fitted, "verdict"] = out["verdict"][:, 0]
    seed_sd = (
        float(np.sqrt(((y - fit.x @ np.linalg.pinv(fit.x) @ y) ** 2).sum() / fit.dof))
        if fit.dof > 0
        else float("nan")
    )
    failed = results[results[metric].isna()]
    return Analysis(
        table, metric, list(factors), seed_sd, fit.dof, len(y), failed, alpha, fit.notes
    )


def number(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def headline(
    analysis: Analysis,
    factor_labels: dict[str, str] | None = None,
    trainings: int | None = None,
    minutes: float | None = None,
) -> str:
    """The report's first sentence: what hurt or helped by how much, the rest within noise."""
    labels = factor_labels or {}
    table, metric = analysis.effects, analysis.metric
    sig = table[table.verdict.isin(SIGNIFICANT)].sort_values("p_holm")
    level, parts = f"{100 * (1 - analysis.alpha):.4g}%", []
    for row in sig.itertuples():
        lo, hi = (
            sorted((abs(row.ci_low), abs(row.ci_high)))
            if row.ci_low * row.ci_high > 0
            else (0.0, max(abs(row.ci_low), abs(row.ci_high)))
        )
        what = (
            labels.get(row.term, row.term)
            if row.kind != "interaction"
            else f"the interaction {row.term}"
        )
        parts.append(
            f"{what} {row.verdict} {metric} by {number(abs(row.effect))} "
            f"({level} CI {number(lo)} to {number(hi)}, Holm p {p_text(row.p_holm)})"
        )
    steps = table[table.kind != "interaction"]
    rest = steps[steps.verdict == "within noise"]
    noise = f"seed SD {number(analysis.seed_sd)}"
    if not len(table[table.verdict != "inestimable"]) or (table.verdict == "no replicates").any():
        text = f"No verdicts on {metric}: no replicates (one finished seed per cell); add seeds"
    elif parts:
        text = "; ".join(parts)
        if len(rest):
            other = "change is" if len(rest) == 1 else "changes are"
            text += f"; the other {len(rest)} {other} within noise ({noise})"
    else:
        which = "the change is" if len(rest) == 1 else f"all {len(rest)} changes are"
        text = f"No change moved {metric} beyond seed noise: {which} within noise ({noise})"
    lost = steps[steps.verdict == "inestimable"]
    if len(lost):
        text += f"; {', '.join(labels.get(t, t) for t in lost.term)} could not be estimated"
    text += "."
    counts = [
        f"{trainings} trainings" if trainings is not None else "",
        f"{minutes:.0f} min" if minutes is not None else "",
    ]
    if any(counts):
        text += " " + ", ".join(c for c in counts if c) + "."
    return text


def figure_api():
    """(figure, save) from segexp.plots, or the same on bare matplotlib before plots.py lands."""
    try:
        from segexp.plots import figure, save
    except ImportError:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def figure(rows=1, cols=1, **kwargs):
            return plt.subplots(rows, cols, **kwargs)

        def save(fig, path):
            fig.tight_layout()
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            return Path(path)

    return figure, save


def plot_forest(
    analysis: Analysis, path: Path, factor_labels: dict[str, str] | None = None
) -> Path:
    """Forest plot: one row per term, point and CI coloured by verdict, zero line."""
    figure, save = figure_api()
    table = analysis.effects
    table = table[(table.kind != "interaction") | table.effect.notna()]  # no rows of NaN pairs
    fig, ax = figure(figsize=(8, 1.2 + 0.35 * len(table)))
    y = np.arange(len(table))[::-1]
    for yi, row in zip(y, table.itertuples(), strict=True):
        if np.isnan(row.effect):
            ax.text(0, yi, row.verdict, ha="center", va="center", color="tab:gray", fontsize=8)
            continue
        color = COLORS.get(row.verdict, "tab:gray")
        if not np.isnan(row.ci_low):
            ax.plot([row.ci_low, row.ci_high], [yi, yi], color=color, lw=2)
        ax.plot(row.effect, yi, "o", color=color)
    ax.axvline(0, color="black", lw=0.8)
    names = [(factor_labels or {}).get(t, t) for t in table.term]
    labels = (
        [f"{s}. {t}" for s, t in zip(table.step, names, strict=True)] if "step" in table else names
    )
    level = f"{100 * (1 - analysis.alpha):.4g}%"
    ax.set(yticks=y, yticklabels=labels, xlabel=f"effect on {analysis.metric} (B - A), {level} CI")
    ax.set_title("red: hurt, green: helped, grey: within noise (Holm-adjusted)", fontsize=9)
    return save(fig, path)


def write_report(
    analysis: Analysis,
    out_dir: Path,
    title: str = "blame",
    factor_labels: dict[str, str] | None = None,
    trainings: int | None = None,
    minutes: float | None = None,
    context: list[str] | None = None,
    paired: pd.DataFrame | None = None,
) -> Path:
    """Write effects.csv, effects.png and report.md into out_dir; returns report.md's path.

    Args:
        factor_labels: term -> "optimizer: adam -> sgd", used in the headline and listed.
        context: extra lines for the report (design, seeds, reasons of failed cells).
        paired: per-case paired tests table, printed after the effects.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = analysis.effects
    table.to_csv(out_dir / "effects.csv", index=False)
    plot_forest(analysis, out_dir / "effects.png", factor_labels)
    shown = table[table.effect.notna()].copy()
    for key in ("effect", "ci_low", "ci_high"):
        shown[key] = shown[key].map(lambda v: f"{v:+.4f}")
    for key in ("p", "p_holm"):
        shown[key] = shown[key].map(lambda v: f"{v:.2g}")
    columns = [c for c in ("step", "term", "effect", "ci_low", "ci_high", "p", "p_holm", "verdict")]
    level = f"{100 * (1 - analysis.alpha):.4g}%"
    better = "lower" if lower_is_better(analysis.metric) else "higher"
    meaning = (
        "the step's cell minus the previous cell on the path (the order was picked on the same"
        " runs, so early steps lean towards B)"
        if "step" in table
        else "B's level minus A's level"
    )
    lines = [f"# {title}", "", headline(analysis, factor_labels, trainings, minutes), ""]
    lines += [f"- {term}: {label}" for term, label in (factor_labels or {}).items()]
    lines += [f"- {line}" for line in (context or [])] + [
        f"- runs analysed: {analysis.runs}; seed SD of {analysis.metric} ({better} is better): "
        f"{number(analysis.seed_sd)}, residual dof {analysis.dof}",
        f"- effect = {meaning}, {level} CI per term; verdicts from Holm-adjusted p "
        f"over the {int(table.p.notna().sum())} tested terms (family-wise error {analysis.alpha:.3g})",
        *(
            ["- f x g = f's effect at g's B level minus at its A level"]
            if "interaction" in set(table.kind)
            else []
        ),
        *[f"- {note}" for note in analysis.notes],
        "",
        "```",
        shown[[c for c in columns if c in shown]].to_string(index=False),
        "```",
        "",
        "![effects](effects.png)",
        "",
    ]
    if len(analysis.failed):
        cells = analysis.failed.drop(columns=[analysis.metric]).to_string(index=False)
        lines += [f"## Failed runs ({len(analysis.failed)}), left out", "", "```", cells, "```", ""]
    aliased = table[table.verdict == "aliased"]
    chains = {
        " = ".join(sorted([r.term, *r.aliased_with.split(", ")])) for r in aliased.itertuples()
    }
    lost = table.term[table.verdict == "inestimable"].tolist()
    if chains or lost:
        lines += ["## Not estimable from the observed cells", ""]
        lines += [
            f"- aliased (the data hold only their sum or difference): {c}" for c in sorted(chains)
        ]
        lines += [f"- inestimable: {', '.join(lost)}"] if lost else []
        lines += [""]
    if paired is not None:
        lines += ["## Per-case paired tests", "", "```", paired.to_string(index=False), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def factor_columns(table: pd.DataFrame, metric: str) -> list[str]:
    """The 0/1 columns that are not the seed, the metric or a run id."""
    skip = {"seed", metric, "run_id"}
    return [
        c
        for c in table.columns
        if c not in skip
        and pd.api.types.is_numeric_dtype(table[c])
        and set(table[c].dropna().unique()) <= {0, 1}
    ]


def from_table(
    path_or_df, metric: str, out_dir: Path, factors: list[str] | None = None
) -> Analysis:
    """Re-analyse a runs table without training: writes effects.csv, report.md, effects.png."""
    table = path_or_df if isinstance(path_or_df, pd.DataFrame) else pd.read_csv(path_or_df)
    if metric not in table:
        raise ValueError(f"no column {metric!r}; columns: {', '.join(table.columns)}")
    factors = factors or factor_columns(table, metric)
    if not factors:
        raise ValueError("no 0/1 factor columns found: name them with factors=[...]")
    result = analyze(table, factors, metric)
    write_report(result, out_dir, title=f"blame re-analysis of {metric}")
    return result

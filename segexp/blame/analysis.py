"""Statistics of `segexp blame` v2: effects for any two-level design, Holm verdicts, the report.

Effects come from least squares on -1/2 / +1/2 coded factors (segexp.ols), so a main effect is
"B's level minus A's level" averaged over the other factors' levels, unbiased for any set of
finished cells; terms those cells cannot separate are reported `inestimable` or `aliased`, never
dropped. Also the ablation path's analysis, the `--seeds auto` stopping rule and from_table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from segexp.evaluation import lower_is_better
from segexp.plots import figure, save

from .designs import path_steps
from .ols import estimate, model, seed_blocks, t_tests, verdicts

SIGNIFICANT = ("hurt", "helped")
COLORS = {"hurt": "tab:red", "helped": "tab:green"}


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


def path_analysis(results: pd.DataFrame, factors: list[str], metric: str, alpha: float = 0.05):
    """A finished ablation path as an Analysis: one row per step in path order.

    A step's effect is its cell's mean minus the previous cell's, from OLS on cell means plus
    seed blocks (when every cell ran the same seeds), t CI on the residual dof; Holm over the
    steps. The order is picked on the same runs, so early steps lean towards B (winner's curse).
    """
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
    failed = results[results[metric].isna()]
    seed_sd = math.sqrt(s2) if dof > 0 else float("nan")
    return Analysis(table, metric, list(factors), seed_sd, int(dof), len(y), failed, alpha)


def seeds_decision(
    results: pd.DataFrame,
    factors: list[str],
    metric: str,
    max_rounds: int,
    margin: float | None = None,
    alpha: float = 0.05,
) -> dict:
    """`--seeds auto`: after a round of seeds, which terms are settled and whether to stop.

    Each look (round) tests at alpha / max_rounds (Bonferroni over looks), so however the stopping
    falls out the chance of any false hurt/helped verdict over all looks stays <= alpha; report
    the final analysis at that same level (returned). A term is settled when its verdict is
    hurt/helped, or when its (1 - alpha/max_rounds) CI lies inside +-margin (practically zero;
    margin defaults to 0.5 x the current seed SD, itself an estimate), or when it is inestimable
    or aliased (more seeds cannot help). Returns {stop, settled: {term: reason}, open: [terms],
    alpha, analysis}.
    """
    level = alpha / max_rounds
    result = analyze(results, factors, metric, alpha=level)
    margin = 0.5 * result.seed_sd if margin is None else margin
    settled, still_open = {}, []
    for row in result.effects.itertuples():
        if row.verdict in SIGNIFICANT or row.verdict in ("inestimable", "aliased"):
            settled[row.term] = row.verdict
        elif row.verdict == "within noise" and -margin < row.ci_low and row.ci_high < margin:
            settled[row.term] = f"within +-{margin:.3g}"
        else:
            still_open.append(row.term)
    return {
        "stop": not still_open,
        "settled": settled,
        "open": still_open,
        "alpha": level,
        "analysis": result,
    }


def short_number(value: float) -> str:
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
            f"{what} {row.verdict} {metric} by {short_number(abs(row.effect))} "
            f"({level} CI {short_number(lo)} to {short_number(hi)}, Holm p {p_text(row.p_holm)})"
        )
    steps = table[table.kind != "interaction"]
    rest = steps[steps.verdict == "within noise"]
    noise = f"seed SD {short_number(analysis.seed_sd)}"
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


def plot_forest(
    analysis: Analysis, path: Path, factor_labels: dict[str, str] | None = None
) -> Path:
    """Forest plot: one row per term, point and CI coloured by verdict, zero line."""
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
        f"{short_number(analysis.seed_sd)}, residual dof {analysis.dof}",
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

"""The blame's words: the headline, the runs left out, the effects table, report.md, the note.

The note is the markdown MLflow shows as the parent run's description (its Overview page and the
runs table): the headline, the runs left out, the effects table, A and B by name, the figure's
artifact name. report.md holds the same and the details (failed runs, aliases, per-case Dice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from segexp.evaluation import lower_is_better

from .analysis import SIGNIFICANT, Analysis, LeftOut, Takeoff
from .forest import plot_forest

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as a formula
NOTE_LIMIT = 5000  # characters MLflow keeps in a tag value on every store


def escaped(value):
    """A text cell a spreadsheet would read as a formula, quoted with a leading '."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """table.to_csv with every text cell and column name escaped for spreadsheets."""
    safe = table.rename(columns=escaped)
    for column in safe.columns[[not pd.api.types.is_numeric_dtype(t) for t in safe.dtypes]]:
        safe[column] = safe[column].map(escaped)
    safe.to_csv(path, index=False)


def short_number(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}"


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def change_of(term: str, labels: dict) -> tuple[str, str] | None:
    """("3e-3", "1e-5") from a label "3e-3 -> 1e-5" (or "optimizer.lr 3e-3 -> 1e-5")."""
    parts = labels.get(term, "").removeprefix(term).strip().split(" -> ")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def at(term: str, labels: dict, level: int) -> str:
    """ "optimizer.lr=1e-5", or "f0 at B's level" without a label."""
    change = change_of(term, labels)
    return f"{term}={change[level]}" if change else f"{term} at {'AB'[level]}'s level"


def named(term: str, labels: dict) -> str:
    """ "optimizer.lr 3e-3 -> 1e-5": the term and its change, once each."""
    label = labels.get(term, "")
    return label if label.startswith(term) else f"{term} {label}".strip()


def verdict_text(table: pd.DataFrame, metric: str, labels: dict, level: str) -> list[str]:
    parts = []
    for row in table[table.verdict.isin(SIGNIFICANT)].sort_values("p_holm").itertuples():
        lo, hi = (
            sorted((abs(row.ci_low), abs(row.ci_high)))
            if row.ci_low * row.ci_high > 0
            else (0.0, max(abs(row.ci_low), abs(row.ci_high)))
        )
        what = (
            named(row.term, labels) if row.kind != "interaction" else f"the interaction {row.term}"
        )
        parts.append(
            f"{what} {row.verdict} {metric} by {short_number(abs(row.effect))} "
            f"({level} CI {short_number(lo)} to {short_number(hi)}, Holm p {p_text(row.p_holm)})"
        )
    return parts


def sentence(table: pd.DataFrame, metric: str, seed_sd: float, labels: dict, level: str) -> str:
    """What hurt or helped by how much, the rest within noise; no final full stop."""
    parts = verdict_text(table, metric, labels, level)
    steps = table[table.kind != "interaction"]
    rest = steps[steps.verdict == "within noise"]
    noise = f"seed SD {short_number(seed_sd)}"
    if not len(table[table.verdict != "inestimable"]) or (table.verdict == "no replicates").any():
        return f"No verdicts on {metric}: no replicates (one finished seed per cell); add seeds"
    if parts:
        text = "; ".join(parts)
        if len(rest):
            other = "change is" if len(rest) == 1 else "changes are"
            text += f"; the other {len(rest)} {other} within noise ({noise})"
    else:
        which = "the change is" if len(rest) == 1 else f"all {len(rest)} changes are"
        text = f"No change moved {metric} beyond seed noise: {which} within noise ({noise})"
    lost = steps[steps.verdict == "inestimable"]
    if len(lost):
        text += f"; {', '.join(named(t, labels) for t in lost.term)} could not be estimated"
    return text


def takeoff_text(finding: Takeoff, labels: dict) -> str:
    """ "with optimizer.lr=1e-5, 0 of 8 runs learned (8 of 8 with 3e-3)"."""
    verb = "learned" if finding.what == "learned" else "were unusual"
    a = (change_of(finding.factor, labels) or ("A's level",))[0]
    return (
        f"with {at(finding.factor, labels, 1)}, {finding.hits[1]} of {finding.runs[1]} runs {verb}"
        f" ({finding.hits[0]} of {finding.runs[0]} with {a}; Fisher, Holm p {p_text(finding.p_holm)})"
    )


def headline(
    analysis: Analysis,
    factor_labels: dict[str, str] | None = None,
    trainings: int | None = None,
    minutes: float | None = None,
) -> str:
    """The report's first paragraph: what hurt or helped by how much, the rest within noise.

    With runs left out it says so, and what least squares on every run said where that differs.
    """
    labels, metric = factor_labels or {}, analysis.metric
    level = f"{100 * (1 - analysis.alpha):.4g}%"
    text = sentence(analysis.effects, metric, analysis.seed_sd, labels, level) + "."
    if analysis.left_out:
        n = len(analysis.left_out)
        text += f" {n} run{'s' if n > 1 else ''} left out, named below"
        plain = analysis.plain
        if plain is not None and not plain.verdict.equals(analysis.effects.verdict):
            said = sentence(plain, metric, analysis.plain_seed_sd, labels, level)
            sway = "they sway" if n > 1 else "it sways"
            text += f"; least squares on every run, which {sway}, said: {said[0].lower()}{said[1:]}"
        text += "."
    for finding in analysis.takeoff:
        found = takeoff_text(finding, labels)
        text += f" {found[0].upper()}{found[1:]}."
    if analysis.screened_out:
        text += f" Screened out at low fidelity (no verdict): {', '.join(analysis.screened_out)}."
    counts = [
        f"{trainings} trainings" if trainings is not None else "",
        f"{minutes:.0f} min" if minutes is not None else "",
    ]
    if any(counts):
        text += " " + ", ".join(c for c in counts if c) + "."
    return text


def cell_label(levels: tuple[int, ...], factors: list[str], labels: dict) -> str:
    """ "A", "B", or the factors at B's level: "optimizer.lr=1e-5, scheduler=cosine"."""
    if not any(levels):
        return "A"
    if all(levels):
        return "B"
    return ", ".join(at(f, labels, 1) for f, v in zip(factors, levels, strict=True) if v)


def left_out_line(run: LeftOut, analysis: Analysis, labels: dict) -> str:
    """ "A, seed 43 (run 1a2b): val/dice_best 0.000 vs 0.791 (its twins); never learned; why"."""
    where = cell_label(run.levels, analysis.factors, labels)
    seed = f", seed {run.seed}" if run.seed is not None else ""
    ident = f" (run {run.run_id})" if isinstance(run.run_id, str) and run.run_id else ""
    against = (
        f"vs {short_number(run.twins)} (its twins)"
        if np.isfinite(run.twins)
        else f"vs {short_number(run.predicted)} (the other cells' fit)"
    )
    reason = {
        "constant prediction": "never learned: at the level of a constant prediction",
        "train/loss flat": "never learned: its training loss never fell",
    }.get(run.reason, "far beyond the seed noise of the rest")
    why = f"; {run.why}" if run.why else ""
    return f"{where}{seed}{ident}: {analysis.metric} {short_number(run.value)} {against}; {reason}{why}"


def effects_markdown(analysis: Analysis, labels: dict) -> list[str]:
    """The effects as a markdown table (term, change, effect, CI, Holm p, verdict)."""
    level = f"{100 * (1 - analysis.alpha):.4g}%"
    step = "step" in analysis.effects
    lines = [
        f"| {'step | ' if step else ''}term | change | effect | {level} CI | Holm p | verdict |",
        f"|{'---|' * (7 if step else 6)}",
    ]
    for row in analysis.effects.itertuples():
        if row.kind == "interaction" and not np.isfinite(row.effect):
            continue
        ci = f"{row.ci_low:+.4f} to {row.ci_high:+.4f}" if np.isfinite(row.ci_low) else ""
        effect = f"{row.effect:+.4f}" if np.isfinite(row.effect) else ""
        p = f"{row.p_holm:.2g}" if np.isfinite(row.p_holm) else ""
        first = f"{row.step} | " if step else ""
        change = labels.get(row.term, "").removeprefix(row.term).strip()
        cells = [row.term, change, effect, ci, p, row.verdict]
        lines.append(f"| {first}" + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return lines


def left_out_lines(analysis: Analysis, labels: dict) -> list[str]:
    """The runs left out, one line each, and how often training took off per factor level."""
    lines = [f"- {left_out_line(run, analysis, labels)}" for run in analysis.left_out]
    return lines + [f"- {takeoff_text(finding, labels)}" for finding in analysis.takeoff]


def plain_lines(analysis: Analysis, labels: dict) -> list[str]:
    """Least squares on every finished run, for comparison (only when runs were left out)."""
    if analysis.plain is None:
        return []
    plain = Analysis(
        analysis.plain, analysis.metric, analysis.factors, analysis.plain_seed_sd, 0, 0,
        analysis.failed, analysis.alpha,
    )  # fmt: skip
    return [
        "## Least squares on every finished run (the runs left out included)",
        "",
        f"Seed SD {short_number(analysis.plain_seed_sd)}.",
        "",
        *effects_markdown(plain, labels),
        "",
    ]


def detail_lines(analysis: Analysis) -> list[str]:
    """Failed runs, aliased and inestimable terms."""
    table, lines = analysis.effects, []
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
    return lines


def summary_lines(analysis: Analysis, context: list[str]) -> list[str]:
    table = analysis.effects
    level = f"{100 * (1 - analysis.alpha):.4g}%"
    better = "lower" if lower_is_better(analysis.metric) else "higher"
    meaning = (
        "the step's cell minus the previous cell on the path (the order was picked on the same"
        " runs, so early steps lean towards B)"
        if "step" in table
        else "B's level minus A's level"
    )
    left = f" ({len(analysis.left_out)} left out)" if analysis.left_out else ""
    return [
        *[f"- {line}" for line in context],
        f"- runs analysed: {analysis.runs}{left}; seed SD of {analysis.metric} ({better} is "
        f"better): {short_number(analysis.seed_sd)}, residual dof {analysis.dof}",
        f"- effect = {meaning}, {level} CI per term; verdicts from Holm-adjusted p over the "
        f"{int(table.p.notna().sum())} tested terms (family-wise error {analysis.alpha:.3g})",
        *(
            ["- f x g = f's effect at g's B level minus at its A level"]
            if "interaction" in set(table.kind)
            else []
        ),
        *[f"- {note}" for note in analysis.notes],
    ]


def write_report(
    analysis: Analysis,
    out_dir: Path,
    title: str = "blame",
    factor_labels: dict[str, str] | None = None,
    trainings: int | None = None,
    minutes: float | None = None,
    context: list[str] | None = None,
    cases: list[str] | None = None,
) -> Path:
    """Write effects.csv, effects.png and report.md into out_dir; returns report.md's path.

    Args:
        factor_labels: term -> "adam -> sgd", shown in the headline and the effects table.
        context: extra lines for the report (design, seeds, reasons of failed cells); a
            "factors (k): ..." line is dropped, the effects table lists the factors.
        cases: the per-case section's lines (segexp.blame.evidence.case_lines).
    """
    labels = factor_labels or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(analysis.effects, out_dir / "effects.csv")
    plot_forest(analysis, out_dir / "effects.png", lambda term: named(term, labels))
    context = [line for line in context or [] if not line.startswith("factors (")]
    lines = [f"# {title}", "", headline(analysis, labels, trainings, minutes), ""]
    if analysis.left_out or analysis.takeoff:
        lines += [f"## Runs left out of the analysis ({len(analysis.left_out)})", ""]
        lines += [*left_out_lines(analysis, labels), ""]
    lines += ["## Effects", "", *summary_lines(analysis, context), ""]
    lines += [
        *effects_markdown(analysis, labels),
        "",
        "Figure: effects.png (an artifact of this run).",
        "",
    ]
    lines += plain_lines(analysis, labels) + detail_lines(analysis)
    if cases:
        lines += ["## Per-case Dice", "", *cases, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def note(
    analysis: Analysis,
    factor_labels: dict[str, str] | None = None,
    runs: tuple[tuple[str, str], tuple[str, str]] | None = None,
    trainings: int | None = None,
    minutes: float | None = None,
) -> str:
    """The parent run's description (MLflow's `mlflow.note.content`): verdict first, markdown.

    runs: ((A's name, A's id), (B's name, B's id)).
    """
    labels = factor_labels or {}
    lines = [headline(analysis, labels, trainings, minutes), ""]
    if runs:
        (name_a, id_a), (name_b, id_b) = runs
        lines += [f"A = `{name_a}` ({id_a}), B = `{name_b}` ({id_b}).", ""]
    if analysis.left_out or analysis.takeoff:
        lines += ["Left out:", "", *left_out_lines(analysis, labels), ""]
    lines += [*effects_markdown(analysis, labels), ""]
    lines += ["Figure: effects.png; details: report.md (this run's artifacts)."]
    text = "\n".join(lines)
    return text if len(text) <= NOTE_LIMIT else text[: NOTE_LIMIT - 40] + "\n\n(cut: see report.md)"

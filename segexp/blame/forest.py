"""The blame's forest plot: each effect with its confidence interval, coloured by verdict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from segexp.plots import figure, save

from .analysis import Analysis

COLORS = {"hurt": "tab:red", "helped": "tab:green"}


def plot_forest(analysis: Analysis, path: Path, name: Callable[[str], str] = str) -> Path:
    """Forest plot: one row per term (labelled `name(term)`), point and CI coloured by verdict,
    zero line."""
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
    names = [name(t) for t in table.term]
    labels = (
        [f"{s}. {t}" for s, t in zip(table.step, names, strict=True)] if "step" in table else names
    )
    level = f"{100 * (1 - analysis.alpha):.4g}%"
    ax.set(yticks=y, yticklabels=labels, xlabel=f"effect on {analysis.metric} (B - A), {level} CI")
    ax.set_title("red: hurt, green: helped, grey: within noise (Holm-adjusted)", fontsize=9)
    return save(fig, path)

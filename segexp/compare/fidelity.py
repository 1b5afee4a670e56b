"""`segexp fidelity PARENT`: how early a sweep's or a blame's runs rank as they finally do.

Costs no training: every child's per-epoch history says what it would have reported stopped
after 1, 2, ... epochs (for a best-epoch metric, the best epoch so far by the run's monitor). The
rank correlation of those values with the final ones, per epoch, tells whether a screen at that
many epochs would have ranked the configs right; for a blame, the A-vs-B gap per epoch tells
whether a screen that short can see the gap at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from scipy import stats

from segexp import tracking
from segexp.plots import epoch_axis, figure, save
from segexp.tracking.history import epoch_values

RHO_GOOD = 0.9  # the rank agreement a screen should reach


@dataclass
class Fidelity:
    """Per epoch budget (1, 2, ...): rank agreement with the final metric, and A-vs-B gap."""

    metric: str
    budgets: list[int]
    spearman: list[float]
    kendall: list[float]
    runs: list[int]  # runs compared at each budget
    gap: list[float] | None = None  # B - A after each budget (a blame)
    final_gap: float | None = None

    @property
    def earliest(self) -> int | None:
        """The fewest epochs at which Spearman's rho reaches RHO_GOOD."""
        return next(
            (b for b, r in zip(self.budgets, self.spearman, strict=True) if r >= RHO_GOOD), None
        )

    def table(self) -> pd.DataFrame:
        table = pd.DataFrame(
            {"epochs": self.budgets, "spearman": self.spearman, "kendall": self.kendall}
        )
        table["runs"] = self.runs
        if self.gap is not None:
            table["gap_b_minus_a"] = self.gap
        return table


def run_values(client: MlflowClient, run: Run, metric: str) -> list[float] | None:
    """A run's per-budget values of `metric`, by the monitor it was trained with."""
    params = run.data.params
    monitor = params.get("checkpoint.monitor", "val/dice")
    mode = params.get("checkpoint.mode", "max")
    return epoch_values(client, run.info.run_id, metric, monitor, mode)


def padded(values: list[float], budgets: int) -> list[float]:
    """A run that stopped early reports after any larger budget what it reported at its end."""
    return values + [values[-1]] * (budgets - len(values))


def rank_agreement(curves: pd.DataFrame, final: pd.Series) -> tuple[list, list, list]:
    """Spearman and Kendall correlation of each column of `curves` (runs x budgets) with `final`."""
    rho, tau, counts = [], [], []
    for budget in curves.columns:
        both = pd.concat([curves[budget], final], axis=1).dropna()
        counts.append(len(both))
        if len(both) < 3 or both.iloc[:, 0].nunique() < 2 or both.iloc[:, 1].nunique() < 2:
            rho.append(float("nan"))
            tau.append(float("nan"))
            continue
        rho.append(float(stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1]).statistic))
        tau.append(float(stats.kendalltau(both.iloc[:, 0], both.iloc[:, 1]).statistic))
    return rho, tau, counts


def ab_gap(client: MlflowClient, run_a: Run, run_b: Run, metric: str):
    """(B - A after each budget up to the shorter run's, B - A at the end); None without history."""
    a, b = (run_values(client, run, metric) for run in (run_a, run_b))
    if not a or not b:
        return None, None
    n = max(len(a), len(b))
    gap = list(np.subtract(padded(b, n), padded(a, n)))
    final = [run.data.metrics.get(metric) for run in (run_a, run_b)]
    return [float(g) for g in gap], (None if None in final else final[1] - final[0])


def fidelity(client: MlflowClient, parent_id: str, metric: str | None = None) -> Fidelity:
    """Rank agreement per epoch budget over a parent's FINISHED children (and A vs B for a blame)."""
    parent = client.get_run(parent_id)
    runs = [  # a blame's screened cells trained to fewer epochs: not comparable
        r
        for r in tracking.children(client, parent)
        if r.info.status == "FINISHED" and r.data.tags.get(tracking.tags.FIDELITY) != "screen"
    ]
    if not runs:
        raise ValueError(f"run {parent_id} has no FINISHED child runs: nothing to compare")
    metric = metric or tracking.optimized_metric(runs)
    values = {r.info.run_id: run_values(client, r, metric) for r in runs}
    values = {k: v for k, v in values.items() if v}
    budgets = max((len(v) for v in values.values()), default=0)
    curves = pd.DataFrame({k: padded(v, budgets) for k, v in values.items()}).T
    curves.columns = range(1, budgets + 1)
    final = pd.Series({r.info.run_id: r.data.metrics.get(metric) for r in runs}, dtype=float)
    rho, tau, counts = rank_agreement(curves, final)
    result = Fidelity(metric, list(curves.columns), rho, tau, counts)
    pair = parent.data.tags.get("segexp.blame", "")
    if "->" in pair:
        a, b = (client.get_run(r) for r in pair.split("->", 1))
        result.gap, result.final_gap = ab_gap(client, a, b, metric)
        if result.gap is not None:
            result.gap = (result.gap + [result.gap[-1]] * budgets)[:budgets]
    return result


def summary_lines(result: Fidelity) -> list[str]:
    """What `segexp fidelity` prints below the table."""
    earliest = result.earliest
    lines = [
        f"{result.metric}: Spearman's rho with the final value reaches {RHO_GOOD} after "
        f"{earliest} epochs" if earliest else
        f"{result.metric}: Spearman's rho with the final value never reaches {RHO_GOOD}: "
        "no shorter budget ranks these runs as their end does"
    ]  # fmt: skip
    if result.gap is not None and result.final_gap is not None:
        same = [
            b for b, g in zip(result.budgets, result.gap, strict=True) if g * result.final_gap > 0
        ]
        lines.append(
            f"A-vs-B gap at the end {result.final_gap:+.4f}; "
            + (f"same sign from {same[0]} epochs on" if same else "never of the same sign before")
        )
    return lines


def plot(result: Fidelity, path: Path) -> Path:
    """Rank correlations per budget (and the A-vs-B gap on a second axis)."""
    fig, ax = figure()
    ax.plot(result.budgets, result.spearman, marker="o", label="Spearman")
    ax.plot(result.budgets, result.kendall, marker="s", label="Kendall")
    ax.axhline(RHO_GOOD, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel(f"rank correlation with final {result.metric}")
    epoch_axis(ax, "epochs trained")
    if result.gap is not None:
        gap_ax = ax.twinx()
        gap_ax.plot(result.budgets, result.gap, color="black", linestyle="--", label="B - A")
        gap_ax.axhline(0, color="black", linewidth=0.5)
        gap_ax.set_ylabel("B - A")
        gap_ax.legend(loc="lower right")
    ax.legend(loc="upper left")
    return save(fig, path)

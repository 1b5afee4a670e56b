"""The `--seeds auto` looks: the share of alpha each round of seeds spends; when a term is settled.

Round r (0 for the first) has `first + r * per_round` seeds per cell; the last possible round,
`max_rounds - 1`, has the most. Its information fraction t is its seeds over the last round's.

Why the family-wise false-verdict rate of the stopping look stays <= alpha: each look's share
depends on its round alone, never on the data, and the shares sum to alpha; Holm keeps the chance
of a false hurt/helped verdict at look r at most its share, whatever the terms' correlation; so by
the union bound the chance of one at any look is <= alpha, however strongly the looks (which
share runs) correlate and wherever the data stop. The spending puts little at the early looks,
where few seeds detect little at a small level anyway, and keeps most for the last ones, where a
blame that cannot settle its terms within noise ends (benchmarks/sim_sequential.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

FIRST, PER_ROUND = 2, 1  # seeds per cell of the first round, and seeds each later round adds
SPENDINGS = ("obf", "bonferroni")
FINAL = ("hurt", "helped", "inestimable", "aliased")  # verdicts more seeds would not change


def spent(t, alpha: float = 0.05):
    """Alpha spent by information fraction t: Lan-DeMets' O'Brien-Fleming-like function.

    2 - 2 Phi(z_{1-alpha/2} / sqrt(t)): next to nothing at the first looks, alpha at t = 1.
    """
    t = np.asarray(t, float)
    z = stats.norm.ppf(1 - alpha / 2)
    return 2 * stats.norm.sf(z / np.sqrt(np.maximum(t, 1e-300)))  # t = 0: nothing spent


def look_levels(
    max_rounds: int,
    alpha: float = 0.05,
    spending: str = "obf",
    first: int = FIRST,
    per_round: int = PER_ROUND,
) -> np.ndarray:
    """The level each round's look tests at, (max_rounds,), summing to alpha.

    "obf": the increments of `spent` at the rounds' information fractions; "bonferroni": alpha /
    max_rounds at every look (the plain union bound, for comparison).
    """
    if spending not in SPENDINGS:
        raise ValueError(f"spending must be one of {SPENDINGS}, not {spending!r}")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, not {max_rounds}")
    if spending == "bonferroni":
        return np.full(max_rounds, alpha / max_rounds)
    seeds = first + per_round * np.arange(max_rounds)
    cumulative = spent(seeds / seeds[-1], alpha)
    cumulative[-1] = alpha  # exactly, whatever the rounding of Phi
    return np.diff(cumulative, prepend=0.0)


def round_of(results: pd.DataFrame, first: int = FIRST, per_round: int = PER_ROUND) -> int:
    """The round a blame table has reached, from its planned seeds (never from its metric)."""
    if "seed" not in results:
        raise ValueError("a table without a seed column: pass the round to seeds_decision")
    seeds = results.seed.nunique()
    if seeds < first or (seeds - first) % per_round:
        raise ValueError(f"{seeds} seeds per cell is no round of {first} + {per_round} per round")
    return (seeds - first) // per_round


def look_level(
    results: pd.DataFrame, max_rounds: int, alpha: float, spending: str, round_index=None
) -> float:
    """The level of this look: round_index's share of alpha (default: the table's round)."""
    look = round_of(results) if round_index is None else round_index
    if not 0 <= look < max_rounds:
        raise ValueError(f"round {look} is no look of {max_rounds} rounds (0 is the first)")
    return float(look_levels(max_rounds, alpha, spending)[look])


def settled(verdict, ci_low, ci_high, margin) -> np.ndarray:
    """Which terms need no more seeds: a final verdict, or within noise with the CI in +-margin.

    Arrays of any one shape (terms, or terms x replications); margin broadcasts against them.
    """
    verdict = np.asarray(verdict)
    with np.errstate(invalid="ignore"):
        inside = (-margin < np.asarray(ci_low, float)) & (np.asarray(ci_high, float) < margin)
    return np.isin(verdict, FINAL) | ((verdict == "within noise") & inside)

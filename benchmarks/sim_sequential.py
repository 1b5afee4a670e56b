"""`segexp blame --seeds auto` on planted tables: looks at spent alpha against Bonferroni's.

A full factorial of 3 factors (8 cells) gets 2 seeds per cell, then one more per round, at most 4
rounds (2 to 5 seeds); after each round the seeds rule (sequential.settled on the analysis of
`analyze`: the screen, then least squares) decides whether to stop, and the blame reports the
verdicts of the look it stopped at, at that look's level. Both rules see the same planted tables:
"bonferroni" tests every look at alpha / rounds, "obf" at the increments of the O'Brien-Fleming-
like spending function. Per scenario: the family-wise false-verdict rate (any term planted at
zero called hurt or helped in the final report), the power (the planted harm on f0 called hurt),
the mean seeds per cell spent and the share of blames that stopped before the last round.

    python -m benchmarks.sim_sequential                   # the table, 4000 blames a scenario
    python -m benchmarks.sim_sequential --reps 500
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from segexp.blame import make_design, model
from segexp.blame.analysis import SIGNIFICANT, constant_levels
from segexp.blame.robust import robust_estimate
from segexp.blame.sequential import FIRST, look_levels, settled

from .blame_noise import markdown, one_thread

METRIC = "val/dice_best"
SD, HEALTHY = 0.02, 0.8  # seed SD and the metric's level
FACTORS = ["f0", "f1", "f2"]
ROUNDS = 4
SPENDINGS = ("bonferroni", "obf")


@dataclass(frozen=True)
class Scenario:
    name: str
    harm: float  # the planted effect on f0, in seed SDs (negative: Dice falls)
    margin: float | None = None  # the settle margin in seed SDs (None: the rule's default)


SCENARIOS = [
    Scenario("no effect", 0.0),
    Scenario("harm 1.0 SD", -1.0),
    Scenario("harm 1.5 SD", -1.5),
    # a wide margin settles terms within noise early enough for blames to stop before 5 seeds
    Scenario("no effect, margin 2 SD", 0.0, 2.0),
    Scenario("harm 1.5 SD, margin 2 SD", -1.5, 2.0),
]


@dataclass
class Rates:
    """Shares of the simulated blames; seeds: the mean seeds per cell at the stopping look."""

    false: float
    power: float
    seeds: float
    early: float  # stopped before the last round


def runs_table(seeds: int) -> pd.DataFrame:
    """Every cell of the full factorial at seeds 0 .. seeds - 1 (what the rounds plan)."""
    cells = make_design(len(FACTORS), "full").cells
    table = pd.DataFrame(np.repeat(np.array(cells), seeds, axis=0), columns=FACTORS)
    table["seed"] = np.tile(np.arange(seeds), len(cells))
    table[METRIC] = 0.0
    return table


def planted(table: pd.DataFrame, harm: float, reps: int, rng) -> np.ndarray:
    """(runs, reps) metric values: the harm on f0 (in SDs), a seed effect and normal seed noise."""
    mean = HEALTHY + harm * SD * (table.f0.to_numpy(float) - 0.5) + 0.3 * SD * table.seed
    return mean.to_numpy()[:, None] + rng.normal(0, SD, (len(table), reps))


def look(table: pd.DataFrame, y: np.ndarray, level: float, margin: float | None):
    """The verdicts (terms, reps), term names, and which replications stop, at one look."""
    fit = model(table, FACTORS, METRIC)
    levels = table[FACTORS].to_numpy(int)
    out, _ = robust_estimate(fit, y, levels, METRIC, level, constant_levels(METRIC))
    margin = 0.5 * out["sd"] if margin is None else margin * SD  # as seeds_decision
    done = settled(out["verdict"], out["ci_low"], out["ci_high"], margin).all(axis=0)
    return out["verdict"], fit.terms.term[fit.terms.column >= 0].tolist(), done


def sequential_blame(full, y, spending: str, margin=None, rounds: int = ROUNDS):
    """Each replication's verdicts at the look it stopped at (terms, reps), terms, its seeds."""
    levels = look_levels(rounds, 0.05, spending)
    reps = y.shape[1]
    running, seeds = np.ones(reps, bool), np.zeros(reps, int)
    final = None
    for r in range(rounds):
        rows = (full.seed < FIRST + r).to_numpy()
        columns = np.flatnonzero(running)
        table = full[rows].reset_index(drop=True)
        verdict, terms, done = look(table, y[rows][:, columns], levels[r], margin)
        final = np.full((len(terms), reps), "", object) if final is None else final
        stop = done | (r == rounds - 1)
        final[:, columns[stop]] = verdict[:, stop]
        seeds[columns[stop]] = FIRST + r
        running[columns[stop]] = False
        if not running.any():
            break
    return final, terms, seeds


def rates(scenario: Scenario, reps: int, rng, spendings=SPENDINGS) -> dict[str, Rates]:
    """Both rules on the same planted blames of one scenario."""
    full = runs_table(FIRST + ROUNDS - 1)
    y = planted(full, scenario.harm, reps, rng)
    found = {}
    for spending in spendings:
        verdict, terms, seeds = sequential_blame(full, y, spending, scenario.margin)
        null = [i for i, t in enumerate(terms) if t != "f0" or scenario.harm == 0]
        false = np.isin(verdict[null], SIGNIFICANT).any(axis=0).mean()
        power = (verdict[terms.index("f0")] == "hurt").mean() if scenario.harm else np.nan
        early = (seeds < FIRST + ROUNDS - 1).mean()
        found[spending] = Rates(float(false), float(power), float(seeds.mean()), float(early))
    return found


def table(reps: int, scenarios=SCENARIOS, seed: int = 23) -> pd.DataFrame:
    rows, rng = [], np.random.default_rng(seed)
    with one_thread():
        for scenario in scenarios:
            start = time.time()
            for spending, r in rates(scenario, reps, rng).items():
                rows.append(
                    (scenario.name, spending, reps, r.false, r.power, r.seeds, r.early,
                     time.time() - start)
                )  # fmt: skip
    columns = ["scenario", "looks", "blames", "false verdicts", "power", "mean seeds"]
    return pd.DataFrame(rows, columns=[*columns, "stopped early", "seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=4000)
    args = parser.parse_args()
    print(markdown(table(args.reps)))


if __name__ == "__main__":
    main()

"""`segexp blame` on heavy-tailed training noise: today's least squares vs the robust analysis.

The same planted tables go through both: least squares on every run (`estimate`, as before the
screen existed) and the screen plus least squares on the runs it keeps (`robust_estimate`, what
`analyze` runs). Noise is Student t with 3 dof scaled to SD (the SD of the healthy runs); a
"dead start" replaces a share of runs by 0 (an empty mask) or 0.3 (an all-foreground mask's
Dice), one scenario places one dead run in the A cell, and "near floor" is a recipe whose
ordinary runs score near the all-foreground Dice (0.33 +/- 0.03), so many count as dead. Per
design, seeds and scenario: the family-wise false-verdict rate under no effect, and the power
for one harm of 2 SD.

    python -m benchmarks.blame_noise --reps 1000          # the table of the closing note
    python -m benchmarks.blame_noise --designs "full k=3" --seeds 3
    python -m benchmarks.blame_noise --scenarios "near floor"   # Dice 0.33 +/- 0.03, normal
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd

from segexp.blame import make_design, model
from segexp.blame.ols import estimate
from segexp.blame.robust import robust_estimate

METRIC = "val/dice_best"
SD, HEALTHY, HARM = 0.02, 0.8, -2.0  # the harm in SDs
DEAD = (0.0, 0.3)  # Dice of an empty and of an all-foreground prediction


@dataclass(frozen=True)
class Scenario:
    name: str
    noise: str  # "normal" or "t3"
    dead: float = 0.0  # share of runs that are dead starts
    dead_a: bool = False  # A's first seed is a dead start
    level: float = HEALTHY  # the runs' mean Dice between the two levels of the harm
    sd: float = SD  # seed noise; the harm is HARM of these


SCENARIOS = [
    Scenario("normal", "normal"),
    Scenario("t3", "t3"),
    Scenario("t3 + 5% dead", "t3", 0.05),
    Scenario("t3 + 10% dead", "t3", 0.10),
    Scenario("t3 + dead A", "t3", 0.0, True),
    Scenario("t3 + 10% dead + dead A", "t3", 0.10, True),
    # a recipe near the all-foreground Dice: ordinary runs land within the floor's tolerance
    Scenario("near floor", "normal", level=0.33, sd=0.03),
]
DESIGNS = {
    "full k=3": ("full", 3),
    "full k=4": ("full", 4),
    "fraction k=6": ("fractional", 6),
    "full k=6": ("full", 6),
}


@dataclass
class Rates:
    """Shares of the replications; false: any hurt/helped verdict on a term planted at zero."""

    false_today: float
    false_new: float
    power_today: float
    power_new: float
    power_known: float  # least squares told which runs are dead: what the data allow
    left_out: float  # runs the screen leaves out per table, under no effect


def runs_table(cells, seeds: int) -> pd.DataFrame:
    factors = [f"f{i}" for i in range(len(cells[0]))]
    table = pd.DataFrame(np.repeat(np.array(cells), seeds, axis=0), columns=factors)
    table["seed"] = np.tile(np.arange(seeds), len(cells))
    table[METRIC] = 0.0
    return table


def planted(table: pd.DataFrame, harm: float, scenario: Scenario, reps: int, rng):
    """(runs, reps) metric values: the harm on f0, seed noise, dead starts; and where dead."""
    n = len(table)
    mean = scenario.level + harm * scenario.sd * (table.f0.to_numpy(float) - 0.5)
    if scenario.noise == "t3":
        noise = scenario.sd * rng.standard_t(3, (n, reps)) / np.sqrt(3)  # t3 has variance 3
    else:
        noise = rng.normal(0, scenario.sd, (n, reps))
    y = mean[:, None] + noise
    dead = rng.random((n, reps)) < scenario.dead
    y = np.where(dead, rng.choice(DEAD, (n, reps)), y)
    if scenario.dead_a:
        a = table.index[(table.filter(like="f") == 0).all(axis=1)][0]  # A at its first seed
        y[table.index.get_loc(a)], dead[table.index.get_loc(a)] = DEAD[0], True
    return y, dead


def verdicts(table: pd.DataFrame, y: np.ndarray, robust: bool) -> tuple[np.ndarray, list[str]]:
    factors = [c for c in table.columns if c.startswith("f")]
    fit = model(table, factors, METRIC)
    terms = fit.terms.term[fit.terms.column >= 0].tolist()
    if not robust:
        return estimate(fit, y, METRIC)["verdict"], terms
    out, _ = robust_estimate(fit, y, table[factors].to_numpy(int), METRIC, floors=DEAD)
    return out["verdict"], terms


def rates(cells, seeds: int, scenario: Scenario, reps: int, rng) -> Rates:
    """Today's and the robust analysis of the same planted tables."""
    table = runs_table(cells, seeds)
    (null, _), (harmed, dead) = (planted(table, h, scenario, reps, rng) for h in (0.0, HARM))
    found = {}
    for robust in (False, True):
        v, terms = verdicts(table, null, robust)
        false = np.isin(v, ["hurt", "helped"]).any(axis=0).mean()
        v, terms = verdicts(table, harmed, robust)
        power = (v[terms.index("f0")] == "hurt").mean()
        found[robust] = (false, power)
    factors = [c for c in table.columns if c.startswith("f")]
    fit = model(table, factors, METRIC)
    _, screen = robust_estimate(fit, null, table[factors].to_numpy(int), METRIC, floors=DEAD)
    left = (~screen.kept).sum(axis=0).mean()
    known = estimate(fit, harmed, METRIC, keep=~dead)["verdict"][terms.index("f0")] == "hurt"
    (false_today, power_today), (false_new, power_new) = found[False], found[True]
    return Rates(false_today, false_new, power_today, power_new, known.mean(), left)


def one_thread():
    """BLAS on one thread: many small matrix products run 4x faster than with two contending."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1)


def table(reps: int, designs: list[str], seeds: list[int], scenarios=SCENARIOS) -> pd.DataFrame:
    rows, rng = [], np.random.default_rng(22)
    with one_thread():
        for name in designs:
            kind, k = DESIGNS[name]
            cells = make_design(k, kind).cells
            for s in seeds:
                for scenario in scenarios:
                    start = time.time()
                    r = rates(cells, s, scenario, reps, rng)
                    rows.append(
                        (name, s, len(cells) * s, scenario.name, r.false_today, r.false_new,
                         r.power_today, r.power_new, r.power_known, r.left_out,
                         time.time() - start)
                    )  # fmt: skip
    columns = ["design", "seeds", "runs", "noise", "false today", "false new", "power today"]
    columns += ["power new", "power, dead known", "left out", "seconds"]
    return pd.DataFrame(rows, columns=columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--designs", nargs="*", default=list(DESIGNS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[2, 3])
    parser.add_argument("--scenarios", nargs="*", default=[s.name for s in SCENARIOS])
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if s.name in args.scenarios]
    found = table(args.reps, args.designs, args.seeds, chosen)
    print(markdown(found))


def markdown(found: pd.DataFrame) -> str:
    """The table as markdown, shares to 3 decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in found.values]
    lines = ["| " + " | ".join(found.columns) + " |", "|" + "---|" * len(found.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


if __name__ == "__main__":
    main()

"""Screen, then confirm (`segexp blame --fidelity screen`) on planted learning curves, no training.

A config's metric after e epochs on a share f of the training cases follows a learning curve,
    plateau - (plateau - START) * exp(-e * f / tau) + late * (1 - exp(-max(e * f - LATE_AT, 0)))
(progress is counted in epochs of the full data: a quarter of the cases is a quarter of the
steps), plus the run's noise: a share common to the configs of a seed, the run's own offset and
AR(1) noise over its epochs, all SCREEN_NOISE times larger at the screen, whose smaller images
(SCREEN_PIXELS of A's, as compute counts them) also lower every plateau by SCREEN_DROP. The reported value is the best so far
(`val/dice_best`). A factor's B level moves the plateau, multiplies tau (speed) or lowers the
curve (late < 0) only once LATE_AT epochs of full data are past. A run is its config and seed: a
10-epoch run's first 7 epochs are the 7-epoch run of the same seed (nested.py), and A and B are
the seed-0 runs of their configs. Each blame goes through the real screening.decide, then
analysis.analyze on the confirmation and screening.held_check (B against the all-B cell's run of
its seed, or A against the all-A cell's where the confirmation holds the others at B's levels
to reuse B's longer run), or the whole design where a check fails; the screen's epochs and the
confirmed factors are chosen as choose_fidelity and run_screen choose them, on every training
case (`--cases`: a share, for comparison).

Per scenario: the family-wise false-verdict rate of the final report (a term planted at zero
called hurt or helped), the power (every planted harm called hurt), how often each check failed,
caught or right (a check failed, or the harm called hurt), the compute spent against the full
factorial at full fidelity in image-epochs, and the same rates of `--fidelity full`.

    python -m benchmarks.sim_screen                    # the table, 500 blames a scenario
    python -m benchmarks.sim_screen --sims 200
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd

from segexp.blame import analysis, designs
from segexp.blame.nested import EPOCHS
from segexp.blame.screening import (
    MAX_CONFIRM_SEEDS,
    SCREEN_SEEDS,
    Fidelity,
    decide,
    held_check,
    seeds_needed,
)

from .blame_noise import markdown, one_thread

METRIC = "val/dice_best"
START, PLATEAU, TAU = 0.1, 0.8, 1.5  # the curve of A's config; tau in epochs of the full data
LATE_AT = 1.5  # a late factor takes off after this many epochs of the full data
SEED_SD, RUN_SD, EPOCH_SD, RHO = 0.006, 0.01, 0.01, 0.6  # noise at full fidelity
SCREEN_NOISE, SCREEN_DROP, SCREEN_SIZE, SCREEN_PIXELS = 1.5, 0.1, 128, 0.25  # 128 of 256 px
SEEDS = 3  # the user's seeds per cell at full fidelity
EPOCHS_ALONE = 10  # A's and B's epochs where the epochs are no factor
NULL_TOL = 1e-9  # a planted effect below this is zero


@dataclass(frozen=True)
class Factor:
    name: str
    plateau: float = 0.0  # B's level adds this to the plateau
    speed: float = 1.0  # B's level multiplies tau (above 1: learns slower)
    late: float = 0.0  # B's level lowers the curve by this, but only after LATE_AT


@dataclass(frozen=True)
class Scenario:
    name: str
    factors: tuple[Factor, ...]  # the factors a screen can vary
    epochs: tuple[int, int] | None = (7, 10)  # A's and B's epochs, a factor; None: no factor

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.factors] + ([EPOCHS] if self.epochs else [])

    @property
    def budgets(self) -> tuple[int, int]:
        return self.epochs or (EPOCHS_ALONE, EPOCHS_ALONE)

    @property
    def harms(self) -> list[str]:
        """The factors with a planted effect: each lowers the metric at full fidelity."""
        return [f.name for f in self.factors if (f.plateau, f.speed, f.late) != (0, 1, 0)]


def lgg(lr: Factor, batch: bool = True) -> tuple[Factor, ...]:
    """lgg_buda_1 -> lgg_buda_2 without the epochs: batch size, lr, weight decay."""
    return (*[Factor("dataset.batch_size")] * batch, lr, Factor("optimizer.weight_decay"))


def six(*harms: Factor) -> tuple[Factor, ...]:
    """Six changes, no epochs among them: the harms, then changes without effect."""
    return (*harms, *(Factor(f"change_{i}") for i in range(len(harms), 6)))


LR = "optimizer.lr"
HARM = Factor(LR, plateau=-0.04, speed=1.5)  # about 4 seed SDs at 7 epochs, seen from epoch 1
HARM_0 = dataclasses.replace(HARM, name="change_0")
SCENARIOS = [
    Scenario("null, k=4 with epochs", lgg(Factor(LR))),
    Scenario("null, k=6", six(), None),
    Scenario("harm early, k=3 with epochs", lgg(HARM, batch=False)),
    Scenario("harm early, k=4 with epochs", lgg(HARM)),
    Scenario("harm late, k=4 with epochs", lgg(Factor(LR, late=-0.06))),
    Scenario("helps early, hurts late, k=4", lgg(Factor(LR, plateau=-0.07, speed=0.4))),
    Scenario("one harm, k=6", six(HARM_0), None),
    Scenario("two harms, k=6", six(HARM_0, Factor("change_1", -0.03, 1.6)), None),
]


def mean_curves(factors, levels, progress, drop: float = 0.0) -> np.ndarray:
    """(configs, budgets) noiseless values after `progress` epochs of the full data."""
    lv = np.asarray(levels, float).reshape(len(levels), len(factors))
    plateau = PLATEAU - drop + lv @ np.array([f.plateau for f in factors])
    tau = TAU * np.exp(lv @ np.log([f.speed for f in factors]))
    late = lv @ np.array([f.late for f in factors])
    p = np.asarray(progress, float)[None, :]
    ramp = 1 - np.exp(-np.clip(p - LATE_AT, 0, None))
    rise = (plateau - START)[:, None] * np.exp(-p / tau[:, None])
    return plateau[:, None] - rise + late[:, None] * ramp


def seed_sd(scenario: Scenario) -> float:
    """The SD of one run's reported value at full fidelity: A's config at A's epochs."""
    mean = mean_curves(scenario.factors, [[0] * len(scenario.factors)], range(1, 11))
    found = runs(mean, 4000, 1, 1.0, np.random.default_rng(0))
    return float(found[:, 0, 0, scenario.budgets[0] - 1].std())


def runs(mean: np.ndarray, sims: int, seeds: int, scale: float, rng) -> np.ndarray:
    """(sims, configs, seeds, epochs) best-so-far values of runs around the mean curves."""
    shape = (sims, mean.shape[0], seeds)
    offset = rng.normal(0, SEED_SD, (sims, 1, seeds, 1)) + rng.normal(0, RUN_SD, (*shape, 1))
    steps = rng.normal(0, EPOCH_SD, (*shape, mean.shape[1]))
    for e in range(1, mean.shape[1]):  # a run's epochs share its noise
        steps[..., e] = RHO * steps[..., e - 1] + np.sqrt(1 - RHO**2) * steps[..., e]
    return np.maximum.accumulate(mean[None, :, None] + scale * (offset + steps), axis=-1)


def epoch_cap(a_epochs: int) -> int:
    """As screening.choose_fidelity: a screen trains at most 3/4 of A's epochs."""
    return max(1, round(0.75 * a_epochs))


def screen_epochs(gaps: list[float], final: float | None, a_epochs: int) -> int:
    """As screening.choose_fidelity: the fewest epochs, up to the cap, showing half the gap."""
    cap = epoch_cap(a_epochs)
    if gaps and final:
        shown = [e for e, g in enumerate(gaps[:cap], 1) if g / final >= 0.5]
        return shown[0] if shown else cap
    return cap


def confirmed(names: list[str], screened: list[str], suspects: list[str] | None) -> list[int]:
    """As command.run_screen: the suspects and the factors the screen cannot vary (None: all)."""
    if suspects is None:
        return list(range(len(names)))
    return [i for i, n in enumerate(names) if n in suspects or n not in screened]


def table_of(names: list[str], cells, seeds: int, values) -> pd.DataFrame:
    """A runs.csv: a 0/1 column per factor, `seed`, the metric (`values(cell, seed)`)."""
    rows = [(*c, s, values(c, s)) for c in cells for s in range(seeds)]
    return pd.DataFrame(rows, columns=[*names, "seed", METRIC])


def nested_ids(found: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """As factors.table: a run id per long-budget row, `read_from` it for its short twin."""
    others = [n for n in names if n != EPOCHS]
    key = found[[*others, "seed"]].astype(str).agg("-".join, axis=1)
    long = (found[EPOCHS] == 1).to_numpy()  # B's epochs, the larger budget
    return found.assign(run_id=key.where(long), read_from=key.where(~long))


@cache
def truth(scenario: Scenario, keep: tuple[int, ...], held: int = 0) -> dict[str, float]:
    """The planted main and two-way effects over the factors `keep`, the others at `held`."""
    names, k, m = scenario.names, len(keep), len(scenario.factors)
    cells = np.array(list(itertools.product((0, 1), repeat=k)))
    full = np.full((len(cells), len(names)), held, int)
    full[:, list(keep)] = cells
    budgets = [scenario.budgets[row[m]] if scenario.epochs else EPOCHS_ALONE for row in full]
    y = [
        mean_curves(scenario.factors, [row[:m]], [e])[0, 0]
        for row, e in zip(full, budgets, strict=True)
    ]
    z = cells - 0.5
    words = [w for r in range(k + 1) for w in itertools.combinations(range(k), r)]
    x = np.column_stack([np.prod(z[:, list(w)], axis=1) for w in words])
    beta = dict(zip(words, np.linalg.lstsq(x, np.array(y), rcond=None)[0], strict=True))
    found = {names[keep[i]]: beta[(i,)] for i in range(k)}
    for i, j in itertools.combinations(range(k), 2):
        found[f"{names[keep[i]]} x {names[keep[j]]}"] = beta[(i, j)]
    return found


class Blame:
    """One simulated blame: its full-fidelity runs (configs, seeds, epochs) and where each is."""

    def __init__(self, scenario: Scenario, full: np.ndarray, index: dict):
        self.scenario, self.full, self.index = scenario, full, index
        self.names, self.m = scenario.names, len(scenario.factors)
        self.held = 0  # the level of the factors a design leaves out

    def levels(self, keep: list[int], cell) -> np.ndarray:
        full = np.full(len(self.names), self.held, int)
        full[keep] = cell
        return full

    def hold(self, keep: list[int]) -> int:
        """As screening.confirmation: B's levels where the design nests B's longer budget."""
        ea, eb = self.scenario.budgets
        self.held = int(len(keep) < len(self.names) and self.nests(keep) and eb > ea)
        return self.held

    def value(self, keep: list[int], cell, seed: int) -> float:
        """A cell's run at its budget: a 7-epoch cell is the 10-epoch run's history (nested)."""
        lv = self.levels(keep, cell)
        budget = self.scenario.budgets[lv[self.m]] if self.scenario.epochs else EPOCHS_ALONE
        return self.full[self.index[tuple(lv[: self.m])], seed, budget - 1]

    def nests(self, keep: list[int]) -> bool:
        return bool(self.scenario.epochs) and self.m in keep

    def seeds(self, keep: list[int]) -> int:
        """As screening.confirmation: the user's seeds, more where the design is small."""
        cells = designs.make_design(len(keep), "auto").cells
        return seeds_needed(cells, [self.names[i] for i in keep], SEEDS, self.nests(keep))

    def analyse(self, keep: list[int], seeds: int = SEEDS):
        """(the design's cells, its runs.csv, `analyze` of it) over the factors `keep`."""
        cells = designs.make_design(len(keep), "auto").cells
        names = [self.names[i] for i in keep]
        found = table_of(names, cells, seeds, lambda c, s: self.value(keep, c, s))
        if self.nests(keep):
            found = nested_ids(found, names)
        return cells, found, analysis.analyze(found, names, METRIC)

    def trainings(self, keep: list[int], cells, seeds: int = SEEDS) -> set:
        """The runs a design trains: (levels, seed), short budgets read from long runs."""
        planned, out = set(cells), set()
        for cell in planned:
            lv = self.levels(keep, cell)
            if self.scenario.epochs and self.m in keep:
                long = list(cell)
                long[keep.index(self.m)] = 1
                if tuple(long) in planned:
                    lv = self.levels(keep, long)
            for seed in range(seeds):
                if seed or 0 < lv.sum() < len(lv):  # A and B are reused at their seed
                    out.add((tuple(lv), seed))
        return out

    def cost(self, trained: set) -> float:
        per = self.scenario.budgets
        return sum(per[lv[self.m]] if self.scenario.epochs else per[0] for lv, _ in trained)


def yardstick(scenario: Scenario) -> float:
    """The full 2^k factorial at the user's seeds at full fidelity, in A's training images."""
    k, per = len(scenario.names), scenario.budgets
    return SEEDS * 2 ** (k - 1) * (per[0] + per[1]) if scenario.epochs else SEEDS * 2**k * per[0]


def screened_decision(scenario: Scenario, a, b, screened, cases: float):
    """(screening.decide on the screen's runs, their count, its epochs) from A's and B's curves."""
    (ea, eb), m = scenario.budgets, len(scenario.factors)
    n = max(ea, eb)  # as fidelity.ab_gap: a run that stopped reports its last value after it
    pad = [np.concatenate([r[:e], np.repeat(r[e - 1], n - e)]) for r, e in ((a, ea), (b, eb))]
    epochs = screen_epochs(list(pad[1] - pad[0]), b[eb - 1] - a[ea - 1], ea)
    short = min(ea, eb)  # screening.full_gap: with an epochs factor, both at the smaller budget
    cells = designs.make_design(m, "auto").cells
    at = {c: screened[i, :, epochs - 1] for i, c in enumerate(cells)}
    sub = table_of(scenario.names[:m], cells, SCREEN_SEEDS, lambda c, s: at[c][s])
    detail = Fidelity(epochs, cases, SCREEN_SIZE).text()
    gap = float(b[short - 1] - a[short - 1])
    return decide(sub, scenario.names[:m], METRIC, gap, detail), len(sub), epochs


def one_blame(scenario: Scenario, full, screened, index: dict, cases=1.0, reference=True):
    """Screen, check, confirm the suspects, check B, else the whole design; and `--fidelity full`."""
    run, names, m = Blame(scenario, full, index), scenario.names, len(scenario.factors)
    a, b = full[index[(0,) * m], 0], full[index[(1,) * m], 0]
    decision, screen_runs, epochs = screened_decision(scenario, a, b, screened, cases)
    keep = confirmed(names, names[:m], decision.suspects)
    held = run.hold(keep)
    seeds = run.seeds(keep) if decision.suspects is not None else SEEDS
    final_cells, final, result = run.analyse(keep, seeds)
    trained, everything = run.trainings(keep, final_cells, seeds), list(range(len(names)))
    value, kept = (b, a)[held][scenario.budgets[1 - held] - 1], [names[i] for i in keep]
    check = decision.suspects is None or held_check(final, result, kept, value, 0, 1 - held).ok
    if not check:  # as command.blame: the whole design, the confirmation's runs reused
        run.held = 0
        final_cells, final, result = run.analyse(everything)
        trained |= run.trainings(everything, final_cells)
    row = verdict_row(scenario, keep if check else everything, result, "", run.held)
    if reference:
        row |= verdict_row(scenario, everything, run.analyse(everything)[2], " full")
    spent = screen_runs * cases * SCREEN_PIXELS * epochs + run.cost(trained)
    return {
        **row, "screen failed": decision.suspects is None, "B failed": not check,
        "ratio": spent / yardstick(scenario), "epochs": epochs, "confirmed": len(keep),
    }  # fmt: skip


def verdict_row(scenario: Scenario, keep: list[int], result, tag: str, held: int = 0) -> dict:
    """Whether a term planted at zero got hurt/helped, and whether every harm got hurt."""
    verdicts = result.effects.set_index("term").verdict
    planted = truth(scenario, tuple(keep), held)
    null = [t for t in verdicts.index if abs(planted[t]) < NULL_TOL]
    harms = [verdicts.get(h) == "hurt" for h in scenario.harms]
    return {
        "false" + tag: bool(verdicts[null].isin(analysis.SIGNIFICANT).any()),
        "power" + tag: all(harms) if harms else np.nan,
    }


def simulate(scenario: Scenario, sims: int, rng, cases=1.0, reference=True) -> pd.DataFrame:
    """One row per simulated blame of the scenario."""
    m, (ea, eb) = len(scenario.factors), scenario.budgets
    configs = list(itertools.product((0, 1), repeat=m))
    mean = mean_curves(scenario.factors, configs, range(1, max(ea, eb) + 1))
    full = runs(mean, sims, MAX_CONFIRM_SEEDS, 1.0, rng)  # the confirmation may add seeds
    cells = designs.make_design(m, "auto").cells
    progress = cases * np.arange(1, epoch_cap(ea) + 1)  # a share of the cases: fewer steps
    mean = mean_curves(scenario.factors, cells, progress, SCREEN_DROP)
    screened = runs(mean, sims, SCREEN_SEEDS, SCREEN_NOISE, rng)
    index = {c: i for i, c in enumerate(configs)}
    blames = (
        one_blame(scenario, full[i], screened[i], index, cases, reference) for i in range(sims)
    )
    return pd.DataFrame(list(blames))


def summary(scenario: Scenario, found: pd.DataFrame, seconds: float) -> dict:
    """The scenario's row of the table (NaN: no harm planted, or no `--fidelity full` run)."""
    harm = [truth(scenario, tuple(range(len(scenario.names))))[h] for h in scenario.harms]
    right = found["screen failed"] | found["B failed"] | (found.power == True)  # noqa: E712
    nan = pd.Series([math.nan])
    return {
        "scenario": scenario.name,
        "harm (SD)": ", ".join(f"{h / seed_sd(scenario):+.1f}" for h in harm) or "-",
        "FWER": found["false"].mean(),
        "power": found.power.mean() if harm else math.nan,
        "screen check failed": found["screen failed"].mean(),
        "B check failed": found["B failed"].mean(),
        "caught or right": right.mean() if harm else math.nan,
        "compute": found.ratio.mean(),
        "confirmed": found.confirmed.mean(),
        "screen epochs": found.epochs.mean(),
        "FWER full": found.get("false full", nan).mean(),
        "power full": found.get("power full", nan).mean(),
        "sims": len(found),
        "seconds": round(seconds),
    }


def table(sims: int, scenarios=SCENARIOS, seed: int = 23, **options) -> pd.DataFrame:
    """The figures of each scenario; `options`: simulate's `cases` and `reference`."""
    rows, rng = [], np.random.default_rng(seed)
    with one_thread():
        for scenario in scenarios:
            start = time.time()
            found = simulate(scenario, sims, rng, **options)
            rows.append(summary(scenario, found, time.time() - start))
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sims", type=int, default=500)
    parser.add_argument("--cases", type=float, default=1.0, help="the screen's share of the cases")
    args = parser.parse_args()
    print(markdown(table(args.sims, cases=args.cases)))


if __name__ == "__main__":
    main()

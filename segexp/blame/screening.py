"""Screen, then confirm: the design at low fidelity, then only its suspects at full fidelity.

The screen trains the design's cells (A and B among them) with fewer epochs, a fixed share of
the training cases and smaller images. It is trusted only where its A-vs-B gap shows the sign of
the gap A and B have at full fidelity, beyond the screen's noise; otherwise the blame says so and
trains at full fidelity. The factors whose screened effect is significant, or large against the
screen's gap, are retrained at full fidelity in a small design of just those factors, the others
held at A's levels (so A is reused), or at B's where B's longer epoch budget makes B the run to
reuse. Only that confirmation gives verdicts: its runs are new, so the screen's selection does
not bias them. Then the run not reused (B, or A) is held against the confirmation's cell with
every confirmed factor at its levels: they differ only in what the screen ruled out, so a
difference beyond noise means the screen missed something, and the whole design trains at full
fidelity. Factors a screen changes itself (epochs, image size, the share of cases) cannot be
screened: they go to the confirmation, where an epochs factor costs nothing extra (nested.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from scipy import stats

from segexp.tracking.tags import FIDELITY, FIDELITY_DETAIL

from . import analysis, designs
from .analysis import Analysis
from .factors import Cell, Cells, Change
from .nested import EPOCHS, value_at_budget
from .ols import model
from .plan import FULL, Plan, plan_nesting

FRACTION = "dataset.train_fraction"
SIZE = "dataset.image_size"
SCREEN_SEEDS = 2  # replicates per screened cell: the screen's own noise estimate needs two
SHARE = 0.25  # a screened effect this large against the screen's A-vs-B gap stays a suspect
AUTO_TRAININGS = 4  # `--fidelity auto` screens where the full design costs more than 4 A's
CONFIRM_DOF = 3  # a confirmation adds seeds, up to MAX_CONFIRM_SEEDS, for this many dof
MAX_CONFIRM_SEEDS = 6


@dataclass(frozen=True)
class Fidelity:
    """A screen's fidelity: epochs, share of the training cases, image size (None: A's)."""

    epochs: int
    fraction: float = 1.0
    image_size: int | None = None

    def overrides(self, dotlist: bool = False) -> list[str]:
        """Hydra overrides (`++` adds the key A may lack); `dotlist`: OmegaConf's plain form."""
        size = [f"{SIZE}={self.image_size}"] if self.image_size else []
        add = "" if dotlist else "++"
        return [f"{EPOCHS}={self.epochs}", f"{add}{FRACTION}={self.fraction}", *size]

    def text(self) -> str:
        share = Fraction(self.fraction).limit_denominator(100)
        cases = "all" if share == 1 else f"{share.numerator}/{share.denominator}"
        size = f", {self.image_size} px" if self.image_size else ""
        return f"{self.epochs} epochs, {cases} of the cases{size}"


@dataclass
class Check:
    """A comparison that says whether the screen can be trusted (`ok`), in one line."""

    full_gap: float
    screen_gap: float
    noise: float  # 95% CI half-width of what is compared
    ok: bool
    line: str


@dataclass
class ScreenResult:
    """What the screen trained and found, and the confirmation it plans (None: full fidelity)."""

    plan: Plan
    trained: list[Cell]
    table: pd.DataFrame  # the screen's runs.csv
    analysis: Analysis | None = None
    check: Check | None = None
    confirm: Plan | None = None
    lines: list[str] = field(default_factory=list)  # check, what it ruled out, what is confirmed


def screen_seeds(plan: Plan) -> list[int]:
    return list(range(plan.seeds[0], plan.seeds[0] + SCREEN_SEEDS))


def sub_change(change: Change, keep: list[int], level: int = 0) -> Change:
    """The factors at `keep`; every other factor fixed at `level` (0: A's, 1: B's)."""
    held = [f for i, f in enumerate(change.factors) if i not in keep]
    base = [*change.base, *(o for f in held for o in f.overrides(level))]
    return Change([change.factors[i] for i in keep], base, change.stored)


def sub_plan(
    plan: Plan, keep: list[int], seeds: list[int], kind: str, fidelity=None, level: int = 0
) -> Plan:
    """A plan over some of the factors (the others at `level`: A's, or B's), at full fidelity
    or a screen's."""
    change = sub_change(plan.change, keep, level)
    lowered = fidelity.overrides(dotlist=change.stored is not None) if fidelity else []
    extra = [*plan.cells.extra, *lowered]
    tags = {FIDELITY: "screen", FIDELITY_DETAIL: fidelity.text()} if fidelity else FULL
    prefix = "screen " if fidelity else ""
    cells = Cells(change, extra, prefix, tags, plan.cells.replicate)
    sub = dataclasses.replace(
        plan, change=change, design=designs.make_design(len(keep), kind), cells=cells,
        seeds=list(seeds), nesting=None, lines=[], held=level,
    )  # fmt: skip
    if fidelity:  # a screen trains its cells once, whatever the confirmation's budget
        sub.rounds, sub.auto, sub.budget = 1, False, None
        # a smaller image costs its share of A's pixels: compute counts A-sized image-epochs
        share = fidelity.fraction * pixel_share(plan, fidelity.image_size)
        sub.train_images = max(1, round(plan.train_images * share))
    sub.add_cells(sub.design.cells)
    if not fidelity and plan.nest_epochs:
        sub.nesting, why = plan_nesting(sub)
        sub.lines += [why] if why else []
    return sub


def seeds_needed(cells, names: list[str], seeds: int, nested: bool) -> int:
    """Seeds per cell (at least `seeds`) for CONFIRM_DOF residual dof between runs, at most
    MAX_CONFIRM_SEEDS. With `nested` epochs a run holds both budgets: runs are the cells
    without the epochs factor. Decided from the design alone, never from metric values."""
    keep = [i for i, n in enumerate(names) if not (nested and n == EPOCHS)]
    whole = sorted({tuple(c[i] for i in keep) for c in cells})
    factors = [names[i] for i in keep]
    for count in range(seeds, MAX_CONFIRM_SEEDS + 1):
        rows = [(*c, s, 0.0) for c in whole for s in range(count)]
        table = pd.DataFrame(rows, columns=[*factors, "seed", "y"])
        if model(table, factors, "y").dof >= CONFIRM_DOF:
            return count
    return max(seeds, MAX_CONFIRM_SEEDS)


def confirmation(plan: Plan, keep: list[int], b_seed: int | None = None) -> Plan:
    """The confirmation's plan over the factors `keep`, with the seeds its analysis needs.

    The others are held at A's levels, so A is one of its runs; or at B's where the
    confirmation reads an epochs factor from histories and B trained the longer budget at one
    of its seeds, and the epochs stay nested at B's levels: then B, its all-B cell, is a run it
    reuses whole, while A's shorter run would only repeat the first epochs of a run it trains.
    """
    sub = sub_plan(plan, keep, plan.seeds, "auto")
    nest = sub.nesting
    if nest is not None and nest.short_level == 0 and b_seed in sub.seeds:
        at_b = sub_plan(plan, keep, plan.seeds, "auto", level=1)
        # B's levels of the others may anneal over max_epochs: then both budgets would train
        sub = at_b if at_b.nesting is not None else sub
    count = seeds_needed(sub.design.cells, sub.names, len(sub.seeds), sub.nesting is not None)
    if count > len(sub.seeds):
        more = [sub.seeds[-1] + 1 + i for i in range(count - len(sub.seeds))]
        sub.seeds = [*sub.seeds, *more]
        sub.add_cells(sub.design.cells)
        sub.lines.append(
            f"{count} seeds a cell (not {len(plan.seeds)}): with fewer, the noise between "
            f"runs would rest on under {CONFIRM_DOF} residual dof"
        )
    return sub


def pixel_share(plan: Plan, size: int | None) -> float:
    """A `size` px square's pixels against A's input (1 for None: A's size)."""
    if not size:
        return 1.0
    shape = plan.a_config.dataset.image_size
    h, w = (shape, shape) if isinstance(shape, int) else shape
    return size * size / (h * w)


def screenable(plan: Plan) -> list[int]:
    """Indices of the factors a screen can vary: not those its own fidelity sets."""
    fixed = (EPOCHS, FRACTION, SIZE)
    return [i for i, name in enumerate(plan.names) if name not in fixed]


def worth_screening(plan: Plan, full_cost: int) -> bool:
    """`auto`: the full design at full fidelity costs more than AUTO_TRAININGS trainings of A."""
    return full_cost > AUTO_TRAININGS * plan.train_images * int(plan.a_config.trainer.max_epochs)


def choose_fidelity(plan: Plan, gaps: list[float] | None, final_gap: float | None, **given):
    """The screen's fidelity: what was given, else defaults read from A's config and curves.

    Epochs: the fewest (at most 3/4 of A's) after which A's and B's own curves show at least
    half the final gap with its sign; image size: half of A's (a quarter of the pixels), not
    below 32 px; every training case, since fewer cases are fewer steps per epoch.
    """
    cfg = plan.a_config
    a_epochs = int(cfg.trainer.max_epochs)
    cap = max(1, round(0.75 * a_epochs))
    epochs = given.get("epochs")
    if epochs is None:
        epochs = cap
        if gaps and final_gap:
            shown = [e for e, g in enumerate(gaps[:cap], 1) if g / final_gap >= 0.5]
            epochs = shown[0] if shown else cap
    size = given.get("image_size")
    if size is None and SIZE not in plan.names:
        shape = cfg.dataset.image_size
        side = int(shape) if isinstance(shape, int) else int(min(shape))
        size = max(32, side // 2 // 16 * 16)
        size = size if size < side else None
    return Fidelity(int(epochs), float(given.get("fraction") or 1.0), size)


def full_gap(client: MlflowClient, plan: Plan) -> float | None:
    """B - A at full fidelity; with a nested epochs factor, both at the smaller budget."""
    if plan.nesting is not None:
        values = [value_at_budget(client, r, plan.nesting) for r in (plan.run_a, plan.run_b)]
    else:
        values = [client.get_run(r).data.metrics.get(plan.metric) for r in (plan.run_a, plan.run_b)]
    return None if None in values else values[1] - values[0]


def cell_values(table: pd.DataFrame, names: list[str], metric: str, level: int) -> pd.Series:
    """The metric of the runs with every factor at `level` (0: A's cell, 1: B's)."""
    return table.loc[(table[names] == level).all(axis=1), metric].dropna()


def check(table: pd.DataFrame, result: Analysis, names: list[str], gap: float | None) -> Check:
    """Whether the screen shows the full-fidelity A-vs-B gap: its sign, beyond the screen's noise.

    A shorter, smaller training sees smaller gaps, so the size is not asked to match; effects
    are weighed against the screen's own gap. What a screen misses, the confirmation's B check
    (`held_check`) still sees.
    """
    metric = result.metric
    a, b = (cell_values(table, names, metric, level) for level in (0, 1))
    sd, dof = result.seed_sd, result.dof
    if gap is None or a.empty or b.empty or not math.isfinite(sd) or dof <= 0:
        why = "A's or B's value is missing" if gap is None or a.empty or b.empty else "no noise"
        return Check(gap or math.nan, math.nan, math.nan, False, f"screen check impossible: {why}")
    values = table[metric].dropna()
    if values.nunique() == 1:
        return Check(gap, 0.0, 0.0, False, (
            f"screen check: every screened run scored {values.iloc[0]:.4f}: at this fidelity "
            f"nothing tells the configs apart, against a full-fidelity gap of {gap:+.4f}"
        ))  # fmt: skip
    screened = float(b.mean() - a.mean())
    t = float(stats.t.ppf(0.975, dof))
    noise = t * sd * math.sqrt(1 / len(a) + 1 / len(b))
    clear = abs(gap) > t * sd * math.sqrt(2)  # A and B: one run each, about the screen's noise
    shown = screened * gap > 0 and abs(screened) > noise
    ok = shown or not clear
    verdict = (
        f"shows it ({screened / gap:.0%} of its size)" if shown
        else "A and B differ within noise: nothing to reproduce" if not clear
        else "wrong sign" if screened * gap < 0 and abs(screened) > noise
        else "does not show it (within the screen's noise)"
    )  # fmt: skip
    line = (
        f"screen check: A-vs-B gap {screened:+.4f} +- {noise:.4f} at the screen against "
        f"{gap:+.4f} at full fidelity: {verdict}"
    )
    return Check(gap, screened, noise, ok, line)


def held_check(
    table: pd.DataFrame, result: Analysis, names: list[str], value, seed=None, level: int = 1
) -> Check:
    """A run against the confirmation's cell with every confirmed factor at that run's level.

    `level` 1: B (the others held at A's levels), 0: A (held at B's). The two differ only in the
    screened-out factors, so this is those factors' joint effect at full fidelity: beyond noise,
    the screen ruled out something that matters. The cell's run of the run's seed is the fairer
    twin (same initialisation and split): used where there is one.
    """
    run = "AB"[level]
    at = table.loc[(table[names] == level).all(axis=1)]
    same = at.loc[at.seed == seed, result.metric].dropna() if "seed" in at else []
    cell = same if len(same) else at[result.metric].dropna()
    sd, dof = result.seed_sd, result.dof
    if value is None or cell.empty or not math.isfinite(sd) or dof <= 0:
        return Check(
            math.nan, math.nan, math.nan, True, f"{run} check impossible: no noise estimate"
        )
    joint = float(value - cell.mean()) * (1 if level else -1)  # B's levels minus A's
    spread = math.sqrt(2) if len(same) else math.sqrt(1 + 1 / len(cell))
    noise = float(stats.t.ppf(0.975, dof)) * sd * spread
    ok = abs(joint) <= noise
    twin = f"its seed-{seed} run" if len(same) else f"its {len(cell)} runs"
    line = (
        f"{run} check: the screened-out changes together moved {result.metric} by {joint:+.4f} "
        f"(+- {noise:.4f}) at full fidelity ({run} against the confirmation's all-{run} cell, "
        f"{twin}): " + ("within noise" if ok else "the screen missed it")
    )
    return Check(joint, joint, noise, ok, line)


def factors_of(term: str) -> list[str]:
    return term.split(" x ")


def suspects(result: Analysis, gap: float, detail: str) -> tuple[list[str], list[str]]:
    """(factors to confirm, one line per factor ruled out with its screened effect).

    A factor stays a suspect when a term it is in is significant at the screen, or not
    estimable, or at least SHARE of the gap (the gap no smaller than what noise alone makes of
    A against B); with none, the largest main effect is confirmed. An interaction counts at
    half its size: that is what it moves a factor's effect at A's levels of the others by.
    """
    noise = result.seed_sd * math.sqrt(2) * float(stats.t.ppf(0.975, max(result.dof, 1)))
    threshold = SHARE * max(abs(gap), noise if math.isfinite(noise) else 0.0)
    keep = set()
    for row in result.effects.itertuples():
        unknown = not math.isfinite(row.effect)
        if row.kind == "interaction" and (unknown or row.verdict == "aliased"):
            continue  # an unfitted interaction: its factors' main effects still speak
        size = abs(row.effect) / (2 if row.kind == "interaction" else 1)
        if row.verdict in analysis.SIGNIFICANT or unknown or size >= threshold:
            keep.update(factors_of(row.term))
    mains = result.effects[result.effects.kind == "main"].set_index("term")
    if not keep:
        keep.add(mains.effect.abs().idxmax())
    ruled = [
        f"{name} screened out: effect {mains.effect[name]:+.4f} +- "
        f"{(mains.ci_high[name] - mains.ci_low[name]) / 2:.4f} at {detail} "
        f"(below {SHARE:g} of the gap or its noise, {threshold:.4f})"
        for name in result.factors
        if name not in keep
    ]
    return [n for n in result.factors if n in keep], ruled


@dataclass
class Decision:
    """What a screen's table says: its analysis, the check, the suspects (None: not trusted)."""

    analysis: Analysis | None
    check: Check | None
    suspects: list[str] | None
    lines: list[str]


def decide(table: pd.DataFrame, names: list[str], metric: str, gap, detail: str) -> Decision:
    """Analyse a screen's runs, check them against the full-fidelity gap, pick the suspects."""
    try:
        result = analysis.analyze(table, names, metric)
    except (ValueError, np.linalg.LinAlgError) as err:
        return Decision(None, None, None, [f"screen analysis impossible: {err}"])
    found = check(table, result, names, gap)
    if not found.ok:
        return Decision(result, found, None, [found.line])
    keep, ruled = suspects(result, found.screen_gap, detail)
    return Decision(result, found, keep, [found.line, *ruled])

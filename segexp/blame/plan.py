"""What a blame will train: the factors between A and B, the design, every (cell, seed)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient

from segexp import tracking
from segexp.config import ConfigError

from . import designs, factors
from .factors import Cell
from .nested import EPOCHS, Nesting, nesting
from .replicates import replicate_of

FULL = {tracking.tags.FIDELITY: "full"}  # the tags of a full-fidelity cell
LAUNCHER_KEYS = ("hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper")


@dataclass
class Plan:
    """The blame's cells and how they train; `lines` is what `--dry-run` prints."""

    run_a: str
    run_b: str
    change: factors.Change
    design: designs.Design
    cells: factors.Cells
    metric: str
    experiment: str
    work_dir: Path
    launcher: list[str]  # Hydra launcher overrides, for the cells' multirun
    seeds: list[int]  # the first round's seeds of every cell
    rounds: int  # seed rounds at most (`--seeds auto`), else 1
    auto: bool
    budget: int | None
    nesting: Nesting | None = None  # the epochs factor's smaller budget read from histories
    train_images: int = 0  # A's training set, for the compute figures
    run_names: tuple[str, str] = ("", "")  # A's and B's, for titles
    fingerprint: str | None = None  # A's data: cells train on it, and reuse only runs on it
    held: int = 0  # the level (0: A's, 1: B's) of the factors a confirmation leaves out
    nest_epochs: bool = True  # False (`--train-every-budget`): no plan derived from it nests
    lines: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.change.factors]

    @property
    def a_config(self):
        """A's cell composed (at the first seed): A's epochs, image size, ..."""
        return self.cells.rows[((0,) * len(self.names), self.seeds[0])].cfg

    @property
    def adaptive(self) -> bool:
        """The ablation path: cells are added as the path is walked."""
        return self.design.kind == "path"

    def add_seed(self, seed: int) -> None:
        """One more replicate of every cell planned so far."""
        for levels in {cell.levels for cell in self.cells.rows.values()}:
            self.cells.add(levels, seed)

    def add_cells(self, cells: list[tuple[int, ...]]) -> None:
        for levels in cells:
            for seed in self.seeds:
                self.cells.add(levels, seed)

    def long_twin(self, cell: Cell) -> Cell | None:
        """The planned cell to more epochs whose history holds `cell`'s value, if any."""
        nest = self.nesting
        if nest is None or cell.levels[nest.factor] != nest.short_level:
            return None
        levels = tuple(1 - v if i == nest.factor else v for i, v in enumerate(cell.levels))
        return self.cells.rows.get((levels, cell.seed))

    def planned(self) -> list[Cell]:
        """The cells that train (or are reused): all but those read from a longer run."""
        return [cell for cell in self.cells.rows.values() if self.long_twin(cell) is None]

    def nested(self, cells: list[Cell]) -> list[Cell]:
        """Of `cells` to train, those no longer run of the plan holds; the others get a source."""
        todo = []
        for cell in cells:
            cell.source = self.long_twin(cell)
            todo += [] if cell.source else [cell]
        return todo


def make_plan(
    client: MlflowClient,
    run_a: str,
    run_b: str,
    metric: str | None,
    seeds: int | str,
    design: str,
    overrides: list[str],
    budget: int | None,
    work_dir: Path | None,
    nest_epochs: bool = True,
    replicate: str = "seed",
) -> Plan:
    """The factors from the two runs' stored configs, the design and its cells (nothing trains).

    `replicate`: what the analysis treats as replicates (replicates.py: seed, fold, fold,seed).
    """
    launcher = [o for o in overrides if o.startswith(LAUNCHER_KEYS)]
    extra = [o for o in overrides if o not in launcher]
    runs = {r: client.get_run(r) for r in (run_a, run_b)}
    config_a = tracking.stored_config(client, run_a)
    config_b = tracking.stored_config(client, run_b)
    change = factors.between(runs[run_a], runs[run_b], config_a, config_b)
    data = [runs[r].data.tags.get(tracking.tags.FINGERPRINT) for r in (run_a, run_b)]
    if not change.factors:
        if data[0] != data[1]:
            raise ConfigError(
                f"runs {run_a} and {run_b} trained the same config on different data "
                f"(dataset fingerprints {data[0]} and {data[1]}): blame varies configs, not data"
            )
        raise ConfigError(f"runs {run_a} and {run_b} trained the same config: nothing to blame")
    chosen = designs.make_design(len(change.factors), design)
    auto = seeds == "auto"
    first_seed, per_cell = int(config_a["seed"]), 2 if auto else int(seeds)
    scheme = replicate_of(replicate, config_a, [f.name for f in change.factors], auto)
    rounds = 1
    if auto:
        rounds = designs.seed_rounds(budget, len(chosen.cells)) if budget else 4
    work_dir = cells_work_dir(client, config_a, work_dir)
    extra = [f"work_dir={work_dir}", *extra]
    if client.tracking_uri != tracking.store_locations({}, work_dir)[0]:
        extra.insert(1, f"tracking.uri='{client.tracking_uri}'")
    plan = Plan(
        run_a, run_b, change, chosen, factors.Cells(change, extra, tags=FULL, replicate=scheme),
        metric or config_a["optimized_metric"], config_a["tracking"]["experiment"], work_dir,
        launcher, scheme.first(first_seed, per_cell), rounds, auto, budget,
        nest_epochs=nest_epochs,
    )  # fmt: skip
    plan.add_cells(chosen.cells)
    why = None
    if nest_epochs:
        plan.nesting, why = plan_nesting(plan)
    plan.train_images = int(runs[run_a].data.tags.get("dataset.train_images", 0))
    plan.run_names = (runs[run_a].info.run_name, runs[run_b].info.run_name)
    plan.fingerprint = data[0]
    plan.lines = describe(plan) + ([why] if why else []) + data_lines(plan, data, config_a)
    return plan


def data_lines(plan: Plan, data: list[str | None], config_a) -> list[str]:
    """What `--dry-run` says of A's and B's data and of the compute planned."""
    lines = []
    if data[0] != data[1]:
        lines.append(
            f"A and B saw different data (dataset fingerprints {data[0]} and {data[1]}): every "
            f"cell trains on A's ({config_a['dataset'].get('root')}), so the data is no factor"
        )
    if plan.train_images:
        lines.append(compute_line(plan, cost(plan, plan.planned()), "planned at most"))
    return lines


def plan_nesting(plan: Plan) -> tuple[Nesting | None, str | None]:
    """Whether the plan's epochs factor is read from histories (see nested.py), and why not."""
    change = plan.change
    extra = [*plan.cells.extra, *plan.cells.replicate.overrides(plan.seeds[0])]
    return nesting(change, plan.metric, lambda levels: change.cell_config(levels, extra))


def cells_work_dir(client: MlflowClient, config_a: dict, work_dir: Path | None) -> Path:
    """Where every cell logs: with A's runs (bookkeeping keys: config hashes are unaffected).

    A's stored work_dir may be relative to wherever A was trained; its store's folder is not.
    """
    return Path(
        work_dir or tracking.work_dir_of(client.tracking_uri) or config_a["work_dir"]
    ).resolve()


def describe(plan: Plan) -> list[str]:
    """The plan in a few lines: factors, design, seeds, trainings at most, impossible cells."""
    k, cells = len(plan.names), len(plan.design.cells)
    planned = len(plan.cells.rows)
    nest = plan.nesting
    read = sum(plan.long_twin(c) is not None for c in plan.cells.rows.values())
    planned -= read
    if plan.adaptive:  # the path's other configurations, each at every seed
        planned += len(plan.seeds) * (k * (k + 1) // 2 - 1)
    if plan.auto:
        seeds = f"seeds: auto: 2 per cell, then one more per round, at most {plan.rounds} rounds"
        planned += (plan.rounds - 1) * cells
    else:
        seeds = plan.cells.replicate.text(plan.seeds)
    lines = [
        f"factors ({k}): " + ", ".join(f.label() for f in plan.change.factors),
        f"design: {plan.design.name}; {plan.design.note}",
        f"{seeds}; trainings at most: {planned}"
        " (runs of the same config and seed already FINISHED, A and B among them, are reused)",
    ]
    if nest is not None:
        lines.append(
            f"{EPOCHS}={nest.short} is read from the {nest.long}-epoch runs' histories "
            f"(best epoch by {nest.monitor} among the first {nest.short}): {read} fewer trainings"
        )
    if plan.change.stored is not None:
        lines.append(
            "runs carry no recorded config-group choices: cells merge into A's stored config "
            "and train one after another in this process"
        )
    return lines + [f"cannot compose cell {lv}: {why}" for lv, why in plan.cells.impossible.items()]


def cell_epochs(plan: Plan, levels: tuple[int, ...]) -> int:
    """The epoch budget of a cell: the epochs factor's level, else A's."""
    names = plan.names
    if EPOCHS in names:
        value = plan.change.factors[names.index(EPOCHS)].levels[levels[names.index(EPOCHS)]]
        if isinstance(value, int):
            return value
    return int(plan.a_config.trainer.max_epochs)


def cost(plan: Plan, cells: list[Cell]) -> int:
    """Image-epochs of training `cells`: the plan's training images x each cell's epochs."""
    return sum(plan.train_images * int(cell.cfg.trainer.max_epochs) for cell in cells)


def full_cost(plan: Plan) -> int:
    """Image-epochs of the full 2^k factorial at the plan's seeds, at full fidelity."""
    levels = itertools.product((0, 1), repeat=len(plan.names))
    return len(plan.seeds) * sum(plan.train_images * cell_epochs(plan, lv) for lv in levels)


def compute_line(plan: Plan, spent: int, what: str) -> str:
    """`compute: 41,300 image-epochs planned (0.14 of the full 2^4 x 2 seeds at full fidelity: ...)`.

    Image-epochs are training images x epochs, summed over trainings, as
    `time/train_images_per_second` counts them, a screen's smaller images at their share of A's
    pixels; early stopping can only spend less. `plan`: the whole design at full fidelity,
    whose full factorial is the yardstick.
    """
    k, seeds, full = len(plan.names), len(plan.seeds), full_cost(plan)
    ratio = spent / full if full else float("nan")
    return (
        f"compute: {spent:,} image-epochs {what} ({ratio:.2f} of the full 2^{k} x {seeds} seeds "
        f"at full fidelity: {full:,})"
    )

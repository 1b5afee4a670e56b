"""Nested epoch budgets: a cell trained to more epochs also holds the fewer epochs' result.

When `trainer.max_epochs` is a factor and nothing else in the config depends on it (no schedule
annealed over `max_epochs`), a run trained to the larger budget has, in its per-epoch history,
what a run stopped at the smaller budget would have reported: the metric at the best epoch by
`checkpoint.monitor` among the first epochs. Early stopping is no exception: the shorter run
would have stopped at the same epoch or at its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from omegaconf import OmegaConf

from segexp import config
from segexp.tracking.history import BEST, epoch_values

EPOCHS = "trainer.max_epochs"


@dataclass(frozen=True)
class Nesting:
    """The epochs factor's position, its two budgets, and how the best epoch is chosen."""

    factor: int  # index among the factors
    short: int
    long: int
    monitor: str  # checkpoint.monitor
    mode: str  # "min" | "max"
    history_key: str  # the metric's per-epoch key

    @property
    def short_level(self) -> int:
        """The 0/1 level that holds the shorter budget (A's level is 0)."""
        return 0 if self.short < self.long else 1


def nesting(change, metric: str, cell_config) -> tuple[Nesting | None, str | None]:
    """(the nesting, None) where an epochs factor may be read from histories, else (None, why)."""
    names = [f.name for f in change.factors]
    if EPOCHS not in names:
        return None, None
    if not metric.endswith(BEST):
        return None, f"{metric} is not a best-epoch metric: both epoch budgets train"
    index = names.index(EPOCHS)
    levels = change.factors[index].levels
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in levels):
        return None, f"{EPOCHS} levels {levels} are not both set: both epoch budgets train"
    a, b = ((0,) * len(names), tuple(int(i == index) for i in range(len(names))))
    flat_a, flat_b = (_resolved(cell_config(cell)) for cell in (a, b))
    depends = sorted(
        k for k in set(flat_a) | set(flat_b) if k != EPOCHS and flat_a.get(k) != flat_b.get(k)
    )
    if depends:
        return None, (
            f"{', '.join(depends)} follow{'s' if len(depends) == 1 else ''} {EPOCHS}: "
            "both epoch budgets train"
        )
    monitor, mode = flat_a["checkpoint.monitor"], flat_a["checkpoint.mode"]
    found = Nesting(index, min(levels), max(levels), monitor, mode, metric[: -len(BEST)])
    return found, None


def _resolved(cfg) -> dict:
    return config.flatten(OmegaConf.to_container(cfg, resolve=True))


def value_at_budget(client: MlflowClient, run_id: str, nest: Nesting) -> float | None:
    """The metric at the best epoch by the monitor among the run's first `nest.short` epochs."""
    values = epoch_values(client, run_id, nest.history_key + BEST, nest.monitor, nest.mode)
    if not values:
        return None
    return values[min(nest.short, len(values)) - 1]

"""What tells a cell's runs apart: seeds (initialisations), the folds of A's k-fold split (data
draws), or both crossed (`segexp blame --replicate seed|fold|fold,seed`).

A replicate is one int, a block in the analysis: the seed itself, the fold, or seed x folds +
fold. The analysis keeps it as its `seed` column; runs.csv shows it as `replicate` beside the
training's own `seed` and `fold` where folds replicate. The fold is part of a cell's config (and
hash), so a run is reused only for its own fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from segexp.compare.runs import REPLICATES
from segexp.config import ConfigError

KINDS = ("seed", "fold", "fold,seed")
FOLD = REPLICATES["fold"]  # the key compare --by fold pools over


@dataclass(frozen=True)
class Replicate:
    """How a replicate id becomes the overrides of a cell's training."""

    by: str = "seed"
    folds: int = 1  # A's dataset.folds, where folds are replicates
    seed: int = 0  # A's seed: the one every fold trains at under `fold`

    def overrides(self, r: int) -> list[str]:
        return [f"seed={self.seed_of(r)}"] + ([f"{FOLD}={self.fold_of(r)}"] if self.crossed else [])

    @property
    def crossed(self) -> bool:
        """Whether folds are replicates (alone or crossed with seeds)."""
        return self.by != "seed"

    @property
    def word(self) -> str:
        """What the report calls one replicate of a cell."""
        return {"seed": "seed", "fold": "fold"}.get(self.by, "replicate")

    def seed_of(self, r: int) -> int:
        return {"seed": r, "fold": self.seed, "fold,seed": r // self.folds}[self.by]

    def fold_of(self, r: int) -> int | None:
        return r % self.folds if self.crossed else None

    def first(self, seed: int, per_cell: int) -> list[int]:
        """The replicate ids every cell trains at: `per_cell` seeds from `seed`, each fold."""
        seeds = range(seed, seed + per_cell)
        if self.by == "seed":
            return list(seeds)
        if self.by == "fold":
            return list(range(self.folds))
        return [s * self.folds + f for s in seeds for f in range(self.folds)]

    def label(self, r: int) -> list[tuple[str, int]]:
        """The (key, value) pairs a run name shows: `s=43`, `fold=2`, or both."""
        shown = [] if self.by == "fold" else [("seed", self.seed_of(r))]
        return shown + ([("fold", self.fold_of(r))] if self.crossed else [])

    def readable(self, results: pd.DataFrame) -> pd.DataFrame:
        """runs.csv as written: the block id as `replicate`, the training's `seed` and `fold`."""
        if not self.crossed or "seed" not in results:
            return results
        results = results.copy()  # the analysis keeps its own `seed` column
        ids = results.pop("seed").astype(int)
        at = results.columns.get_loc("run_id") if "run_id" in results else len(results.columns)
        for offset, (name, values) in enumerate(
            (("replicate", ids), ("seed", ids.map(self.seed_of)), ("fold", ids.map(self.fold_of)))
        ):
            results.insert(at + offset, name, values)
        return results

    def text(self, ids: list[int]) -> str:
        """The plan's line: which replicates, as blocks of the analysis."""
        if self.by == "seed":
            return f"seeds: {ids}"
        seeds = sorted({self.seed_of(r) for r in ids})
        return (
            f"replicates: the {self.folds} folds of A's k-fold split x seeds {seeds} "
            f"({len(ids)} per cell, each a block: a verdict holds over data draws"
            + (" and initialisations)" if self.by == "fold,seed" else ", at one seed)")
        )


def replicate_of(by: str, config_a: dict, factor_names: list[str], auto: bool) -> Replicate:
    """A's replicate scheme for `--replicate by`; ConfigError where A's config cannot give it."""
    if by not in KINDS:
        raise ConfigError(f"--replicate must be one of {', '.join(KINDS)}, got {by!r}")
    if by == "seed":
        return Replicate()
    folds = (config_a.get("dataset") or {}).get("folds")
    if not isinstance(folds, int) or folds < 2:
        raise ConfigError(
            f"--replicate {by}: run A was not trained with k folds (dataset.folds={folds}); "
            "train A and B with dataset.folds=K"
        )
    if any(n.startswith(FOLD) for n in factor_names):  # dataset.fold or dataset.folds
        raise ConfigError(f"--replicate {by}: A and B differ in their folds, which are no factor")
    if auto:
        raise ConfigError(f"--replicate {by} trains every fold: give --seeds N, not auto")
    return Replicate(by, folds, int(config_a["seed"]))

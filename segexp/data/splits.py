"""Which exams/patients a run tests, validates and trains on: a held-out test split, then a
validation split or one fold of a k-fold cross-validation, never cutting a group."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .cases import Case, split_groups


@dataclass(frozen=True)
class SplitSpec:
    """The split settings of `dataset.*`; see SegDataModule."""

    val_fraction: float | None = 0.2
    val_count: int | None = None
    split_seed: int = 0
    test_fraction: float | None = None
    test_count: int | None = None
    test_seed: int = 0
    folds: int | None = None
    fold: int = 0

    def check(self) -> None:
        """ValueError naming the key of a setting out of range."""
        if self.test_fraction is not None and not 0 <= self.test_fraction < 1:
            raise ValueError(f"dataset.test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.folds is not None:
            if self.folds < 2:
                raise ValueError(f"dataset.folds must be >= 2 (or null), got {self.folds}")
            if not 0 <= self.fold < self.folds:
                raise ValueError(
                    f"dataset.fold must be in [0, {self.folds}) with dataset.folds={self.folds}, "
                    f"got {self.fold}"
                )


@dataclass
class Splits:
    """Group -> role: `test`, `val` or `train`, and each non-test group's fold (k-fold only)."""

    test: set[str]
    val: set[str]
    folds: dict[str, int] = field(default_factory=dict)


def assign_folds(groups: Iterable[str], folds: int, seed: int) -> dict[str, int]:
    """Each group's fold: a seeded order of the sorted groups dealt out round-robin, so fold
    sizes differ by at most one and do not depend on the order files were listed in."""
    groups = sorted(set(groups))
    if folds > len(groups):
        raise ValueError(f"dataset.folds={folds} is more than the {len(groups)} groups left")
    order = np.random.default_rng([seed, 2]).permutation(len(groups))
    return {groups[i]: rank % folds for rank, i in enumerate(order)}


def test_groups(cases: list[Case], spec: SplitSpec) -> set[str]:
    """The held-out test groups: seeded by `test_seed` alone, a stream of its own."""
    groups = sorted({c.group for c in cases})
    count = spec.test_count
    if count is None:
        count = int(round((spec.test_fraction or 0.0) * len(groups)))
    if not 0 <= count < len(groups):
        raise ValueError(f"dataset.test_count must be in [0, {len(groups)}), got {count}")
    order = np.random.default_rng([spec.test_seed, 3]).permutation(len(groups))
    return {groups[i] for i in order[:count]}


def make_splits(cases: list[Case], spec: SplitSpec) -> Splits:
    """The test groups (their own seed: the same for every `seed`), then among the others the
    validation groups: fold `spec.fold` of `spec.folds`, or a `val_fraction` / `val_count`."""
    spec.check()
    test = test_groups(cases, spec) if spec.test_fraction or spec.test_count else set()
    rest = [c for c in cases if c.group not in test]
    if spec.folds:
        folds = assign_folds((c.group for c in rest), spec.folds, spec.split_seed)
        return Splits(test, {g for g, f in folds.items() if f == spec.fold}, folds)
    return Splits(test, split_groups(rest, spec.val_fraction, spec.val_count, spec.split_seed))

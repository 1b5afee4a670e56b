"""The torch Dataset and the LightningDataModule for both layouts, over `segexp.data.arrays`.

Batch contract (what every loader yields, collated):
    image    float32 (N, C, H, W)   normalised: [0, 1] (`minmax`) or per-volume z-score (`volume`)
    mask     float32 (N, 1, H, W)   binary {0, 1}; absent for unannotated images (HC18 test set)
    case_id  list[str]              file stem, e.g. `010_2HC`, `TCGA_CS_4941_19960909_12`
    group    list[str]              exam id (HC18) or patient id (LGG)
    original_size  int64 (N, 2)     (H, W) of the file on disk, to measure at full resolution
    pixel_size_mm  float64 (N,)     HC18 only
    hc_mm          float64 (N,)     HC18 training set only: the reference head circumference
"""

from __future__ import annotations

import time
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from segexp import performance
from segexp.evaluation import pixel_spacings, shape_ranges

from .arrays import cache_entry, cached_volume_stats, load_arrays, size_hw, volume_stats
from .cases import SCANNERS, Case, DataError, fingerprint
from .splits import SplitSpec, make_splits


class SegDataset(Dataset):
    """Cases drawn from cached arrays, augmented on the fly; items follow the batch contract."""

    def __init__(
        self, images, masks, cases, indices, transform=None, stats=None, original_sizes=None
    ):
        self.images, self.masks, self.cases = images, masks, cases
        self.indices, self.transform, self.stats = list(indices), transform, stats
        self.original_sizes = original_sizes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        k = self.indices[i]
        image = np.array(self.images[k])  # (H, W, C) uint8, a writable copy of the cache's row
        mask = None if self.masks is None else np.array(self.masks[k])  # (H, W) uint8
        if self.transform is not None:
            # Compose keeps its own RNG; seed it from torch's, which Lightning seeds per worker
            # and segexp checkpoints, so seeded and resumed runs augment identically.
            self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ())))
            out = (
                self.transform(image=image, mask=mask)
                if mask is not None
                else self.transform(image=image)
            )
            image, mask = out["image"], out.get("mask")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        if self.stats is None:
            image = image / 255.0
        else:
            low, high, mean, std = (torch.from_numpy(s)[:, None, None] for s in self.stats[k])
            image = (image.clamp(min=low, max=high) - mean) / std
        case = self.cases[k]
        item = {"image": image, "case_id": case.case_id, "group": case.group}
        if self.original_sizes is not None:
            item["original_size"] = torch.as_tensor(self.original_sizes[k], dtype=torch.int64)
        if case.pixel_size_mm is not None:
            item["pixel_size_mm"] = case.pixel_size_mm
        if case.hc_mm is not None:
            item["hc_mm"] = case.hc_mm
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask))[None].float()
        return item


def kept_groups(cases: list[Case], train_idx: list[int], fraction: float, seed: int) -> set:
    """The first `fraction` of the training groups in an order fixed by the split seed (>= 1)."""
    groups = sorted({cases[i].group for i in train_idx})
    order = np.random.default_rng([seed, 1]).permutation(len(groups))
    return {groups[i] for i in order[: max(1, round(fraction * len(groups)))]}


class SegDataModule(pl.LightningDataModule):
    """HC18 or LGG (`layout`) from `root`: validated, cached, split by exam or patient.

    Args:
        layout: `hc18` (official HC18 layout) or `lgg` (Kaggle `kaggle_3m` layout).
        val_fraction / val_count: share or number of exams/patients held out for validation.
        test_fraction / test_count: share or number held out for testing first (default none):
            never trained on nor used to pick the best epoch; chosen by `test_seed` alone, so
            every run (every seed) tests the same cases.
        folds / fold: k-fold cross-validation (default none): the non-test groups dealt into
            `folds` folds by `split_seed`; fold `fold` validates, the others train.
        train_fraction: share of the training exams/patients trained on (a screen's lower
            fidelity): the same ones for a split seed, the validation split unchanged.
        normalize: `minmax` (pixel / 255) or `volume` (per-patient percentile clip + z-score).
        hc_boundary_offset_px: how far this dataset's filled masks extend beyond the ellipse its
            reference HC measures (see `segexp.evaluation.ellipse_from_mask`); HC18 layout only.
        train_transform: an albumentations transform applied to training items only.
        oversample_hc_mm / oversample_factor: draw training heads of at least `oversample_hc_mm`
            reference HC `oversample_factor` times as often as the others (with replacement, the
            epoch's length unchanged); HC18 layout only, one process.
    """

    def __init__(
        self,
        name: str,
        layout: str,
        root: str,
        channels: int,
        image_size: int = 128,
        batch_size: int = 16,
        num_workers: int | str = "auto",
        val_fraction: float | None = 0.2,
        val_count: int | None = None,
        split_seed: int = 0,
        test_fraction: float | None = None,
        test_count: int | None = None,
        test_seed: int = 0,
        folds: int | None = None,
        fold: int = 0,
        train_fraction: float = 1.0,
        normalize: str = "minmax",
        cache_dir: str | None = None,
        hc_boundary_offset_px: float = 0.0,
        train_transform: A.BasicTransform | A.Compose | None = None,
        oversample_hc_mm: float | None = None,
        oversample_factor: float = 1.0,
    ):
        super().__init__()
        if layout not in SCANNERS:
            raise ValueError(f"dataset.layout must be one of {sorted(SCANNERS)}, got {layout!r}")
        if normalize not in ("minmax", "volume"):
            raise ValueError(f"dataset.normalize must be 'minmax' or 'volume', got {normalize!r}")
        image_size = size_hw(image_size)
        if any(s < 16 or s % 16 for s in image_size):
            raise ValueError(
                f"dataset.image_size must be positive multiples of 16, got {list(image_size)}"
            )
        if not 0 < train_fraction <= 1:
            raise ValueError(f"dataset.train_fraction must be in (0, 1], got {train_fraction}")
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be >= 1, got {batch_size}")
        if oversample_factor < 1 or (oversample_factor > 1 and oversample_hc_mm is None):
            raise ValueError(
                "dataset.oversample_factor must be >= 1 and needs dataset.oversample_hc_mm, got "
                f"{oversample_factor} with oversample_hc_mm={oversample_hc_mm}"
            )
        if oversample_hc_mm is not None and layout != "hc18":
            raise ValueError("dataset.oversample_hc_mm needs head sizes: HC18 layout only")
        self.oversample = (oversample_hc_mm, oversample_factor)
        self.name, self.layout, self.root = name, layout, Path(root)
        self.channels, self.image_size, self.batch_size = channels, image_size, batch_size
        self.num_workers, self.normalize = num_workers, normalize
        self.split = SplitSpec(
            val_fraction, val_count, split_seed, test_fraction, test_count, test_seed, folds, fold
        )
        self.split.check()
        self.split_seed = split_seed
        self.train_fraction = train_fraction
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.train_transform = train_transform
        self.hc_boundary_offset_px = hc_boundary_offset_px if layout == "hc18" else None
        self.volumetric = layout == "lgg"  # LGG slices form per-patient volumes
        self.hc_plausible: dict | None = None  # set by setup from the training split (HC18)
        self.cases: list[Case] = []
        self.load_seconds = 0.0

    def prepare_data(self) -> None:
        """Scan, check and decode everything (into the cache); raises DataError on bad input."""
        if self.cases:
            return
        if not self.root.exists():
            hint = (
                f"; make it with: segexp make-data {self.layout} {self.root}"
                if "synthetic" in self.name
                else ""
            )
            raise DataError(self.root, [(str(self.root), f"dataset.root does not exist{hint}")])
        start = time.perf_counter()
        self.cases = SCANNERS[self.layout](self.root)
        # one fingerprint (a stat of every file) for the arrays and the volume stats
        entry = cache_entry(self.cases, self.image_size, self.channels, self.cache_dir)
        self.images, self.masks, self.original_sizes = load_arrays(
            self.cases, self.image_size, self.channels, entry
        )
        self.load_seconds = time.perf_counter() - start
        self.splits = make_splits(self.cases, self.split)
        held = self.splits.val | self.splits.test
        self.val_idx = [i for i, c in enumerate(self.cases) if c.group in self.splits.val]
        self.test_idx = [i for i, c in enumerate(self.cases) if c.group in self.splits.test]
        self.train_idx = [i for i, c in enumerate(self.cases) if c.group not in held]
        if self.train_fraction < 1:
            kept = kept_groups(self.cases, self.train_idx, self.train_fraction, self.split_seed)
            self.train_idx = [i for i in self.train_idx if self.cases[i].group in kept]
        groups = [c.group for c in self.cases]
        self.stats = (
            cached_volume_stats(self.images, groups, entry) if self.normalize == "volume" else None
        )

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if not self.val_idx:
            raise DataError(
                self.root, [(str(self.root), "validation split is empty: raise val_fraction")]
            )
        arrays = (self.images, self.masks, self.cases)
        extra = {"stats": self.stats, "original_sizes": self.original_sizes}
        self.train_set = SegDataset(*arrays, self.train_idx, self.train_transform, **extra)
        self.val_set = SegDataset(*arrays, self.val_idx, None, **extra)
        self.test_set = SegDataset(*arrays, self.test_idx, None, **extra)
        if self.layout == "hc18" and self.masks is not None and self.train_idx:
            self.hc_plausible = shape_ranges(
                np.asarray(self.masks[self.train_idx]),
                self.spacings(self.train_idx),
                [self.cases[i].hc_mm for i in self.train_idx],
            )

    def spacings(self, indices) -> np.ndarray:
        """(len(indices), 2) mm per model pixel along (y, x): original size / image_size * pixel."""
        pixel = np.array([self.cases[i].pixel_size_mm for i in indices], float)
        return pixel_spacings(self.original_sizes[list(indices)], self.image_size, pixel)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cases)

    def split_table(self) -> pd.DataFrame:
        """One row per case: case_id, group, split (train/val/test/unused) and, with k folds, its
        fold: the run's split file."""
        split = {
            **dict.fromkeys(self.test_idx, "test"),
            **dict.fromkeys(self.val_idx, "val"),
            **dict.fromkeys(self.train_idx, "train"),
        }
        table = pd.DataFrame(
            {
                "case_id": [c.case_id for c in self.cases],
                "group": [c.group for c in self.cases],
                "split": [split.get(i, "unused") for i in range(len(self.cases))],
            }
        )
        if self.splits.folds:
            table["fold"] = [self.splits.folds.get(c.group, -1) for c in self.cases]
        return table

    def summary(self) -> dict:
        """Counts and label statistics, as `segexp check-data` prints them."""
        masks = np.asarray(self.masks) if self.masks is not None else None
        return {
            "dataset": self.name,
            "root": str(self.root),
            "images": len(self.cases),
            "masks": 0 if masks is None else len(self.cases),
            "exams" if self.layout == "hc18" else "patients": len({c.group for c in self.cases}),
            "train_images": len(self.train_idx),
            "val_images": len(self.val_idx),
            "val_groups": len({self.cases[i].group for i in self.val_idx}),
            "positive_pixel_fraction": None if masks is None else round(float(masks.mean()), 4),
            "empty_mask_fraction": None
            if masks is None
            else round(float((masks.reshape(len(masks), -1).max(1) == 0).mean()), 4),
            "load_seconds": round(self.load_seconds, 2),
        }

    def train_weights(self) -> np.ndarray | None:
        """Per training item, its relative chance of being drawn; None: plain shuffling."""
        threshold, factor = self.oversample
        if threshold is None or factor == 1:
            return None
        hc = np.array([self.cases[i].hc_mm for i in self.train_idx], float)
        return np.where(hc >= threshold, factor, 1.0)

    def _loader(self, dataset: Dataset, shuffle: bool, weights=None) -> DataLoader:
        """Batches of `dataset`; `weights` (per item) draw it with replacement instead."""
        sampler = None
        trainer = getattr(self, "trainer", None)
        if weights is not None:
            if trainer is not None and trainer.world_size > 1:
                raise ValueError("dataset.oversample_factor > 1 runs in one process, not DDP")
            # torch's global generator draws: Lightning seeds it, so a seed repeats its draws
            sampler = WeightedRandomSampler(weights.tolist(), len(weights), replacement=True)
        elif shuffle and trainer is not None and trainer.world_size > 1:
            # DDP: shard training only (trainer=ddp turns Lightning's sampler off), so every
            # rank validates all cases and the per-case tables need no gathering.
            sampler = DistributedSampler(
                dataset, trainer.world_size, trainer.global_rank, shuffle=True, seed=self.split_seed
            )
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        settings = performance.loader_settings(device)  # workers, pinned memory for the device
        if self.num_workers != "auto":
            workers = int(self.num_workers)
            settings.update(num_workers=workers, persistent_workers=workers > 0)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=shuffle and len(dataset) > self.batch_size,  # no 1-image BatchNorm batches
            **settings,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, weights=self.train_weights())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def loader_of(self, cases: list[Case], cache: bool = True) -> DataLoader:
        """Unaugmented batches of other `cases`, preprocessed as this dataset's (size, normalize)."""
        entry = cache_entry(cases, self.image_size, self.channels, cache and self.cache_dir)
        images, masks, sizes = load_arrays(cases, self.image_size, self.channels, entry)
        stats = (
            volume_stats(images, [c.group for c in cases]) if self.normalize == "volume" else None
        )
        dataset = SegDataset(
            images, masks, cases, range(len(cases)), stats=stats, original_sizes=sizes
        )
        return self._loader(dataset, shuffle=False)

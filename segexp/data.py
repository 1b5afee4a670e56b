"""Decoded-array cache, torch Dataset and the LightningDataModule for both layouts.

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

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from PIL import Image
from scipy import ndimage
from skimage import draw, measure
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from segexp import speed
from segexp.cases import SCANNERS, Case, DataError, fingerprint, split_groups

CACHE_VERSION = 1  # bump when decoding or resizing changes


def filled_mask(annotation: np.ndarray) -> np.ndarray:
    """Filled boolean mask from an annotation that is a filled region or an ellipse outline."""
    outline = annotation > 0
    rows, cols = np.nonzero(outline.any(axis=1))[0], np.nonzero(outline.any(axis=0))[0]
    if len(rows) == 0:
        return outline
    # fill inside the bounding box (+1 px of background): same result, a fraction of the work
    box = np.s_[max(rows[0] - 1, 0) : rows[-1] + 2, max(cols[0] - 1, 0) : cols[-1] + 2]
    filled = np.zeros_like(outline)
    filled[box] = ndimage.binary_fill_holes(outline[box])
    if filled.sum() > 2 * outline.sum():
        return filled  # a closed outline (official HC18 release)
    eroded = ndimage.binary_erosion(outline).sum()
    if outline.sum() > 20 and eroded < 0.2 * outline.sum():
        # a thin outline that is open, e.g. cut by the image border: fit the ellipse and fill it
        rows, cols = np.nonzero(outline)
        model = measure.EllipseModel.from_estimate(np.column_stack([cols, rows]).astype(float))
        if model:  # falsy when the fit failed
            (xc, yc), (a, b) = model.center, model.axis_lengths
            # skimage.draw.ellipse turns the other way round from the fitted theta
            rr, cc = draw.ellipse(yc, xc, b, a, shape=outline.shape, rotation=-model.theta)
            filled = np.zeros_like(outline)
            filled[rr, cc] = True
            return filled
    return filled


class FileProblem(Exception):
    """One file that cannot be used, and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


MIN_SIDE = 16  # px: smaller files are thumbnails or broken exports, not scans


def read_image(path: str, mode: str | None = None) -> np.ndarray:
    """Decode an image as uint8 (mode `L` or `RGB`); 16-bit files are scaled by their bit depth.

    PIL's own conversion of a 16-bit grayscale image clips it to 8 bits (most pixels become 255),
    so integer modes are rescaled here: 0..65535 -> 0..255.
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated files fail here with a reason
            if im.mode.startswith("I"):  # I, I;16, I;16B, ...: 16- or 32-bit integers
                values = np.asarray(im).astype(np.float64)
                if values.max(initial=0) > 65535 or values.min(initial=0) < 0:
                    raise FileProblem(path, f"{im.mode} image outside the 16-bit range")
                gray = np.round(values * (255 / 65535)).astype(np.uint8)
                image = np.stack([gray] * 3, axis=-1) if mode == "RGB" else gray
            else:
                image = np.asarray(im.convert(mode) if mode else im)
    except FileProblem:
        raise
    except Exception as err:  # PIL raises many types for corrupt files
        raise FileProblem(
            path, f"unreadable or corrupt image ({type(err).__name__}: {err})"
        ) from err
    if min(image.shape[:2]) < MIN_SIDE:
        h, w = image.shape[:2]
        raise FileProblem(path, f"image is {w}x{h} px; at least {MIN_SIDE}x{MIN_SIDE} expected")
    return image


def decode_case(
    case: Case, image_size: int, channels: int
) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """Decode, check and resize one case: image (S, S, C) uint8, mask (S, S) uint8 {0,1}, (H, W)."""
    image = read_image(case.image, "L" if channels == 1 else "RGB")
    original = image.shape[:2]
    image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    image = image.reshape(image_size, image_size, channels)
    if case.mask is None:
        return image, None, original
    annotation = read_image(case.mask, "L")  # gray, RGB or RGBA annotations alike
    if annotation.shape != original:
        size, expected = annotation.shape[::-1], original[::-1]
        raise FileProblem(case.mask, f"mask size {size} != image size {expected} (W, H)")
    levels = np.unique(annotation)
    if len(levels) > 2:
        raise FileProblem(case.mask, f"non-binary mask ({len(levels)} distinct values)")
    mask = filled_mask(annotation).astype(np.float32)
    mask = cv2.resize(mask, (image_size, image_size), interpolation=cv2.INTER_AREA) >= 0.5
    return image, mask.astype(np.uint8), original


def cache_entry(
    cases: list[Case], image_size: int, channels: int, cache_dir: Path | None
) -> Path | None:
    """The cache folder of these files at this preprocessing (None: caching is off)."""
    if not cache_dir:
        return None
    key = fingerprint(cases, {"size": image_size, "channels": channels, "v": CACHE_VERSION})
    return Path(cache_dir) / key


def load_arrays(
    cases: list[Case], image_size: int, channels: int, entry: Path | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Decoded, resized arrays for `cases`, from the cache folder `entry` when it is complete.

    `entry` comes from `cache_entry` (None: no caching). Returns images (N, S, S, C) uint8,
    masks (N, S, S) uint8 or None, original sizes (N, 2).
    """
    key = entry.name if entry else None
    if entry is not None and (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="r")
        masks = np.load(entry / "masks.npy", mmap_mode="r") if meta["masks"] else None
        return images, masks, np.asarray(meta["original_sizes"])

    images = np.zeros((len(cases), image_size, image_size, channels), np.uint8)
    masks = np.zeros((len(cases), image_size, image_size), np.uint8)
    originals, problems = [], []

    def decode(case: Case):
        try:
            return decode_case(case, image_size, channels)
        except FileProblem as problem:
            return problem

    # PIL decoding, cv2 and most of ndimage release the GIL: threads use every core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, result in enumerate(pool.map(decode, cases)):
            if isinstance(result, FileProblem):
                problems.append((result.path, result.reason))
                originals.append((0, 0))
                continue
            images[i], mask, original = result
            if mask is not None:
                masks[i] = mask
            originals.append(original)
    if problems:
        raise DataError(Path(cases[0].image).parent, problems)
    has_masks = all(c.mask is not None for c in cases)
    if entry is not None:
        # write to a temporary folder and rename: concurrent jobs never read a half-written entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
        np.save(tmp / "images.npy", images)
        if has_masks:
            np.save(tmp / "masks.npy", masks)
        meta = {"masks": has_masks, "original_sizes": originals, "files": len(cases)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    return images, (masks if has_masks else None), np.asarray(originals)


def cached_volume_stats(images: np.ndarray, groups: list[str], entry: Path | None) -> np.ndarray:
    """`volume_stats`, kept next to the cached arrays (percentiles of every volume cost seconds)."""
    path = entry / "volume_stats.npy" if entry is not None and entry.is_dir() else None
    if path is not None and path.is_file():
        return np.load(path)
    stats = volume_stats(images, groups)
    if path is not None:
        tmp = path.with_name(f".{os.getpid()}.volume_stats.npy")
        np.save(tmp, stats)
        os.replace(tmp, path)  # atomic: a concurrent reader sees all of it or nothing
    return stats


def volume_stats(images: np.ndarray, groups: list[str]) -> np.ndarray:
    """Per-case (low, high, mean, std) per channel, computed over each case's whole volume.

    As in the LGG reference: clip each volume's channel to its 10th-99th percentile, then z-score.
    The images are uint8, so everything comes from one 256-bin histogram per volume and channel
    (same values as np.percentile's linear rule, without sorting millions of pixels).
    Returns (N, 4, C) float32.
    """
    channels = images.shape[-1]
    stats = np.zeros((len(groups), 4, channels), np.float32)
    groups_arr = np.asarray(groups)
    levels = np.arange(256, dtype=np.float64)
    for group in np.unique(groups_arr):
        idx = np.nonzero(groups_arr == group)[0]
        volume = np.asarray(images[idx])
        for c in range(channels):
            counts = np.bincount(volume[..., c].ravel(), minlength=256).astype(np.float64)
            low, high = (_percentile_from_counts(counts, q) for q in (10, 99))
            clipped = np.clip(levels, low, high)
            mean = (counts * clipped).sum() / counts.sum()
            std = np.sqrt((counts * (clipped - mean) ** 2).sum() / counts.sum())
            stats[idx, :, c] = (low, high, mean, std + 1e-6)
    return stats


def _percentile_from_counts(counts: np.ndarray, q: float) -> float:
    """np.percentile(values, q) (linear interpolation) of uint8 values given their histogram."""
    cdf = np.cumsum(counts)
    position = q / 100 * (cdf[-1] - 1)
    below, fraction = int(np.floor(position)), position - np.floor(position)
    # the value of the k-th smallest element (0-based) is the first level whose cdf exceeds k
    lower = np.searchsorted(cdf, below, side="right")
    upper = np.searchsorted(cdf, below + 1, side="right") if fraction else lower
    return float(lower + (upper - lower) * fraction)


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


class SegDataModule(pl.LightningDataModule):
    """HC18 or LGG (`layout`) from `root`: validated, cached, split by exam or patient.

    Args:
        layout: `hc18` (official HC18 layout) or `lgg` (Kaggle `kaggle_3m` layout).
        val_fraction / val_count: share or number of exams/patients held out for validation.
        normalize: `minmax` (pixel / 255) or `volume` (per-patient percentile clip + z-score).
        hc_boundary_offset_px: how far this dataset's filled masks extend beyond the ellipse its
            reference HC measures (see `segexp.metrics.ellipse_from_mask`); HC18 layout only.
        train_transform: an albumentations transform applied to training items only.
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
        normalize: str = "minmax",
        cache_dir: str | None = None,
        hc_boundary_offset_px: float = 0.0,
        train_transform: A.BasicTransform | A.Compose | None = None,
    ):
        super().__init__()
        if layout not in SCANNERS:
            raise ValueError(f"dataset.layout must be one of {sorted(SCANNERS)}, got {layout!r}")
        if normalize not in ("minmax", "volume"):
            raise ValueError(f"dataset.normalize must be 'minmax' or 'volume', got {normalize!r}")
        if image_size < 16 or image_size % 16:
            raise ValueError(
                f"dataset.image_size must be a positive multiple of 16, got {image_size}"
            )
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be >= 1, got {batch_size}")
        self.name, self.layout, self.root = name, layout, Path(root)
        self.channels, self.image_size, self.batch_size = channels, image_size, batch_size
        self.num_workers, self.normalize = num_workers, normalize
        self.val_fraction, self.val_count, self.split_seed = val_fraction, val_count, split_seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.train_transform = train_transform
        self.hc_boundary_offset_px = hc_boundary_offset_px if layout == "hc18" else None
        self.volumetric = layout == "lgg"  # LGG slices form per-patient volumes
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
        val_groups = split_groups(self.cases, self.val_fraction, self.val_count, self.split_seed)
        self.val_idx = [i for i, c in enumerate(self.cases) if c.group in val_groups]
        self.train_idx = [i for i, c in enumerate(self.cases) if c.group not in val_groups]
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

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cases)

    def split_table(self) -> pd.DataFrame:
        """One row per case: case_id, group, split (train/val), for the run's split file."""
        val = set(self.val_idx)
        return pd.DataFrame(
            {
                "case_id": [c.case_id for c in self.cases],
                "group": [c.group for c in self.cases],
                "split": ["val" if i in val else "train" for i in range(len(self.cases))],
            }
        )

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

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        sampler = None
        trainer = getattr(self, "trainer", None)
        if shuffle and trainer is not None and trainer.world_size > 1:
            # DDP: shard training only (trainer=ddp turns Lightning's sampler off), so every
            # rank validates all cases and the per-case tables need no gathering.
            sampler = DistributedSampler(
                dataset, trainer.world_size, trainer.global_rank, shuffle=True, seed=self.split_seed
            )
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        settings = speed.loader_settings(device)  # workers, pinned memory for the device
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
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Neither layout ships a labelled test set: testing evaluates the validation split."""
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """HC18: the unannotated `test_set/`; LGG: the validation split."""
        if self.layout != "hc18":
            return self._loader(self.val_set, shuffle=False)
        cases = SCANNERS["hc18"](self.root, "test")
        entry = cache_entry(cases, self.image_size, self.channels, self.cache_dir)
        images, _, sizes = load_arrays(cases, self.image_size, self.channels, entry)
        return self._loader(
            SegDataset(images, None, cases, range(len(cases)), original_sizes=sizes), shuffle=False
        )

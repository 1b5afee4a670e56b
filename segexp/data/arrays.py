"""From image files to decoded, resized uint8 arrays: reading, checks, the on-disk cache.

Every file problem is a `FileProblem` naming the file; `load_arrays` collects them all into one
`DataError`. The cache keys on the files' fingerprint and the preprocessing, so a changed file or
size never serves stale arrays.
"""

from __future__ import annotations

import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from segexp.evaluation import ellipse_mask, fit_ellipse
from segexp.files import atomic_folder, atomic_write_bytes

from .cases import Case, DataError, fingerprint

CACHE_VERSION = 2  # bump when decoding, its checks or resizing change


def size_hw(image_size) -> tuple[int, int]:
    """`dataset.image_size` as (H, W): an int is a square, `[H, W]` keeps e.g. HC18's 540:800."""
    if isinstance(image_size, int):
        return image_size, image_size
    values = tuple(int(v) for v in image_size)
    if len(values) != 2:
        raise ValueError(f"dataset.image_size must be an int or [H, W], got {list(image_size)}")
    return values


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
        ellipse = fit_ellipse(np.column_stack([cols, rows]).astype(float))
        if ellipse is not None:
            return ellipse_mask(ellipse, outline.shape)
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


def read_annotation(path: str) -> np.ndarray:
    """An annotation as gray uint8 from a gray, RGB or RGBA file; FileProblem if alpha holds it.

    The gray conversion ignores alpha, so an ellipse drawn only in the alpha channel would read
    as a uniform (empty or full) mask.
    """
    gray = read_image(path, "L")
    if gray.min() == gray.max():  # uniform: only then can alpha hold what the colours lack
        with Image.open(path) as im:
            if "A" in im.getbands() or "transparency" in im.info:
                low, high = im.convert("RGBA").getchannel("A").getextrema()
                if low != high:
                    raise FileProblem(
                        path, "annotation drawn in its alpha channel only: save it as gray or RGB"
                    )
    return gray


def decode_case(
    case: Case, image_size, channels: int
) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """Decode, check and resize one case: image (h, w, C) uint8, mask (h, w) uint8 {0,1}, (H, W).

    `image_size` is an int (square) or (h, w); H, W are the sizes on disk.
    """
    h, w = size_hw(image_size)
    image = read_image(case.image, "L" if channels == 1 else "RGB")
    original = image.shape[:2]
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)  # cv2 sizes are (W, H)
    image = image.reshape(h, w, channels)
    if case.mask is None:
        return image, None, original
    annotation = read_annotation(case.mask)
    if annotation.shape != original:
        size, expected = annotation.shape[::-1], original[::-1]
        raise FileProblem(case.mask, f"mask size {size} != image size {expected} (W, H)")
    levels = np.unique(annotation)
    if len(levels) > 2:
        raise FileProblem(case.mask, f"non-binary mask ({len(levels)} distinct values)")
    if case.hc_mm and not annotation.any():  # a blank mask would teach "no head" silently
        raise FileProblem(case.mask, f"empty annotation, but its CSV row gives HC {case.hc_mm} mm")
    mask = filled_mask(annotation).astype(np.float32)
    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA) >= 0.5
    return image, mask.astype(np.uint8), original


class Rows:
    """A cached `.npy` array read row by row from the file, never memory-mapped.

    A memory map counts every page it has touched in the process's RSS, so an epoch over
    kaggle_3m's ~1 GB of cached slices would add ~1 GB to a training's resident memory. Read on
    demand, the rows stay in the OS page cache (shared, reclaimable) and a row costs one read.
    Indexing: an int gives one row (a fresh, writable array); a slice, list or index array
    gives them stacked; `np.asarray(rows)` reads the whole array.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            self.offset = f.tell()
        if fortran_order or not shape:
            raise ValueError(f"{self.path}: expected a C-ordered array with rows")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = self.dtype.itemsize * int(np.prod(shape[1:]))
        self._file, self._pid, self._lock = None, None, threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._row(int(key))
        rows = [self._row(int(k)) for k in np.arange(len(self))[key]]
        return np.stack(rows) if rows else np.empty((0, *self.shape[1:]), self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.fromfile(self.path, self.dtype, offset=self.offset).reshape(self.shape)
        return array if dtype is None else array.astype(dtype)

    def __getstate__(self) -> dict:  # DataLoader workers open their own file
        return {**self.__dict__, "_file": None, "_pid": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None and self._pid == os.getpid():
            self._file.close()

    def _row(self, k: int) -> np.ndarray:
        if not -len(self) <= k < len(self):
            raise IndexError(f"row {k} of {len(self)} in {self.path}")
        row = np.empty(self.shape[1:], self.dtype)
        with self._lock:  # seek + read on one handle
            if self._pid != os.getpid():  # a forked worker must not share the parent's offset
                self._file, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
            self._file.seek(self.offset + (k % len(self)) * self.row_bytes)
            read = self._file.readinto(memoryview(row).cast("B"))
        if read != self.row_bytes:
            raise DataError(self.path, [(str(self.path), "cache file is truncated")])
        return row


def cache_entry(
    cases: list[Case], image_size, channels: int, cache_dir: Path | None
) -> Path | None:
    """The cache folder of these files at this preprocessing (None: caching is off)."""
    if not cache_dir:
        return None
    h, w = size_hw(image_size)
    size = h if h == w else [h, w]  # squares keep the key they always had
    key = fingerprint(cases, {"size": size, "channels": channels, "v": CACHE_VERSION})
    return Path(cache_dir) / key


def load_arrays(
    cases: list[Case], image_size, channels: int, entry: Path | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Decoded, resized arrays for `cases`, from the cache folder `entry` when it is complete.

    `entry` comes from `cache_entry` (None: no caching, arrays stay in memory). Returns images
    (N, h, w, C) uint8, masks (N, h, w) uint8 or None, original sizes (N, 2); cached arrays
    come as `Rows` of the cache's files, also right after they were written.
    """
    h, w = size_hw(image_size)
    if entry is not None and (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        masks = Rows(entry / "masks.npy") if meta["masks"] else None
        return Rows(entry / "images.npy"), masks, np.asarray(meta["original_sizes"])

    images = np.zeros((len(cases), h, w, channels), np.uint8)
    masks = np.zeros((len(cases), h, w), np.uint8)
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
        with atomic_folder(entry) as tmp:  # concurrent jobs never read a half-written entry
            np.save(tmp / "images.npy", images)
            if has_masks:
                np.save(tmp / "masks.npy", masks)
            meta = {"masks": has_masks, "original_sizes": originals, "files": len(cases)}
            (tmp / "meta.json").write_text(json.dumps(meta))
        if (entry / "meta.json").is_file():  # rows from the file, not memory
            return load_arrays(cases, image_size, channels, entry)
    return images, (masks if has_masks else None), np.asarray(originals)


def cached_volume_stats(images: np.ndarray, groups: list[str], entry: Path | None) -> np.ndarray:
    """`volume_stats`, kept next to the cached arrays (percentiles of every volume cost seconds)."""
    path = entry / "volume_stats.npy" if entry is not None and entry.is_dir() else None
    if path is not None and path.is_file():
        return np.load(path)
    stats = volume_stats(images, groups)
    if path is not None:
        buffer = io.BytesIO()
        np.save(buffer, stats)
        atomic_write_bytes(path, buffer.getvalue())  # a concurrent reader sees all of it or none
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

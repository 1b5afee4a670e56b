"""Data: files on disk to validated cases, decoded and cached arrays, the DataModule, synthetic sets."""

from .arrays import Rows, cache_entry, filled_mask, load_arrays, read_image, size_hw, volume_stats
from .cases import Case, DataError, scan_hc18, scan_lgg, scan_listed, split_groups
from .datamodule import SegDataModule
from .synthetic import make_hc18, make_lgg

__all__ = [
    "Case",
    "DataError",
    "scan_hc18",
    "scan_lgg",
    "scan_listed",
    "split_groups",
    "Rows",
    "cache_entry",
    "filled_mask",
    "load_arrays",
    "read_image",
    "size_hw",
    "volume_stats",
    "SegDataModule",
    "make_hc18",
    "make_lgg",
]

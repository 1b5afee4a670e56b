"""Performance: speed settings chosen by measurement and the process runtime set-up."""

from .probe import PROBE_BATCH, Mode, autocast, extrapolate, probe_batches, probe_shape
from .runtime import (
    compile_net,
    configure_allocator,
    configure_threads,
    fuse_for_eval,
    loader_settings,
    usable_cores,
)
from .speed import CPU_PRECISIONS, Choice, compiler_available, parse_flag, resolve, save_cache

__all__ = [
    "PROBE_BATCH",
    "Mode",
    "autocast",
    "extrapolate",
    "probe_batches",
    "probe_shape",
    "compile_net",
    "configure_allocator",
    "configure_threads",
    "fuse_for_eval",
    "loader_settings",
    "usable_cores",
    "CPU_PRECISIONS",
    "Choice",
    "compiler_available",
    "parse_flag",
    "resolve",
    "save_cache",
]

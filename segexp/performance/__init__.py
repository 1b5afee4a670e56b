"""Performance: speed settings chosen by measurement and the process runtime set-up."""

from .runtime import (
    configure_allocator,
    configure_threads,
    fuse_for_eval,
    loader_settings,
    usable_cores,
)
from .speed import (
    CPU_PRECISIONS,
    PROBE_BATCH,
    Choice,
    autocast,
    compile_net,
    compiler_available,
    extrapolate,
    mode_name,
    parse_flag,
    probe_batches,
    probe_shape,
    resolve,
    save_cache,
)

__all__ = [
    "configure_allocator",
    "configure_threads",
    "fuse_for_eval",
    "loader_settings",
    "usable_cores",
    "CPU_PRECISIONS",
    "PROBE_BATCH",
    "Choice",
    "autocast",
    "compile_net",
    "compiler_available",
    "extrapolate",
    "mode_name",
    "parse_flag",
    "probe_batches",
    "probe_shape",
    "resolve",
    "save_cache",
]

"""How segexp sets up the process for training: threads, the allocator, DataLoader workers,
torch.compile and the BatchNorm-folded net for evaluation (what is measured: `speed`)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import platform

import torch
from torch import nn


def usable_cpus() -> list[int]:
    """The ids of the CPUs this process may run on (its affinity on Linux, else all of them)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return sorted(affinity(0)) if affinity else list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """How many CPU cores this process may run on."""
    return len(usable_cpus())


def loader_settings(device: str | torch.device, cores: int | None = None) -> dict:
    """DataLoader workers / pinning for training on `device` with `cores` CPU cores.

    On a CPU the workers take cores from the convolutions, and segexp's decoded-array cache
    makes loading cheap (`make bench`: 360-490 img/s in-process vs ~4 img/s of training at 256 px),
    so below 8 cores loading stays in the training process. A GPU needs its batches ready.
    """
    device = torch.device(device)
    cores = cores or usable_cores()
    workers = 0 if cores < 8 else 2
    if device.type == "cuda":
        workers = min(8, cores - 1)
    return {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": device.type == "cuda",
    }


def configure_threads(cores: int) -> None:
    """Intra-op threads = cores; one inter-op thread (these nets have no parallel branches)."""
    torch.set_num_threads(cores)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel op
        torch.set_num_interop_threads(1)


# glibc's mallopt parameter number, and the value segexp sets
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 1 << 20


def configure_allocator() -> bool:
    """On glibc, a fixed 1 MiB mmap threshold: freed activations go straight back to the OS.

    glibc raises its threshold to the size of every mmapped block freed (up to 32 MiB), after
    which a training step's 1-32 MiB tensors come from the heap, whose fragments stay resident:
    ~200 MB of peak RSS at unet_buda 256 px batch 16 fp32, at no measured cost in speed. A
    MALLOC_MMAP_THRESHOLD_ the user set is left alone. Returns whether it was set.
    """
    if platform.system() != "Linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def fuse_for_eval(net: nn.Module) -> nn.Module:
    """An eval-mode copy of `net` with each BatchNorm folded into the conv before it (fx)."""
    from torch.fx.experimental.optimization import fuse

    folded = fuse(copy.deepcopy(net).eval())
    if any(p.dim() == 4 and not p.is_contiguous() for p in net.parameters()):
        folded = folded.to(memory_format=torch.channels_last)  # folded weights come contiguous
    return folded


def compile_net(net: nn.Module) -> nn.Module:
    """torch.compile `net` in place (`Module.compile`): no `_orig_mod.` wrapper, so state_dict
    keys and checkpoints stay those of the eager net. Compiles lazily, on the first call."""
    net.compile()
    return net

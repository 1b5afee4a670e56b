"""Timing training steps: the few-second probe `speed.resolve` chooses precision and layout by.

Each mode is timed on a copy of the network at a shrunk input shape, at two batch sizes, and the
step time a + b * pixels extrapolated to the real batch: at batch 1 the per-step costs (bf16
weight casts, kernel set-up) hide bf16's gain (unet_buda 256 px batch 16 on EPYC: bf16 1.7x
faster, yet at 1 x 128 px fp32 looked as fast).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .runtime import compile_net

# Pixels per image in the probe: a forward + backward of unet_buda at 1 x 128 x 128 takes
# ~0.2 s on 2 EPYC cores. Each mode is timed at 1 and PROBE_BATCH such images.
PROBE_PIXELS = 128 * 128
PROBE_BATCH = 4
PROBE_ROUNDS = 2  # timed steps per mode after the warm-up, interleaved, best kept
# bf16 this much slower than fp32 in a one-conv micro-probe is emulated: not worth a full step.
EMULATED_RATIO = 4.0


@dataclass(frozen=True)
class Mode:
    """A precision and memory layout to train in; `name` keys the cache and the run tags."""

    precision: str  # a Lightning precision: 32-true, bf16-mixed, 16-mixed
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{self.precision}/{'channels_last' if self.channels_last else 'contiguous'}"


def autocast(precision: str, device: torch.device):
    """The autocast context Lightning uses for `precision` (none for 32-true)."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_shape(sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """(N, C, H, W) shrunk to ~PROBE_PIXELS by halving N then H and W (keeps U-Net divisibility)."""
    n, c, h, w = sample_shape
    while n * h * w > PROBE_PIXELS and n > 1:
        n = max(1, n // 2)
    while n * h * w > PROBE_PIXELS and h % 32 == 0 and w % 32 == 0:
        h, w = h // 2, w // 2
    return n, c, h, w


def probe_batches(sample_shape: tuple[int, ...]) -> tuple[int, int]:
    """The two batch sizes the probe times at probe_shape's image size (equal: no extrapolation)."""
    n, _, h, w = probe_shape(sample_shape)
    if (h, w) == tuple(sample_shape[2:]) and n == sample_shape[0]:
        return n, n  # the real shape is small enough to time as it is
    return n, min(sample_shape[0] * sample_shape[2] * sample_shape[3] // (h * w), PROBE_BATCH * n)


def train_step(
    net: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    mode: Mode,
    compiled: bool = False,
) -> Callable[[], None]:
    """One forward + backward of a copy of `net` on random input (the optimizer step is the same
    fp32 update in every mode, so it is left out)."""
    net = copy.deepcopy(net).to(device).train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device)
    if mode.channels_last:
        net, x = (
            net.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    if compiled:
        compile_net(net)

    def step() -> None:
        for p in net.parameters():
            p.grad = None
        with autocast(mode.precision, device):
            out = net(x)
        out.float().square().mean().backward()
        sync(device)

    return step


def best_times(steps: dict, rounds: int) -> dict:
    """Best seconds per step of each, interleaved round by round so load hits all alike."""
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bf16_emulated(device: torch.device) -> bool:
    """Whether a bf16 conv runs EMULATED_RATIO x slower than fp32 (a ~50 ms micro-probe)."""
    if device.type != "cpu":
        return False
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 32, 32)

    def run(precision):
        def step():
            with torch.no_grad(), autocast(precision, device):
                conv(x)

        return step

    times = best_times({"fp32": run("32-true"), "bf16": run("bf16-mixed")}, rounds=3)
    return times["bf16"] > EMULATED_RATIO * times["fp32"]


def extrapolate(small: float, large: float, batches: tuple[int, int], sample_shape) -> float:
    """img/s at the real shape from step seconds at the two probe batches: t = a + b * pixels."""
    n0, n1 = batches
    if n1 == n0:
        return n0 / small
    per_image = (large - small) / (n1 - n0)
    if per_image <= 0:  # load noise swamped the difference: no fixed cost to separate
        per_image = large / n1
    fixed = max(small - per_image * n0, 0.0)
    n, _, h, w = sample_shape
    _, _, ph, pw = probe_shape(sample_shape)
    return n / (fixed + per_image * n * (h * w) / (ph * pw))


def probe(
    net: nn.Module, sample_shape: tuple[int, ...], device: torch.device, modes: list[Mode]
) -> dict[Mode, float]:
    """Train img/s of each mode, extrapolated to the real shape from two probe batches (each
    warmed up, then the best of interleaved rounds)."""
    _, c, h, w = probe_shape(sample_shape)
    batches = probe_batches(sample_shape)
    steps = {}
    for mode in modes:
        for n in sorted(set(batches)):
            step = train_step(net, (n, c, h, w), device, mode)
            step()  # warm-up: oneDNN / cuDNN pick and build their kernels
            steps[(mode, n)] = step
    best = best_times(steps, PROBE_ROUNDS)
    return {
        mode: extrapolate(best[(mode, batches[0])], best[(mode, batches[1])], batches, sample_shape)
        for mode in modes
    }


def probe_compile(
    net: nn.Module, sample_shape: tuple[int, ...], device: torch.device, mode: Mode
) -> dict[str, float]:
    """Seconds torch.compile takes (first step) and its speed-up over eager at the larger probe
    batch: {"seconds", "speedup"}, as the cache keeps them."""
    _, c, h, w = probe_shape(sample_shape)
    shape = (probe_batches(sample_shape)[1], c, h, w)
    eager = train_step(net, shape, device, mode)
    eager()
    compiled = train_step(net, shape, device, mode, compiled=True)
    start = time.perf_counter()
    compiled()
    seconds = time.perf_counter() - start
    times = best_times({"eager": eager, "compiled": compiled}, PROBE_ROUNDS + 1)
    return {"seconds": seconds, "speedup": times["eager"] / times["compiled"]}

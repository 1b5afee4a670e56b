"""Speed settings chosen by measurement: precision, channels-last, torch.compile.

`resolve` answers `auto` with what a short probe of this network, extrapolated to this input
shape, measures fastest on this machine: CPU flags do not predict it (an Intel Xeon with AVX-512 BF16
trained 28% slower in bf16, an AMD EPYC with the same flag 3x faster). Probe figures are cached
as JSON per machine, torch version and model shape, so a machine probes each model once.
Explicit values are taken as they are; when nothing is `auto` nothing is probed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

AUTO = "auto"
CPU_PRECISIONS = ("32-true", "bf16-mixed")
# Pixels per image in the probe: a forward + backward of unet_buda at 1 x 128 x 128 takes
# ~0.2 s on 2 EPYC cores. Each mode is timed at 1 and PROBE_BATCH such images and the step time
# a + b * pixels extrapolated to the real batch: at batch 1 the per-step costs (bf16 weight
# casts, kernel set-up) hide bf16's gain (unet_buda 256 px batch 16 on EPYC: bf16 1.7x faster,
# yet at 1 x 128 px fp32 looked as fast).
PROBE_PIXELS = 128 * 128
PROBE_BATCH = 4
PROBE_VERSION = 2  # part of the cache key: bump when what the probe measures changes
PROBE_ROUNDS = 2  # timed steps per mode after the warm-up, interleaved, best kept
# bf16 this much slower than fp32 in a one-conv micro-probe is emulated: not worth a full step.
EMULATED_RATIO = 4.0
COMPILE_MIN_SPEEDUP = 1.10  # below this the measured gain is within the noise of a shared CPU
# A compile probe costs about a minute (twice: at probe shape, then at the training shape), so
# `compile=auto` measures it only for runs expected to take longer than this without it.
COMPILE_PROBE_MIN_RUN_S = 1800.0


@dataclass(frozen=True)
class Choice:
    """Resolved speed settings, and the figures behind them (flat keys, to log as run tags)."""

    precision: str  # a Lightning precision: 32-true, bf16-mixed, 16-mixed
    channels_last: bool
    compile: bool
    figures: dict[str, str] = field(default_factory=dict)


def mode_name(precision: str, channels_last: bool) -> str:
    return f"{precision}/{'channels_last' if channels_last else 'contiguous'}"


def parse_flag(value, name: str) -> bool | str:
    """True, False or `auto` from a config value (bool or the strings true/false/auto)."""
    if isinstance(value, bool) or value == AUTO:
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"{name}={value!r}: expected true, false or auto")


def machine(device: torch.device) -> str:
    """What the probe's figures depend on besides torch and the model: processor and threads."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model, flags = platform.processor() or "cpu", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
    return f"{model} [{' '.join(isa)}] x{torch.get_num_threads()}"


def cache_key(net: nn.Module, sample_shape: tuple[int, ...], device: torch.device) -> str:
    """Hash of machine, torch version, the net's class and parameter shapes, and input shape."""
    shapes = [list(p.shape) for p in net.parameters()]
    what = [PROBE_VERSION, machine(device), torch.__version__, type(net).__qualname__, shapes]
    what.append(list(sample_shape))
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]


def load_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_cache(path: Path, entry: dict) -> None:
    """Write atomically: parallel sweep jobs may probe the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entry, indent=1, sort_keys=True))
    os.replace(tmp, path)


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


def train_step(
    net: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    precision: str,
    channels_last: bool,
    compiled: bool = False,
) -> Callable[[], None]:
    """One forward + backward of a copy of `net` on random input (the optimizer step is the same
    fp32 update in every mode, so it is left out)."""
    net = copy.deepcopy(net).to(device).train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device)
    if channels_last:
        net, x = (
            net.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    if compiled:
        compile_net(net)

    def step() -> None:
        for p in net.parameters():
            p.grad = None
        with autocast(precision, device):
            out = net(x)
        out.float().square().mean().backward()
        sync(device)

    return step


def best_times(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
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


def probe_batches(sample_shape: tuple[int, ...]) -> tuple[int, int]:
    """The two batch sizes the probe times at probe_shape's image size (equal: no extrapolation)."""
    n, _, h, w = probe_shape(sample_shape)
    if (h, w) == tuple(sample_shape[2:]) and n == sample_shape[0]:
        return n, n  # the real shape is small enough to time as it is
    return n, min(sample_shape[0] * sample_shape[2] * sample_shape[3] // (h * w), PROBE_BATCH * n)


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
    net: nn.Module,
    sample_shape: tuple[int, ...],
    device: torch.device,
    precisions: list[str],
    layouts: list[bool],
) -> dict[str, float]:
    """Train img/s of each precision x layout, extrapolated to the real shape from two probe
    batches (each warmed up, then the best of interleaved rounds)."""
    _, c, h, w = probe_shape(sample_shape)
    batches = probe_batches(sample_shape)
    steps = {}
    for precision in precisions:
        for channels_last in layouts:
            for n in sorted(set(batches)):
                step = train_step(net, (n, c, h, w), device, precision, channels_last)
                step()  # warm-up: oneDNN / cuDNN pick and build their kernels
                steps[(mode_name(precision, channels_last), n)] = step
    best = best_times(steps, PROBE_ROUNDS)
    return {
        mode: extrapolate(best[(mode, batches[0])], best[(mode, batches[1])], batches, sample_shape)
        for mode, _ in best
    }


def probe_compile(
    net: nn.Module, sample_shape: tuple[int, ...], device: torch.device, precision: str, cl: bool
) -> dict[str, float]:
    """Seconds torch.compile takes (first step) and its speed-up over eager at the larger probe
    batch."""
    _, c, h, w = probe_shape(sample_shape)
    shape = (probe_batches(sample_shape)[1], c, h, w)
    eager = train_step(net, shape, device, precision, cl)
    eager()
    compiled = train_step(net, shape, device, precision, cl, compiled=True)
    start = time.perf_counter()
    compiled()
    seconds = time.perf_counter() - start
    times = best_times({"eager": eager, "compiled": compiled}, PROBE_ROUNDS + 1)
    return {"seconds": seconds, "speedup": times["eager"] / times["compiled"]}


def compiler_available() -> bool:
    """Inductor on a CPU writes C++ and needs a compiler; on CUDA it needs Triton."""
    if torch.cuda.is_available():
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def rule_precision(device: torch.device) -> str:
    """On CUDA the choice needs no probe: bf16 autocast from Ampere on, fp16 before."""
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_compile(value, entry: dict, net, sample_shape, device, mode: str, seconds):
    """`compile=auto`: on where a measured speed-up repays twice the compile time in this run."""
    if value != AUTO:
        return value, {}
    if not compiler_available():
        return False, {"speed.compile_reason": "no compiler toolchain for inductor"}
    measured = entry.setdefault("compile", {}).get(mode)
    if measured is None and seconds is not None and seconds >= COMPILE_PROBE_MIN_RUN_S:
        precision, layout = mode.split("/")
        measured = probe_compile(net, sample_shape, device, precision, layout == "channels_last")
        entry["compile"][mode] = measured
    if measured is None:
        reason = f"not measured: run shorter than {COMPILE_PROBE_MIN_RUN_S:.0f} s or unknown"
        return False, {"speed.compile_reason": reason}
    figures = {
        "speed.compile_seconds": f"{measured['seconds']:.1f}",
        "speed.compile_speedup": f"{measured['speedup']:.2f}",
    }
    saving = seconds * (1 - 1 / measured["speedup"]) if seconds else 0.0
    # compile runs twice: once at the probe shape (cached), once at the training shape
    on = measured["speedup"] >= COMPILE_MIN_SPEEDUP and saving > 2 * measured["seconds"]
    figures["speed.compile_reason"] = (
        f"speed-up {measured['speedup']:.2f}, saves {saving:.0f} s"
        f" vs compile {measured['seconds']:.0f} s"
    )
    return on, figures


def resolve(
    precision: str,
    performance,
    net: nn.Module,
    sample_shape: tuple[int, ...],
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
    run_images: int | None = None,
) -> Choice:
    """Precision, channels-last and compile for training `net` on batches of `sample_shape`.

    performance: a mapping with `channels_last` and `compile` (each true, false or auto).
    run_images: images the run will train on (epochs x training set), to judge whether a
        compile pays for itself; without it `compile=auto` stays off.
    """
    device = torch.device(device)
    channels_last = parse_flag(performance.get("channels_last", AUTO), "channels_last")
    compiled = parse_flag(performance.get("compile", AUTO), "compile")
    figures: dict[str, str] = {}
    if precision == AUTO and device.type == "cuda":
        precision = rule_precision(device)
        figures["speed.precision_from"] = "rule: cuda bf16 support"
    if AUTO not in (precision, channels_last, compiled):
        return Choice(precision, channels_last, compiled, {**figures, "speed.source": "explicit"})
    precisions = list(CPU_PRECISIONS) if precision == AUTO else [precision]
    layouts = [False, True] if channels_last == AUTO else [channels_last]
    path = Path(cache_dir) / "speed" / f"{cache_key(net, sample_shape, device)}.json"
    entry, start = load_cache(path), time.perf_counter()
    measured = entry.setdefault("img_s", {})
    source = "cache"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if any(mode_name(p, cl) not in measured for p in precisions for cl in layouts):
            source = "probe"
            if len(precisions) > 1 and "bf16_emulated" not in entry:
                entry["bf16_emulated"] = bf16_emulated(device)
        if len(precisions) > 1 and entry.get("bf16_emulated"):
            precisions.remove("bf16-mixed")
            figures["speed.bf16"] = "skipped: emulated (micro-probe)"
        if any(mode_name(p, cl) not in measured for p in precisions for cl in layouts):
            measured.update(probe(net, sample_shape, device, precisions, layouts))
            entry.update(machine=machine(device), torch=torch.__version__)
        wanted = [mode_name(p, cl) for p in precisions for cl in layouts]
        candidates = {m: measured[m] for m in wanted if m in measured}
        best = max(candidates, key=candidates.get)
        seconds = run_images / candidates[best] if run_images else None
        compiled, compile_figures = resolve_compile(
            compiled, entry, net, sample_shape, device, best, seconds
        )
    save_cache(path, entry)
    figures.update(compile_figures)
    figures.update({f"speed.img_s.{m}": f"{v:.2f}" for m, v in candidates.items()})
    figures.update(
        {
            "speed.source": source,
            "speed.probe_seconds": f"{time.perf_counter() - start:.1f}",
            "speed.probe_shape": "{} and {} x {}x{}x{}".format(
                *probe_batches(sample_shape), *probe_shape(sample_shape)[1:]
            ),
            "speed.machine": machine(device),
            "speed.choice": best + (" +compile" if compiled else ""),
        }
    )
    precision, layout = best.split("/")
    return Choice(precision, layout == "channels_last", compiled, figures)


def compile_net(net: nn.Module) -> nn.Module:
    """torch.compile `net` in place (`Module.compile`): no `_orig_mod.` wrapper, so state_dict
    keys and checkpoints stay those of the eager net. Compiles lazily, on the first call."""
    net.compile()
    return net

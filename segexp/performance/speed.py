"""Speed settings chosen by measurement: precision, channels-last, torch.compile.

`resolve` answers `auto` with what a short probe (`probe`) of this network, extrapolated to this
input shape, measures fastest on this machine: CPU flags do not predict it (an Intel Xeon with AVX-512 BF16
trained 28% slower in bf16, an AMD EPYC with the same flag 3x faster). Probe figures are cached
as JSON per machine, torch version and model shape, so a machine probes each model once.
Explicit values are taken as they are; when nothing is `auto` nothing is probed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from torch import nn

from segexp.files import atomic_write_text, file_lock

from .probe import Mode, bf16_emulated, probe, probe_batches, probe_compile, probe_shape
from .runtime import usable_cpus

AUTO = "auto"
CPU_PRECISIONS = ("32-true", "bf16-mixed")
PROBE_VERSION = 2  # part of the cache key: bump when what the probe measures changes
# A CPU probe during which other processes kept more than this share of our cores busy shared
# them (2-core Xeon: 0-0.11 idle, 0.28-0.38 beside one busy process; beside a training resnet18
# bf16 timed at 4.2 img/s against 49 idle): its figures are used for this run, never cached.
CONTENDED_SHARE = 0.25
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
    atomic_write_text(path, json.dumps(entry, indent=1, sort_keys=True))


def compiler_available() -> bool:
    """Inductor on a CPU writes C++ and needs a compiler; on CUDA it needs Triton."""
    if torch.cuda.is_available():
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def rule_precision() -> str:
    """On CUDA the choice needs no probe: bf16 autocast from Ampere on, fp16 before."""
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_compile(value, entry: dict, net, sample_shape, device, mode: Mode, seconds):
    """`compile=auto`: on where a measured speed-up repays twice the compile time in this run."""
    if value != AUTO:
        return value, {}
    if not compiler_available():
        return False, {"speed.compile_reason": "no compiler toolchain for inductor"}
    measured = entry.setdefault("compile", {}).get(mode.name)
    if measured is None and seconds is not None and seconds >= COMPILE_PROBE_MIN_RUN_S:
        measured = probe_compile(net, sample_shape, device, mode)
        entry["compile"][mode.name] = measured
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


def busy_seconds(cpus: list[int]) -> tuple[float, float]:
    """CPU seconds spent so far on `cpus` by every process (idle and I/O wait left out), and by
    this one."""
    per_cpu = psutil.cpu_times(percpu=True)
    machine_busy = sum(
        sum(per_cpu[i]) - per_cpu[i].idle - getattr(per_cpu[i], "iowait", 0.0) for i in cpus
    )
    own = psutil.Process().cpu_times()
    return machine_busy, own.user + own.system


def others_share_of(run):
    """`run()`'s result and the share of this process's CPUs that other processes kept busy
    meanwhile (about 0 on an idle machine)."""
    online = len(psutil.cpu_times(percpu=True))  # psutil lists online CPUs in id order
    cpus = [i for i in usable_cpus() if i < online] or list(range(online))
    wall, (busy, own) = time.perf_counter(), busy_seconds(cpus)
    result = run()
    elapsed = max(time.perf_counter() - wall, 1e-9)
    busy_after, own_after = busy_seconds(cpus)
    others = (busy_after - busy) - (own_after - own)
    return result, max(others, 0.0) / (elapsed * len(cpus))


def measure_modes(
    entry: dict, net: nn.Module, sample_shape, device, modes: list[Mode], figures: dict
) -> tuple[dict[Mode, float], str]:
    """img/s of `modes` from the cache `entry`, probing (into `entry`) when it lacks one.

    Also where they came from: `cache`, `probe`, or `probe (contended)` when a CPU probe shared
    the cores with other work (then nothing it measured is kept in `entry`). Where the precision
    is a choice and a micro-probe finds bf16 emulated, bf16 modes are left out (in `figures`).
    """
    measured = entry.setdefault("img_s", {})  # by Mode.name, as old caches have them
    source, fresh = "cache", {}
    choosing_precision = len({m.precision for m in modes}) > 1
    if any(m.name not in measured for m in modes):
        source = "probe"
        if choosing_precision and "bf16_emulated" not in entry:
            fresh["bf16_emulated"] = bf16_emulated(device)
    if choosing_precision and {**entry, **fresh}.get("bf16_emulated"):
        modes = [m for m in modes if m.precision != "bf16-mixed"]
        figures["speed.bf16"] = "skipped: emulated (micro-probe)"
    if any(m.name not in measured for m in modes):
        found, others = others_share_of(lambda: probe(net, sample_shape, device, modes))
        if device.type == "cpu" and others > CONTENDED_SHARE:
            figures["speed.contended"] = f"others used {others:.2f} of the cpus: not cached"
            print(
                f"speed probe shared the CPU: other processes used {others:.0%} of it meanwhile; "
                "its choice is used for this run, not cached (trainer.precision pins it)"
            )
            return found, "probe (contended)"  # the probe timed every mode asked for
        measured.update({m.name: v for m, v in found.items()})
        entry.update(machine=machine(device), torch=torch.__version__)
    entry.update(fresh)
    return {m: measured[m.name] for m in modes if m.name in measured}, source


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
        precision = rule_precision()
        figures["speed.precision_from"] = "rule: cuda bf16 support"
    if AUTO not in (precision, channels_last, compiled):
        return Choice(precision, channels_last, compiled, {**figures, "speed.source": "explicit"})
    modes = [
        Mode(p, cl)
        for p in (CPU_PRECISIONS if precision == AUTO else [precision])
        for cl in ([False, True] if channels_last == AUTO else [channels_last])
    ]
    path = Path(cache_dir) / "speed" / f"{cache_key(net, sample_shape, device)}.json"
    # one probe at a time per cache: a sweep's parallel jobs wait (idle) for the first one's
    # clean probe and read its figures, instead of all probing at once beside each other
    with (
        file_lock(path.parent / ".probe.lock"),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        entry, start = load_cache(path), time.perf_counter()  # the probe's time, not the wait
        candidates, source = measure_modes(entry, net, sample_shape, device, modes, figures)
        best = max(candidates, key=candidates.get)
        seconds = run_images / candidates[best] if run_images else None
        compiled, compile_figures = resolve_compile(
            compiled, entry, net, sample_shape, device, best, seconds
        )
        save_cache(path, entry)
    figures.update(compile_figures)
    figures.update({f"speed.img_s.{m.name}": f"{v:.2f}" for m, v in candidates.items()})
    figures.update(
        {
            "speed.source": source,
            "speed.probe_seconds": f"{time.perf_counter() - start:.1f}",
            "speed.probe_shape": "{} and {} x {}x{}x{}".format(
                *probe_batches(sample_shape), *probe_shape(sample_shape)[1:]
            ),
            "speed.machine": machine(device),
            "speed.choice": best.name + (" +compile" if compiled else ""),
        }
    )
    return Choice(best.precision, best.channels_last, compiled, figures)

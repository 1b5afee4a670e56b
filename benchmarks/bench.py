"""`make bench`: segexp against the reference LGG trainer, head to head, and what bounds both.

On synthetic kaggle_3m data at the seed-004 config (`experiment=lgg_buda_1`: unet_buda, 256 px,
batch 16) it prints, in one process and on the same batches: the reference trainer's own loop
(`benchmarks/reference.py`); segexp's net, loss and optimizer in a bare loop for every precision
x layout x compile; real `segexp train` runs with auto settings and with plain fp32, their peak
RSS and end-to-end img/s (dataset preparation, probe, compile and validation included); the
DataLoader alone; eval with BatchNorm folded; a conv + matmul peak; what a `segexp blame`
costs at this speed. Steps are interleaved across contenders and the best step kept, so load from
other processes hits all alike. The last line sums it up; `parse_summary` reads it back.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import reference
from benchmarks.bounds import PeakRSS, omp_policies, peak_gflops
from benchmarks.race import Contender, contender_name, race, segexp_contender
from segexp import config
from segexp.data import make_lgg
from segexp.models import build_net
from segexp.performance import Mode, runtime, speed
from segexp.train import build_datamodule, train

LGG = ["experiment=lgg_buda_1", "dataset=lgg_synthetic", "dataset.val_count=1"]
# kaggle_3m: 3,788 slices that segexp loads from 110 patients, 10 of them validation.
LGG_TRAIN_IMAGES = round(3788 * 100 / 110)
BLAME = {"k=3 full factorial": 8, "k=6 fractional 2^(6-2)": 16}  # cells; 2 seeds per cell


def compose(work_dir: Path, *overrides: str) -> DictConfig:
    """conf/train.yaml with `overrides`, as `segexp train` composes it, working in `work_dir`."""
    return config.compose([f"work_dir={work_dir}", *overrides])


def row(what: str, value: str) -> None:
    print(f"{what:60s} {value}", flush=True)


@dataclass(frozen=True)
class RunFigures:
    """A real `segexp train`: epoch 1's img/s, end-to-end img/s, peak RSS, the speed choice."""

    steady: float
    e2e: float
    rss_mb: float
    choice: str


def segexp_run(work_dir: Path, overrides: list[str], batches: int) -> RunFigures:
    """A real `segexp train` of 2 short epochs: steady img/s, end-to-end img/s, peak RSS."""
    store = Path(tempfile.mkdtemp(prefix="store-", dir=work_dir))
    cfg = compose(
        store,
        *overrides,
        "trainer.max_epochs=2",
        f"+trainer.limit_train_batches={batches}",
        "+trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        f"dataset.cache_dir={work_dir / 'cache'}",  # decoded arrays and speed probes, shared
    )
    with PeakRSS() as rss:
        start = time.perf_counter()
        run_id = train(cfg).run_id
        seconds = time.perf_counter() - start
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "time/steady_images_per_second")
    tags = client.get_run(run_id).data.tags
    return RunFigures(
        steady={m.step: m.value for m in history}[1],
        e2e=2 * batches * cfg.dataset.batch_size / seconds,
        rss_mb=rss.mb,
        choice=tags.get("speed.choice") or f"{tags.get('segexp.precision')}",
    )


def loader_throughput(datamodule, workers: int, batches: int) -> float:
    """img/s of the training DataLoader alone (decode cache, augmentation, collation)."""
    datamodule.num_workers = workers
    start, images = time.perf_counter(), 0
    for i, batch in enumerate(datamodule.train_dataloader()):
        images += len(batch["image"])
        if i + 1 >= batches:
            break
    return images / (time.perf_counter() - start)


def eval_throughput(cfg: DictConfig, batch: dict) -> tuple[float, float]:
    """Eval img/s in fp32 channels-last: eager vs BatchNorm folded into the convs."""
    net = build_net(cfg.model).eval().to(memory_format=torch.channels_last)
    image = batch["image"].contiguous(memory_format=torch.channels_last)
    nets = {"eager": net, "folded": runtime.fuse_for_eval(net)}
    best = dict.fromkeys(nets, float("inf"))
    with torch.no_grad():
        for _ in range(3):
            for name, n in nets.items():
                start = time.perf_counter()
                n(image)
                best[name] = min(best[name], time.perf_counter() - start)
    return len(image) / best["eager"], len(image) / best["folded"]


def format_summary(summary: dict[str, float]) -> str:
    return "bench: " + " ".join(f"{k}={v:.2f}" for k, v in summary.items())


def parse_summary(text: str) -> dict[str, float]:
    """The figures of the bench's last `bench: key=value ...` line."""
    line = next(x for x in reversed(text.strip().splitlines()) if x.startswith("bench: "))
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in line.split()[1:])}


# ---------------------------------------------------------------- the bench, section by section


@dataclass(frozen=True)
class Bounds:
    """Peak GFLOP/s by dtype (`fp32`, `bf16`) and img/s by OpenMP wait policy."""

    peak: dict[str, float]
    omp: dict[str, float]


def bound_rows() -> Bounds:
    """The machine, its matmul + conv peak and the OpenMP wait policies."""
    peak = {"fp32": peak_gflops(torch.float32), "bf16": peak_gflops(torch.bfloat16)}
    row(f"{speed.machine(torch.device('cpu'))}; torch {torch.__version__}; no GPU measured", "")
    row(
        "peak GFLOP/s (matmul + conv, best): fp32 / bf16",
        f"{peak['fp32']:.0f} / {peak['bf16']:.0f}",
    )
    omp = omp_policies()
    row(
        f"OpenMP wait policy, {torch.get_num_threads()} threads: img/s ACTIVE / PASSIVE",
        f"{omp['ACTIVE']:.2f} / {omp['PASSIVE']:.2f} (1x128 px steps, separate processes)",
    )
    return Bounds(peak, omp)


def train_rows(work_dir: Path, overrides: list[str], batches: int) -> dict[str, RunFigures]:
    """Real runs: auto everything; fp32 forced, as on a CPU without fast bf16, the rest auto."""
    runs = {}
    for name, extra in {"auto": [], "32-true": ["trainer.precision=32-true"]}.items():
        runs[name] = r = segexp_run(work_dir, [*overrides, *extra], batches)
        row(
            f"segexp train {name} ({r.choice}): steady / e2e img/s, peak RSS",
            f"{r.steady:.2f} / {r.e2e:.2f}, {r.rss_mb:.0f} MB",
        )
    return runs


@dataclass(frozen=True)
class DataFigures:
    """The shared training batches, loader img/s in process, GFLOP per image per train step."""

    batches: list[dict]
    loader_img_s: float
    gflop: float


def data_rows(cfg: DictConfig, batches: int) -> DataFigures:
    """The DataLoader alone, the FLOPs of a train step, eager vs BatchNorm-folded eval."""
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    loaders = {w: loader_throughput(datamodule, w, batches) for w in (0, 1, 2)}
    row("loader img/s, workers 0 / 1 / 2", " / ".join(f"{v:.1f}" for v in loaders.values()))
    datamodule.num_workers = 0
    shared = [b for _, b in zip(range(batches), datamodule.train_dataloader(), strict=False)]
    counter = FlopCounterMode(display=False)
    with counter:
        net = build_net(cfg.model)
        loss = config.instantiate(cfg.loss, "loss")(net(shared[0]["image"]), shared[0]["mask"])
        loss.backward()
    gflop = counter.get_total_flops() / len(shared[0]["image"]) / 1e9
    row("GFLOP per image per train step (fwd + bwd)", f"{gflop:.1f}")
    eager, folded = eval_throughput(cfg, shared[0])
    row("eval img/s fp32 channels-last: eager / BN folded", f"{eager:.2f} / {folded:.2f}")
    return DataFigures(shared, loaders[0], gflop)


@dataclass(frozen=True)
class RaceFigures:
    """Train img/s by contender, and what `speed.resolve` picks with everything auto and fp32."""

    img_s: dict[str, float]
    reference: str  # the reference trainer's name in img_s
    best: str  # the fastest segexp contender
    auto: speed.Choice
    fp32: speed.Choice
    compile_seconds: float  # auto's mode: compiled first step less an eager step; nan: none


def resolve_auto(cfg: DictConfig, shape, work_dir: Path, precision: str, compiled: str):
    """`speed.resolve` as `segexp train` calls it for this config (probes cached in work_dir)."""
    performance = {"channels_last": "auto", "compile": compiled}
    net, images = build_net(cfg.model), cfg.trainer.max_epochs * LGG_TRAIN_IMAGES
    return speed.resolve(precision, performance, net, shape, work_dir / "cache", run_images=images)


def race_rows(cfg: DictConfig, batches: list[dict], work_dir: Path, compiled: bool) -> RaceFigures:
    """The reference loop against segexp's every precision x layout (x compile), interleaved."""
    shape = tuple(batches[0]["image"].shape)
    auto = resolve_auto(cfg, shape, work_dir, "auto", "auto")
    figures = auto.figures
    row(
        "speed.resolve: choice (probe s)",
        f"{figures['speed.choice']} ({figures['speed.probe_seconds']})",
    )
    ref = Contender("reference (fp32, its loop)", None)
    trainer = reference.ReferenceTrainer(cfg.optimizer.lr, cfg.seed, cfg.dataset.channels)
    ref.step = lambda b: trainer.step(b["image"], b["mask"])
    grid = [
        segexp_contender(cfg, Mode(p, cl), c)
        for c in ((False, True) if compiled else (False,))
        for p in speed.CPU_PRECISIONS
        for cl in (False, True)
    ]
    with PeakRSS() as rss:
        race([ref, *grid], batches)
    img_s = {c.name: len(batches[0]["image"]) / c.best for c in [ref, *grid]}
    for c in [ref, *grid]:
        note = f", first step {c.first:.1f} s" if c.compiled else ""
        row(f"train img/s {c.name}", f"{img_s[c.name]:.2f} ({c.rss_mb:.0f} MB peak RSS{note})")
    row("peak RSS of the race (all contenders resident)", f"{rss.mb:.0f} MB")
    best = max((c.name for c in grid), key=img_s.get)
    row("best combination in the race", best)
    mode = Mode(auto.precision, auto.channels_last)
    auto_compiled = next((c for c in grid if c.name == contender_name(mode, True)), None)
    eager_step = len(batches[0]["image"]) / img_s[mode.name]
    return RaceFigures(
        img_s,
        ref.name,
        best,
        auto,
        resolve_auto(cfg, shape, work_dir, "32-true", "false"),  # a CPU without fast bf16
        auto_compiled.first - eager_step if auto_compiled else math.nan,
    )


def summarize(bounds: Bounds, runs: dict[str, RunFigures], data: DataFigures, r: RaceFigures):
    """The bench's figures of merit, as its last line prints them."""
    mode = Mode(r.auto.precision, r.auto.channels_last)
    auto_img_s = r.img_s.get(contender_name(mode, r.auto.compile), r.img_s[mode.name])
    compiled = r.img_s.get(contender_name(mode, True))
    reference_img_s = r.img_s[r.reference]
    peak = bounds.peak["bf16" if "bf16" in r.best else "fp32"]
    return {
        # interleaved on the same batches: the fair comparison
        "vs_reference": auto_img_s / reference_img_s,
        "fp32_vs_reference": r.img_s[Mode("32-true", r.fp32.channels_last).name] / reference_img_s,
        # a whole `segexp train` (Lightning, MLflow, data preparation, probe, validation) timed
        # before the race, not interleaved with it
        "vs_reference_e2e": runs["auto"].e2e / reference_img_s,
        "auto_vs_best": auto_img_s / r.img_s[r.best],
        "compile_speedup": compiled / r.img_s[mode.name] if compiled else math.nan,
        "compile_seconds": r.compile_seconds,
        "peak_share": data.gflop * r.img_s[r.best] / peak,
        "loader_margin": data.loader_img_s / runs["auto"].steady,
        "rss_gb": runs["auto"].rss_mb / 1024,
        "omp_passive_speedup": bounds.omp["PASSIVE"] / max(bounds.omp["ACTIVE"], 1e-9),
    }


def blame_rows(cfg: DictConfig, steady: float) -> None:
    """What a `segexp blame` of LGG trainings costs at segexp's steady img/s."""
    for what, cells in BLAME.items():
        trainings = cells * 2
        minutes = trainings * cfg.trainer.max_epochs * LGG_TRAIN_IMAGES / steady / 60
        row(
            f"blame {what}: trainings, est. minutes (LGG, {cfg.trainer.max_epochs} ep)",
            f"{trainings}, {minutes:.0f}",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    parser.add_argument("--batches", type=int, default=4, help="train batches, the first untimed")
    parser.add_argument("--work-dir", default=None, help="default: a temp dir, removed after")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="segexp-bench-"))
    runtime.configure_allocator()  # as `segexp train` does, for every figure alike
    bounds = bound_rows()
    root = work_dir / "data" / "lgg"
    if not root.exists():
        make_lgg(root, n=4, seed=0, size=256, slices=(20, 24))
    overrides = [*LGG, f"dataset.root={root}"]
    runs = train_rows(work_dir, overrides, args.batches)
    cfg = compose(work_dir, *overrides, f"dataset.cache_dir={work_dir / 'cache'}")
    data = data_rows(cfg, args.batches)
    compile_too = not args.no_compile and speed.compiler_available()
    figures = race_rows(cfg, data.batches, work_dir, compile_too)
    summary = summarize(bounds, runs, data, figures)
    blame_rows(cfg, runs["auto"].steady)
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

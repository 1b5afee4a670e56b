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
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow import MlflowClient
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import reference
from segexp.config import CONFIG_DIR
from segexp.data import synthetic
from segexp.models import build_net
from segexp.performance import runtime, speed
from segexp.train import build_datamodule, train

LGG = ["experiment=lgg_buda_1", "dataset=lgg_synthetic", "dataset.val_count=1"]
# kaggle_3m: 3,788 slices that segexp loads from 110 patients, 10 of them validation.
LGG_TRAIN_IMAGES = round(3788 * 100 / 110)
BLAME = {"k=3 full factorial": 8, "k=6 fractional 2^(6-2)": 16}  # cells; 2 seeds per cell


def config(work_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"work_dir={work_dir}", *overrides])


class PeakRSS:
    """Highest resident set size (MB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.mb, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.mb = max(self.mb, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, rss_mb())


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def peak_gflops(dtype: torch.dtype, repeats: int = 3) -> float:
    """Best GFLOP/s of warmed-up matmuls (512-2048) and 3x3 convs (64-256 ch, channels-last)."""
    best = 0.0

    def measure(fn, flops):
        nonlocal best
        fn()  # warm-up: oneDNN builds its kernels
        for _ in range(repeats):
            start, count = time.perf_counter(), 0
            while count < 3 or time.perf_counter() - start < 0.2:
                fn()
                count += 1
            best = max(best, flops * count / (time.perf_counter() - start) / 1e9)
        return time.perf_counter() - start

    with torch.no_grad():
        for n in (512, 1024, 2048):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            if measure(lambda a=a, b=b: a @ b, 2 * n**3) > 2.0:
                break  # emulated dtype: bigger shapes would stall the bench
        for c, size in ((64, 64), (128, 32), (256, 32)):
            conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(dtype)
            conv = conv.to(memory_format=torch.channels_last)
            x = (
                torch.randn(8, c, size, size)
                .to(dtype)
                .contiguous(memory_format=torch.channels_last)
            )
            if measure(lambda conv=conv, x=x: conv(x), 2 * 8 * c * c * 9 * size * size) > 2.0:
                break
    return best


# One fp32 channels-last train step of unet_buda at 1 x 3 x 128 x 128, best of 3, in img/s.
OMP_PROBE = """
import time, torch
from segexp import speed
from segexp.models import UNet
net = UNet(3, 1, [32, 64, 128, 256, 512], batch_norm=True)
step = speed.train_step(net, (1, 3, 128, 128), torch.device("cpu"), "32-true", True)
step()
times = []
for _ in range(3):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
print(1 / min(times))
"""


def omp_policies(rounds: int = 2) -> dict[str, float]:
    """img/s with OpenMP threads spinning (ACTIVE) vs sleeping (PASSIVE) at barriers.

    Fresh processes, since OpenMP reads the policy once; interleaved, best kept.
    """
    best = {"ACTIVE": 0.0, "PASSIVE": 0.0}
    for _ in range(rounds):
        for policy in best:
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            out = subprocess.run(
                [sys.executable, "-c", OMP_PROBE], env=env, capture_output=True, text=True
            )
            if out.returncode == 0:
                best[policy] = max(best[policy], float(out.stdout.split()[-1]))
    return best


class Contender:
    """One training loop on the shared batches: its best step time and compile time."""

    def __init__(self, name: str, step, compiled: bool = False):
        self.name, self.step, self.compiled = name, step, compiled
        self.best, self.first, self.rss_mb = float("inf"), 0.0, 0.0


def segexp_contender(cfg: DictConfig, precision: str, channels_last: bool, compiled: bool):
    """segexp's net, loss and optimizer in a bare loop (no Lightning, no MLflow)."""
    torch.manual_seed(cfg.seed)
    net = build_net(cfg.model)
    loss_fn, optimizer = instantiate(cfg.loss), instantiate(cfg.optimizer)(net.parameters())
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compiled:
        speed.compile_net(net)

    def step(batch):
        image = batch["image"]
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with speed.autocast(precision, torch.device("cpu")):
            loss = loss_fn(net(image), batch["mask"])
        loss.backward()
        optimizer.step()

    name = speed.mode_name(precision, channels_last) + (" +compile" if compiled else "")
    return Contender(name, step, compiled)


def race(contenders: list[Contender], batches: list[dict]) -> None:
    """Batch by batch, every contender in turn; the first batch warms up (and compiles).

    Each contender's `rss_mb` is the process's peak RSS during its own steps: all contenders'
    weights and optimizer states (~0.1 GB each) are resident, each one's activations only
    while it steps (segexp's allocator setting hands freed activations back to the OS).
    """
    for i, batch in enumerate(batches):
        for c in contenders:
            with PeakRSS() as rss:
                start = time.perf_counter()
                c.step(batch)
                seconds = time.perf_counter() - start
            c.rss_mb = max(c.rss_mb, rss.mb)
            if i == 0:
                c.first = seconds
            else:
                c.best = min(c.best, seconds)


def segexp_run(work_dir: Path, overrides: list[str], batches: int) -> dict:
    """A real `segexp train` of 2 short epochs: steady img/s, end-to-end img/s, peak RSS."""
    store = Path(tempfile.mkdtemp(prefix="store-", dir=work_dir))
    cfg = config(
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
        run_id = train(cfg)["run_id"]
        seconds = time.perf_counter() - start
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "time/steady_images_per_second")
    images = 2 * batches * cfg.dataset.batch_size
    tags = client.get_run(run_id).data.tags
    return {
        "steady": {m.step: m.value for m in history}[1],
        "e2e": images / seconds,
        "rss_mb": rss.mb,
        "choice": tags.get("speed.choice") or f"{tags.get('segexp.precision')}",
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    parser.add_argument("--batches", type=int, default=4, help="train batches, the first untimed")
    parser.add_argument("--work-dir", default=None, help="default: a temp dir, removed after")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="segexp-bench-"))
    device = torch.device("cpu")
    runtime.configure_allocator()  # as `segexp train` does, for every figure alike

    def row(what: str, value: str) -> None:
        print(f"{what:60s} {value}", flush=True)

    peak = {"fp32": peak_gflops(torch.float32), "bf16": peak_gflops(torch.bfloat16)}
    row(f"{speed.machine(device)}; torch {torch.__version__}; no GPU measured", "")
    row(
        "peak GFLOP/s (matmul + conv, best): fp32 / bf16",
        f"{peak['fp32']:.0f} / {peak['bf16']:.0f}",
    )
    omp = omp_policies()
    row(
        f"OpenMP wait policy, {torch.get_num_threads()} threads: img/s ACTIVE / PASSIVE",
        f"{omp['ACTIVE']:.2f} / {omp['PASSIVE']:.2f} (1x128 px steps, separate processes)",
    )
    root = work_dir / "data" / "lgg"
    if not root.exists():
        synthetic.make_lgg(root, n=4, seed=0, size=256, slices=(20, 24))
    overrides = [*LGG, f"dataset.root={root}"]
    cfg = config(work_dir, *overrides, f"dataset.cache_dir={work_dir / 'cache'}")

    runs = {}  # auto everything; fp32 forced, as on a CPU without fast bf16, the rest auto
    for name, extra in {"auto": [], "32-true": ["trainer.precision=32-true"]}.items():
        runs[name] = segexp_run(work_dir, [*overrides, *extra], args.batches)
        r = runs[name]
        row(
            f"segexp train {name} ({r['choice']}): steady / e2e img/s, peak RSS",
            f"{r['steady']:.2f} / {r['e2e']:.2f}, {r['rss_mb']:.0f} MB",
        )

    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    loaders = {w: loader_throughput(datamodule, w, args.batches) for w in (0, 1, 2)}
    row("loader img/s, workers 0 / 1 / 2", " / ".join(f"{v:.1f}" for v in loaders.values()))
    datamodule.num_workers = 0
    batches = [b for _, b in zip(range(args.batches), datamodule.train_dataloader(), strict=False)]
    counter = FlopCounterMode(display=False)
    with counter:
        net = build_net(cfg.model)
        instantiate(cfg.loss)(net(batches[0]["image"]), batches[0]["mask"]).backward()
    gflop = counter.get_total_flops() / len(batches[0]["image"]) / 1e9
    row("GFLOP per image per train step (fwd + bwd)", f"{gflop:.1f}")
    eager, folded = eval_throughput(cfg, batches[0])
    row("eval img/s fp32 channels-last: eager / BN folded", f"{eager:.2f} / {folded:.2f}")

    choice = speed.resolve(
        "auto",
        {"channels_last": "auto", "compile": "auto"},
        build_net(cfg.model),
        tuple(batches[0]["image"].shape),
        work_dir / "cache",
        run_images=cfg.trainer.max_epochs * LGG_TRAIN_IMAGES,
    )
    row(
        "speed.resolve: choice (probe s)",
        f"{choice.figures['speed.choice']} ({choice.figures['speed.probe_seconds']})",
    )
    compile_too = not args.no_compile and speed.compiler_available()
    ref = Contender("reference (fp32, its loop)", None)
    trainer = reference.ReferenceTrainer(cfg.optimizer.lr, cfg.seed, cfg.dataset.channels)
    ref.step = lambda b: trainer.step(b["image"], b["mask"])
    grid = [
        segexp_contender(cfg, p, cl, c)
        for c in ((False, True) if compile_too else (False,))
        for p in speed.CPU_PRECISIONS
        for cl in (False, True)
    ]
    with PeakRSS() as rss:
        race([ref, *grid], batches)
    size = len(batches[0]["image"])
    img_s = {c.name: size / c.best for c in [ref, *grid]}
    for c in [ref, *grid]:
        note = f", first step {c.first:.1f} s" if c.compiled else ""
        row(f"train img/s {c.name}", f"{img_s[c.name]:.2f} ({c.rss_mb:.0f} MB peak RSS{note})")
    row("peak RSS of the race (all contenders resident)", f"{rss.mb:.0f} MB")

    fp32 = speed.resolve(  # what auto picks where fp32 is forced (a CPU without fast bf16)
        "32-true",
        {"channels_last": "auto", "compile": "false"},
        build_net(cfg.model),
        tuple(batches[0]["image"].shape),
        work_dir / "cache",
    )
    mode = speed.mode_name(choice.precision, choice.channels_last)
    auto_name = mode + (" +compile" if choice.compile else "")
    best = max((c.name for c in grid), key=img_s.get)
    compiled = next((c for c in grid if c.name == mode + " +compile"), None)
    eager_step = size / img_s[mode]
    summary = {
        # interleaved on the same batches: the fair comparison
        "vs_reference": img_s.get(auto_name, img_s[mode]) / img_s[ref.name],
        "fp32_vs_reference": img_s[speed.mode_name("32-true", fp32.channels_last)]
        / img_s[ref.name],
        # a whole `segexp train` (Lightning, MLflow, data preparation, probe, validation) timed
        # before the race, not interleaved with it
        "vs_reference_e2e": runs["auto"]["e2e"] / img_s[ref.name],
        "auto_vs_best": img_s.get(auto_name, img_s[mode]) / img_s[best],
        "compile_speedup": img_s[mode + " +compile"] / img_s[mode] if compiled else float("nan"),
        "compile_seconds": compiled.first - eager_step if compiled else float("nan"),
        "peak_share": gflop * img_s[best] / peak["bf16" if "bf16" in best else "fp32"],
        "loader_margin": loaders[0] / runs["auto"]["steady"],
        "rss_gb": runs["auto"]["rss_mb"] / 1024,
        "omp_passive_speedup": omp["PASSIVE"] / max(omp["ACTIVE"], 1e-9),
    }
    row("best combination in the race", best)
    for what, cells in BLAME.items():
        trainings = cells * 2
        minutes = (
            trainings * cfg.trainer.max_epochs * LGG_TRAIN_IMAGES / runs["auto"]["steady"] / 60
        )
        row(
            f"blame {what}: trainings, est. minutes (LGG, {cfg.trainer.max_epochs} ep)",
            f"{trainings}, {minutes:.0f}",
        )
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

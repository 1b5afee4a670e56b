"""`make bench`: segexp's training throughput against a bare PyTorch loop, and what bounds it.

For synthetic LGG at the seed-004 config (unet_buda, 256 px, batch 16) and synthetic HC18 at
`hc18_seed` (128 px, batch 20) it prints train img/s of segexp (real `train()`, MLflow store in a
temp dir) for 32-true, bf16-mixed and bf16-mixed + channels_last; the same model, batches and
precision in a bare loop (no Lightning, no MLflow); the DataLoader alone with 0/1/2 workers;
cold vs warm dataset load; FLOPs per image and the share of a matmul peak probed in the same run.
The last line sums it up for the LGG config. A benchmark, not a test: it prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import albumentations as A
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow import MlflowClient
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from segexp import synthetic
from segexp.train import CONFIG_DIR, build_net, resolve_precision, train

MODES = {  # name: (precision, channels_last)
    "32-true": ("32-true", False),
    "32-true+channels_last": ("32-true", True),
    "bf16-mixed": ("bf16-mixed", False),
    "bf16-mixed+channels_last": ("bf16-mixed", True),
}
FAST = "bf16-mixed+channels_last"


def native_bf16() -> bool:
    """Whether this machine computes bf16 in hardware (what `trainer.precision=auto` checks)."""
    return resolve_precision("auto") != "32-true"


def config(work_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"work_dir={work_dir}", *overrides])


def matmul_peak(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """GFLOP/s of square matmuls in `dtype`, the ceiling a conv net's train step can approach.

    The size grows from 256 until one product takes 0.1 s (or n = 2048), so an emulated
    dtype (bf16 on a CPU without bf16 hardware: ~1 GFLOP/s) does not stall the bench.
    """
    n = 256
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        start = time.perf_counter()
        a @ b
        if n >= 2048 or time.perf_counter() - start > 0.1:
            break
        n *= 2
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def autocast(precision: str):
    if precision.startswith("bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def flops_per_image(cfg: DictConfig, batch: dict) -> float:
    """FLOPs of one forward + backward per image (torch's FLOP counter, fp32)."""
    net, _ = build_net(cfg.model)
    loss_fn = instantiate(cfg.loss)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(net(batch["image"]), batch["mask"]).backward()
    return counter.get_total_flops() / len(batch["image"])


def bare_loop(cfg: DictConfig, batches: list[dict], precision: str, channels_last: bool) -> float:
    """Train img/s of a plain loop: same net, loss, optimizer, batches and precision."""
    torch.manual_seed(cfg.seed)
    net, _ = build_net(cfg.model)
    loss_fn = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optimizer)(net.parameters())
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def step(batch):
        image = batch["image"]
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = loss_fn(net(image), batch["mask"])
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up, as segexp's first epoch and first step are
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return sum(len(b["image"]) for b in batches[1:]) / (time.perf_counter() - start)


def segexp_throughput(work_dir: Path, overrides: list[str], batches: int) -> float:
    """Train img/s after the first step of `segexp train`'s second epoch, as the run logged it."""
    cfg = config(
        work_dir,
        *overrides,
        "trainer.max_epochs=2",
        f"+trainer.limit_train_batches={batches}",
        "+trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
    )
    run_id = train(cfg)["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "time/steady_images_per_second")
    return {m.step: m.value for m in history}[1]


def loader_throughput(datamodule, workers: int, batches: int) -> float:
    """img/s of the training DataLoader alone (decode cache, augmentation, collation)."""
    datamodule.num_workers = workers
    loader = datamodule.train_dataloader()
    start, images = time.perf_counter(), 0
    for i, batch in enumerate(loader):
        images += len(batch["image"])
        if i + 1 >= batches:
            break
    return images / (time.perf_counter() - start)


def dataset_load(cfg: DictConfig) -> tuple[float, float]:
    """Seconds to load the dataset with an empty cache (decode everything), then from the cache."""
    seconds = []
    for _ in range(2):
        datamodule = instantiate(cfg.dataset, train_transform=None)
        start = time.perf_counter()
        datamodule.prepare_data()
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def bench_config(name: str, work_dir: Path, overrides: list[str], batches: int, bf16: bool) -> dict:
    """All figures for one dataset config; prints its rows as they come.

    bf16: also time the bf16 modes (on a CPU without bf16 hardware they are emulated and slow).
    """
    rows, out = [], {"name": name}

    def row(what: str, value: str) -> None:
        rows.append({"config": name, "what": what, "value": value})
        print(f"{name:28s} {what:52s} {value}", flush=True)

    cache = work_dir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = config(work_dir, *overrides, f"dataset.cache_dir={cache}")
    cold, warm = dataset_load(cfg)
    out["cache_speedup"] = cold / warm
    row("dataset load s, cold / warm", f"{cold:.2f} / {warm:.3f}")

    augment = A.Compose(instantiate(cfg.augment.transforms)) if cfg.augment.transforms else None
    datamodule = instantiate(cfg.dataset, train_transform=augment)
    datamodule.setup("fit")
    for workers in (0, 1, 2):
        out[f"loader_{workers}"] = loader_throughput(datamodule, workers, batches)
        row(f"loader img/s, workers={workers}", f"{out[f'loader_{workers}']:.1f}")
    datamodule.num_workers = 0
    fixed = [b for _, b in zip(range(batches), datamodule.train_dataloader(), strict=False)]
    out["gflop_per_image"] = flops_per_image(cfg, fixed[0]) / 1e9
    row("GFLOP per image per train step", f"{out['gflop_per_image']:.1f}")
    for mode, (precision, channels_last) in MODES.items():
        if precision.startswith("bf16") and not bf16:
            row(f"train img/s {mode}", "skipped: no bf16 hardware")
            continue
        store = Path(tempfile.mkdtemp(prefix="store-", dir=work_dir))
        mode_overrides = [
            *overrides,
            f"trainer.precision={precision}",
            f"model.channels_last={str(channels_last).lower()}",
        ]
        ours = segexp_throughput(store, mode_overrides, batches)
        bare = bare_loop(cfg, fixed, precision, channels_last)
        out[mode] = {"segexp": ours, "bare": bare}
        row(
            f"train img/s {mode}: segexp / bare (ratio)",
            f"{ours:.2f} / {bare:.2f} ({ours / bare:.2f})",
        )
    out["rows"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segexp.bench", description=__doc__)
    parser.add_argument(
        "--batches",
        type=int,
        default=4,
        help="LGG train batches per epoch, the first untimed (HC18: 2x)",
    )
    parser.add_argument("--work-dir", default=None, help="default: a temp dir, removed after")
    parser.add_argument("--only", choices=["lgg", "hc18"], default=None)
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="segexp-bench-"))
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    native = native_bf16()
    print(
        f"threads {torch.get_num_threads()}; matmul peak GFLOP/s: fp32 {peak['fp32']:.0f},"
        f" bf16 {peak['bf16']:.0f}; bf16 hardware: {native}"
        f" (trainer.precision=auto -> {resolve_precision('auto')})"
    )
    configs = {  # name: (make data, overrides, timed batches, bf16 modes even if emulated)
        "lgg unet_buda 256px bs16": (
            lambda root: synthetic.make_lgg(root, n=4, seed=0, size=256, slices=(20, 24)),
            ["experiment=lgg_buda_1", "dataset=lgg_synthetic", "dataset.val_count=1"],
            args.batches,
            False,
        ),
        "hc18 hc18_seed 128px bs20": (
            lambda root: synthetic.make_hc18(root, n=300, seed=0),
            ["experiment=hc18_seed", "dataset=hc18_synthetic", "early_stopping=null"],
            args.batches * 2,
            True,
        ),
    }
    results = []
    for name, (make, overrides, batches, emulated_ok) in configs.items():
        if args.only and not name.startswith(args.only):
            continue
        root = work_dir / "data" / name.split()[0]
        if not root.exists():
            make(root)
        overrides = [*overrides, f"dataset.root={root}"]
        results.append(bench_config(name, work_dir, overrides, batches, native or emulated_ok))
    rows = [row for r in results for row in r["rows"]]
    for r in results:
        best = max((m for m in MODES if m in r), key=lambda m: r[m]["segexp"])
        dtype = "bf16" if best.startswith("bf16") else "fp32"
        achieved = r["gflop_per_image"] * r[best]["segexp"]
        r["best"], r["peak_share"] = best, achieved / peak[dtype]
        rows.append(
            {
                "config": r["name"],
                "what": f"achieved GFLOP/s ({best}) / {dtype} matmul peak",
                "value": f"{achieved:.0f} / {peak[dtype]:.0f} ({r['peak_share']:.2f})",
            }
        )
    print()
    print(pd.DataFrame(rows).to_string(index=False))
    head = results[0]
    with_bf16 = next((r for r in results if FAST in r), None)
    if with_bf16 is not None and with_bf16 is not head:
        print(f"bf16_speedup from '{with_bf16['name']}': LGG's bf16 modes were not timed")
    summary = {
        "bf16_speedup": with_bf16[FAST]["segexp"] / with_bf16["32-true"]["segexp"]
        if with_bf16
        else float("nan"),
        "overhead": head[head["best"]]["bare"] / head[head["best"]]["segexp"],
        "loader_margin": max(head[f"loader_{w}"] for w in (0, 1, 2)) / head[head["best"]]["segexp"],
        "cache_speedup": head["cache_speedup"],
        "peak_share": head["peak_share"],
    }
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    print("bench: " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

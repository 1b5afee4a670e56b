"""What a run records besides per-epoch metrics: inputs at the start, the final evaluation at the end."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import DictConfig

from segexp import tracking
from segexp.data import SegDataModule
from segexp.metrics import summarize, volume_table
from segexp.module import SegModule

matplotlib.use("Agg")  # headless: runs on servers and in CI

CURVE_KEYS = ["train/loss", "val/loss", "val/dice", "val/iou", "val/dice_volume"]


def log_run_inputs(
    run: tracking.TrackedRun,
    cfg: DictConfig,
    overrides: list[str],
    datamodule: SegDataModule,
    output_dir: Path,
) -> None:
    """Params (full resolved config), tags, config.yaml and the split file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    config = tracking.redacted(cfg)
    run.set_tags(
        {
            **tracking.git_tags(),
            "hydra.overrides": tracking.redact("overrides", " ".join(overrides)),
            "dataset.fingerprint": datamodule.fingerprint,
            "dataset.train_images": len(datamodule.train_idx),
            "dataset.val_images": len(datamodule.val_idx),
            "segexp.output_dir": str(output_dir.resolve()),
        }
    )
    run.log_params(tracking.flatten(config))
    (output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run.log_artifact(output_dir / "config.yaml")
    datamodule.split_table().to_csv(output_dir / "split.csv", index=False)
    run.log_artifact(output_dir / "split.csv")


def plot_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Loss (left) and overlap metrics (right) per epoch."""
    import matplotlib.pyplot as plt  # after the Agg backend is chosen

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    for key, points in history.items():
        if points:
            ax = ax_loss if key.endswith("loss") else ax_dice
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_dice, "overlap")):
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_final_evaluation(
    run: tracking.TrackedRun,
    trainer: pl.Trainer,
    module: SegModule,
    datamodule: SegDataModule,
    output_dir: Path,
) -> dict[str, float]:
    """Re-evaluate the best epoch's weights; log its metrics, per-case CSVs, curves and checkpoint."""
    best = Path(
        trainer.checkpoint_callback.best_model_path or output_dir / "checkpoints" / "last.ckpt"
    )
    best_epoch = int(torch.load(best, map_location="cpu", weights_only=True)["epoch"])
    trainer.validate(
        module, datamodule=datamodule, ckpt_path=str(best), verbose=False, weights_only=True
    )
    cases = module.val_cases
    final = {f"{k}_best": v for k, v in summarize(cases, datamodule.volumetric).items()}
    final["best_epoch"] = best_epoch
    run.log_metrics(final, step=0)

    cases.to_csv(output_dir / "val_cases.csv", index=False)
    run.log_artifact(output_dir / "val_cases.csv", "evaluation")
    if datamodule.volumetric:
        volume_table(cases).to_csv(output_dir / "val_volumes.csv", index=False)
        run.log_artifact(output_dir / "val_volumes.csv", "evaluation")
    plot_curves(run.metric_history(CURVE_KEYS), output_dir / "curves.png")
    run.log_artifact(output_dir / "curves.png", "plots")
    run.log_artifact(best, "checkpoints")
    return final

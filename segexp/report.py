"""What a run records besides per-epoch metrics: inputs at the start, the final evaluation at the end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow.data
import numpy as np
import pytorch_lightning as pl
import yaml
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from omegaconf import DictConfig

from segexp import config, tracking
from segexp.data import SegDataModule
from segexp.evaluation import HEAD_SIZE_RANGES, hc_range_table, summarize, volume_table
from segexp.files import atomic_write_text
from segexp.models import SegModule, load_checkpoint, registry
from segexp.plots import epoch_axis, figure, save

CURVE_KEYS = ["train/loss", "val/loss", "val/dice", "val/iou", "val/dice_volume"]
CONTEXTS = {"train": "training", "val": "validation"}  # split -> MLflow's input context


def log_run_inputs(
    run: tracking.TrackedRun,
    cfg: DictConfig,
    overrides: list[str],
    datamodule: SegDataModule,
    output_dir: Path,
) -> None:
    """Params (full resolved config), tags, config.yaml, the split file and the datasets."""
    if not run.active:  # DDP rank > 0
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = config.redacted(cfg)
    run.set_tags(
        {
            **tracking.git_tags(),
            "hydra.overrides": config.redact("overrides", " ".join(overrides)),
            "dataset.fingerprint": datamodule.fingerprint,
            "dataset.train_images": len(datamodule.train_idx),
            "dataset.val_images": len(datamodule.val_idx),
            "segexp.output_dir": str(output_dir.resolve()),
            "segexp.config_hash": config.config_hash(resolved),
            tracking.tags.STORE: tracking.store_file(run.client.tracking_uri) or "",
            **choice_tags(),
        }
    )
    run.log_params(config.flatten(resolved))
    (output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    run.log_artifact(output_dir / "config.yaml")
    datamodule.split_table().to_csv(output_dir / "split.csv", index=False)
    run.log_artifact(output_dir / "split.csv")
    run.log_inputs(dataset_inputs(datamodule, "split.csv"))


def dataset_inputs(datamodule: SegDataModule, split_file: str) -> list[DatasetInput]:
    """The training and validation sets as MLflow datasets: their case lists, never images.

    The digest is the files' fingerprint. MLflow keeps one dataset per (name, digest) in an
    experiment, with the profile and source it was first logged with, so the name carries a
    hash of the split's case ids: a run on another split of the same files gets its own.
    """
    table = datamodule.split_table()
    source = LocalArtifactDatasetSource(str(Path(datamodule.root).resolve()))
    inputs = []
    for split, context in CONTEXTS.items():
        cases = table[table.split == split].drop(columns="split").reset_index(drop=True)
        ids = hashlib.sha256("\n".join(cases.case_id).encode()).hexdigest()[:8]
        dataset = mlflow.data.from_pandas(
            cases,
            source=source,
            name=f"{datamodule.name}/{split}@{ids}",
            digest=datamodule.fingerprint,
        )
        groups = int(cases.group.nunique())  # exams (HC18) or patients (LGG)
        profile = {**dataset.profile, "groups": groups, "split_file": split_file}
        entity = DatasetEntity(**{**dataset.to_dict(), "profile": json.dumps(profile)})
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def choice_tags() -> dict[str, str]:
    """The config-group options Hydra chose (`{"model": "unet_small", ...}`), for blame's factors."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    picked = {k: v for k, v in choices.items() if not k.startswith("hydra/") and v is not None}
    return {"segexp.choices": json.dumps(picked, sort_keys=True)}


def redact_hydra_outputs(hydra_cfg=None) -> list[Path]:
    """Hydra's copies of the config and overrides, rewritten with their secrets hidden.

    Hydra writes `.hydra/{config,hydra,overrides}.yaml` in the run's folder (and a sweep's
    `multirun.yaml`) before the job starts, with the command line's values in clear: a tracking
    URI's password, a token. They get the redaction params and config.yaml get. Returns the
    files rewritten.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = hydra_cfg or HydraConfig.get()
    paths = []
    if hydra_cfg.output_subdir is not None:
        folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
        paths += [folder / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    if hydra_cfg.mode == RunMode.MULTIRUN:  # every job rewrites it: idempotent, atomic
        paths.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    rewritten = []
    for path in (p for p in paths if p.is_file()):
        written = yaml.safe_load(path.read_text())
        hidden = config.redacted(written)
        if hidden != written:
            atomic_write_text(path, yaml.safe_dump(hidden, sort_keys=False))
            rewritten.append(path)
    return rewritten


def plot_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """`curves_figure` saved as a PNG at `path`."""
    return save(curves_figure(history), path)


def curves_figure(history: dict[str, list[tuple[int, float]]]):
    """Loss (left) and overlap metrics (right) per epoch: one line per metric with points."""
    fig, (ax_loss, ax_dice) = figure(1, 2, figsize=(10, 4))
    for key, points in history.items():
        if points:
            ax = ax_loss if key.endswith("loss") else ax_dice
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_dice, "overlap")):
        ax.set(title=title)
        epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_distributions(table, unit: str, path: Path) -> Path:
    """`distributions_figure` saved as a PNG at `path`."""
    return save(distributions_figure(table, unit), path)


def distributions_figure(table, unit: str):
    """Per-patient (or per-image) Dice and pixel accuracy: points, box, mean (red), median (green).

    Side by side they show why accuracy misleads: nearly all pixels are background.
    """
    fig, axes = figure(1, 2, figsize=(8, 4))
    rng = np.random.default_rng(0)
    for ax, column in zip(axes, ("dice", "accuracy"), strict=True):
        values = table[column].to_numpy()
        ax.boxplot(values, widths=0.5, showfliers=False)
        ax.scatter(1 + rng.uniform(-0.15, 0.15, len(values)), values, s=12, alpha=0.6)
        ax.axhline(values.mean(), color="red", label=f"mean {values.mean():.3f}")
        ax.axhline(np.median(values), color="green", label=f"median {np.median(values):.3f}")
        ax.set(title=f"{column} per {unit}", ylim=(-0.02, 1.02), xticks=[])
        ax.legend(loc="lower left")
    return fig


def plot_overlays(
    datamodule: SegDataModule, module: SegModule, rank_by: str, ascending: bool, path: Path
) -> Path:
    """Best and worst validation cases: prediction outline in red over ground truth in green.

    LGG ranks patients and shows each one's slice with the most lesion (truth or prediction).
    """
    from skimage.segmentation import find_boundaries

    cases = module.val_cases.reset_index(drop=True)
    if datamodule.volumetric:
        ranked = volume_table(cases).set_index("group")[rank_by].sort_values(ascending=ascending)
        area = module.val_masks.reshape(len(cases), -1).sum(1)

        def row_of(group: str) -> int:
            rows = np.nonzero(cases.group.to_numpy() == group)[0]
            return int(rows[area[rows].argmax()])
    else:
        ranked = cases.set_index("case_id")[rank_by].sort_values(ascending=ascending)

        def row_of(case_id: str) -> int:
            return int(np.nonzero(cases.case_id.to_numpy() == case_id)[0][0])

    fig, axes = figure(1, 2, figsize=(9, 4.5))
    for ax, label, name in zip(
        axes, ("best", "worst"), (ranked.index[0], ranked.index[-1]), strict=True
    ):
        i = row_of(name)
        image = datamodule.val_set[i]["image"].numpy()
        image = image[min(1, len(image) - 1)]  # FLAIR for LGG, the only channel for HC18
        rgb = np.stack([(image - image.min()) / (np.ptp(image) + 1e-6)] * 3, axis=-1)
        pred, true = module.val_masks[i]
        rgb[find_boundaries(true)] = (0, 1, 0)
        rgb[find_boundaries(pred)] = (1, 0, 0)
        ax.imshow(rgb)
        ax.set(title=f"{label}: {name}\n{rank_by} {ranked[name]:.3f}", xticks=[], yticks=[])
    return save(fig, path)


def plot_hc_agreement(cases, path: Path) -> Path:
    """`hc_agreement_figure` saved as a PNG at `path`."""
    return save(hc_agreement_figure(cases), path)


def hc_agreement_figure(cases):
    """Predicted vs reference HC (left) and Bland-Altman difference vs mean (right)."""
    fig, (ax_scatter, ax_ba) = figure(1, 2, figsize=(9, 4))
    true, pred = cases.hc_true_mm.to_numpy(), cases.hc_pred_mm.to_numpy()
    ax_scatter.scatter(true, pred, s=12)
    limits = [0, max(true.max(), pred.max()) * 1.05]
    ax_scatter.plot(limits, limits, color="gray", lw=1)
    ax_scatter.set(
        xlabel="reference HC (mm)", ylabel="predicted HC (mm)", title="head circumference"
    )
    diff, mean = pred - true, (pred + true) / 2
    ax_ba.scatter(mean, diff, s=12)
    for y, style in (
        (diff.mean(), "-"),
        (diff.mean() + 1.96 * diff.std(), "--"),
        (diff.mean() - 1.96 * diff.std(), "--"),
    ):
        ax_ba.axhline(y, color="red", ls=style, lw=1)
    ax_ba.set(
        xlabel="mean HC (mm)",
        ylabel="predicted - reference (mm)",
        title=f"bias {diff.mean():+.2f} mm",
    )
    return fig


def log_plots(
    run: tracking.TrackedRun, datamodule: SegDataModule, module: SegModule, output_dir: Path
) -> None:
    cases = module.val_cases
    plots = []
    if datamodule.volumetric:
        plots.append(
            plot_distributions(volume_table(cases), "patient", output_dir / "per_patient.png")
        )
        plots.append(plot_overlays(datamodule, module, "dice", False, output_dir / "overlays.png"))
    else:
        plots.append(plot_distributions(cases, "image", output_dir / "per_image.png"))
        if "hc_abs_error_mm" in cases:
            plots.append(
                plot_overlays(
                    datamodule, module, "hc_abs_error_mm", True, output_dir / "overlays.png"
                )
            )
            plots.append(plot_hc_agreement(cases, output_dir / "hc_agreement.png"))
        else:
            plots.append(
                plot_overlays(datamodule, module, "dice", False, output_dir / "overlays.png")
            )
    for path in plots:
        run.log_artifact(path, "plots")


# also logged as `<key>_last` where the run has them (a range without validation heads has none)
LAST_KEYS = (
    "val/dice",
    "val/dice_volume",
    "val/hc_mae_mm",
    *(f"val/hc_mae_mm_{r.name}" for r in HEAD_SIZE_RANGES),
)


def log_cases(run, cases, output_dir: Path, split: str) -> None:
    """`<split>_cases.csv` and, with head sizes, `<split>_hc_ranges.csv` (`hc_range_table`) as
    `evaluation/` artifacts; HC18's rows are named by their image file, as the challenge does."""
    if "hc_true_mm" in cases and "filename" not in cases:
        cases.insert(0, "filename", cases.case_id + ".png")
    tables = {"cases": cases}
    if "hc_range" in cases:
        tables["hc_ranges"] = hc_range_table(cases)
    for name, table in tables.items():
        path = output_dir / f"{split}_{name}.csv"
        table.to_csv(path, index=False)
        run.log_artifact(path, "evaluation")


def log_test_evaluation(run, trainer, module, datamodule, best: Path, output_dir: Path) -> dict:
    """The best weights on the held-out test cases, once: `test/*` metrics, `log_cases` CSVs."""
    trainer.validate(
        module, datamodule.test_dataloader(), ckpt_path=str(best), verbose=False, weights_only=True
    )
    cases = module.val_cases  # the module keeps the last evaluation's cases, the test's here
    summary = summarize(cases, datamodule.volumetric)
    log_cases(run, cases, output_dir, "test")
    return {"test/" + k.removeprefix("val/"): v for k, v in summary.items()}


def log_final_evaluation(
    run: tracking.TrackedRun,
    trainer: pl.Trainer,
    module: SegModule,
    datamodule: SegDataModule,
    output_dir: Path,
    model: DictConfig | dict,
) -> dict[str, float]:
    """Re-evaluate the best epoch's weights; log its metrics, per-case CSVs, curves and checkpoint,
    and (`model`: `log_model`, `register_as` of the tracking config) the MLflow model."""
    best = Path(
        trainer.checkpoint_callback.best_model_path or output_dir / "checkpoints" / "last.ckpt"
    )
    best_epoch = int(load_checkpoint(best, ["epoch"])["epoch"])
    trainer.validate(
        module, datamodule=datamodule, ckpt_path=str(best), verbose=False, weights_only=True
    )
    cases = module.val_cases
    final = {f"{k}_best": v for k, v in summarize(cases, datamodule.volumetric).items()}
    final["best_epoch"] = best_epoch
    if not run.active:  # DDP rank > 0: validated with the others, rank 0 writes the results
        return final
    history = run.metric_history([k for k in LAST_KEYS if f"{k}_best" in final])
    # the last epoch beside the best: the best is picked on these same validation cases
    final.update({f"{k}_last": points[-1][1] for k, points in history.items() if points})
    # one evaluation per fit: a run resumed for more epochs adds a point, never a duplicate
    run.log_metrics(final, step=trainer.current_epoch - 1)

    log_cases(run, cases, output_dir, "val")
    if datamodule.volumetric:
        volume_table(cases).to_csv(output_dir / "val_volumes.csv", index=False)
        run.log_artifact(output_dir / "val_volumes.csv", "evaluation")
    plot_curves(run.metric_history(CURVE_KEYS), output_dir / "curves.png")
    run.log_artifact(output_dir / "curves.png", "plots")
    log_plots(run, datamodule, module, output_dir)
    run.log_artifact(best, "checkpoints")
    if datamodule.test_idx:  # last: it replaces the module's cases, which the plots read
        tested = log_test_evaluation(run, trainer, module, datamodule, best, output_dir)
        run.log_metrics(tested, step=trainer.current_epoch - 1)
        final.update(tested)
    if model.get("log_model") or model.get("register_as"):  # the Models tab, the registry
        step = trainer.current_epoch - 1
        registry.log_model(run.client, run.run_id, best, step)
        if model.get("register_as"):
            registry.register(run.client, run.run_id, str(model.get("register_as")))
    return final

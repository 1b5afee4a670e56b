"""`segexp train`: compose the config, train one model, log everything to MLflow."""

from __future__ import annotations

import datetime
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from segexp import report, speed, sweep, tracking
from segexp.data import SegDataModule
from segexp.module import SegModule

CONFIG_DIR = tracking.PROJECT_ROOT / "conf"
# `_target_`s may only name these packages: a config can never call os.system & co.
ALLOWED_TARGETS = (
    "torch.",
    "segmentation_models_pytorch.",
    "albumentations.",
    "segexp.",
    "pytorch_lightning.",
    "lightning.",
)
OmegaConf.register_new_resolver(
    "pm", lambda delta, center=0: [center - delta, center + delta], replace=True
)


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


def check_config(cfg: DictConfig, path: str = "") -> None:
    """Reject `_target_`s outside ALLOWED_TARGETS before anything is instantiated."""
    for key, value in cfg.items() if isinstance(cfg, DictConfig) else enumerate(cfg):
        name = f"{path}.{key}" if path else str(key)
        if key == "_target_" and not str(value).startswith(ALLOWED_TARGETS):
            raise ConfigError(
                f"{name}={value!r} is not allowed: targets must start with one of {ALLOWED_TARGETS}"
            )
        if OmegaConf.is_config(value):
            check_config(value, name)


@dataclass
class Resume:
    run_id: str
    checkpoint: Path
    output_dir: Path


def resume_target(client, run_id: str, overrides: list[str]) -> tuple[Resume, DictConfig]:
    """The run's last checkpoint and its logged config with `overrides` applied on top."""
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise ConfigError(f"resume={run_id}: no such run in the tracking store ({err})") from err
    output_dir = Path(run.data.tags.get("segexp.output_dir", ""))
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise ConfigError(
            f"resume={run_id}: no checkpoint at {checkpoint}; the run cannot be resumed"
        )
    try:
        torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"resume={run_id}: checkpoint {checkpoint} is unreadable ({err})"
        ) from err
    with tempfile.TemporaryDirectory() as tmp:
        saved = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
    extra = [o for o in overrides if not o.startswith("resume=")]
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(extra))
    cfg.resume = run_id
    return Resume(run_id, checkpoint, output_dir), cfg


def choice(cfg: DictConfig, group: str) -> str:
    """The config-group option chosen for `group` (e.g. `unet_small`), when Hydra knows it."""
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get(group) or "?"
    target = str(OmegaConf.select(cfg, f"{group}._target_", default="?"))
    return OmegaConf.select(cfg, f"{group}.arch") or target.rsplit(".", 1)[-1]


def run_name(cfg: DictConfig) -> str:
    if cfg.run_name:
        return cfg.run_name
    return f"{cfg.dataset.name} {choice(cfg, 'model')} lr={cfg.optimizer.lr:g} bs={cfg.dataset.batch_size}"


def check_augment(datamodule: SegDataModule) -> None:
    """Run the augmentation once on a training item, so a bad transform fails before any run."""
    if datamodule.train_transform is None:
        return
    datamodule.setup("fit")
    try:
        datamodule.train_set[0]
    except Exception as err:
        raise ConfigError(f"augment.transforms fails on a training image: {err}") from err


def build_net(model_cfg: DictConfig) -> torch.nn.Module:
    """The network of a `model` config (configs logged before `performance` may still carry
    `channels_last`, a segexp option that no constructor takes)."""
    args = OmegaConf.to_container(model_cfg, resolve=True)
    args.pop("channels_last", None)
    return instantiate(args)


def device_of(cfg: DictConfig) -> torch.device:
    """The device Lightning will train on: CUDA where the accelerator allows it and one exists."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu")


def resolve_speed(cfg: DictConfig, datamodule: SegDataModule, net: torch.nn.Module):
    """Precision, channels-last and compile: explicit values as set, `auto` by measurement."""
    datamodule.prepare_data()
    per_epoch = len(datamodule.train_idx)
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        per_epoch = min(per_epoch, limit * datamodule.batch_size)
    size = datamodule.image_size
    return speed.resolve(
        cfg.trainer.precision,
        cfg.get("performance") or {},
        net,
        (datamodule.batch_size, datamodule.channels, size, size),
        datamodule.cache_dir or Path(cfg.work_dir) / "cache",
        device_of(cfg),
        run_images=cfg.trainer.max_epochs * per_epoch,
    )


def build_module(
    cfg: DictConfig,
    datamodule: SegDataModule,
    choice: speed.Choice | None = None,
    net: torch.nn.Module | None = None,
) -> SegModule:
    net = net or build_net(cfg.model)
    choice = choice or resolve_speed(cfg, datamodule, net)
    return SegModule(
        net=net,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        volumetric=datamodule.volumetric,
        channels_last=choice.channels_last,
        compile=choice.compile,
        monitor=cfg.checkpoint.monitor,
        hc_boundary_offset_px=datamodule.hc_boundary_offset_px,
    )


def build_trainer(
    cfg: DictConfig, run: tracking.TrackedRun, output_dir: Path, choice: speed.Choice
) -> pl.Trainer:
    checkpoints = output_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(
            checkpoints, filename="best", monitor=cfg.checkpoint.monitor, mode=cfg.checkpoint.mode
        ),
        tracking.EpochMetricsToMLflow(run, checkpoints),
    ]
    if cfg.early_stopping:
        callbacks.append(
            EarlyStopping(cfg.checkpoint.monitor, mode=cfg.checkpoint.mode, **cfg.early_stopping)
        )
    extra = {}
    if device_of(cfg).type == "cuda" and cfg.trainer.get("benchmark") is None:
        extra["benchmark"] = True  # cuDNN autotuning: every batch has the same size
    return instantiate(
        cfg.trainer,
        precision=choice.precision,
        default_root_dir=str(output_dir),
        **extra,
        callbacks=callbacks,
        logger=False,
    )


def default_output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    return Path(cfg.work_dir) / "outputs" / f"{stamp}-{uuid.uuid4().hex[:6]}"


def train(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Train one run, log it to MLflow; returns `run_id` and the restored best epoch's metrics."""
    overrides = list(overrides or [])
    check_config(cfg)
    uri, artifact_root = tracking.store_locations(cfg.tracking, Path(cfg.work_dir))
    client = tracking.prepare_store(uri, artifact_root)
    resume = None
    if cfg.resume:
        resume, cfg = resume_target(client, cfg.resume, overrides)
        check_config(cfg)  # the stored config plus overrides is what will be instantiated
    pl.seed_everything(cfg.seed, workers=True)
    augment = A.Compose(instantiate(cfg.augment.transforms)) if cfg.augment.transforms else None
    datamodule = instantiate(cfg.dataset, train_transform=augment)
    datamodule.prepare_data()  # bad input fails here, before a run exists
    check_augment(datamodule)
    net = build_net(cfg.model)
    choice = resolve_speed(cfg, datamodule, net)  # probes only what is `auto` and not cached
    module = build_module(cfg, datamodule, choice, net)
    output_dir = resume.output_dir if resume else default_output_dir(cfg)
    with tracking.TrackedRun(
        client,
        cfg.tracking.experiment,
        artifact_root,
        run_name(cfg),
        resume_run_id=resume and resume.run_id,
        parent_run_id=cfg.tracking.get("parent_run_id"),
    ) as run:
        if resume:
            run.set_tags({"segexp.resumed_with": " ".join(overrides)})
        else:
            report.log_run_inputs(run, cfg, overrides, datamodule, output_dir)
        run.set_tags(
            {
                "segexp.precision": choice.precision,
                "segexp.channels_last": choice.channels_last,
                "segexp.compile": choice.compile,
                **choice.figures,  # speed.*: the probe's img/s per mode, source, compile figures
            }
        )
        trainer = build_trainer(cfg, run, output_dir, choice)
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=resume and str(resume.checkpoint),
            weights_only=True,
        )
        final = report.log_final_evaluation(run, trainer, module, datamodule, output_dir)
    final["run_id"] = run.run_id
    print(
        f"\nrun {run.run_id} in experiment '{cfg.tracking.experiment}':"
        f" val/dice_best={final['val/dice_best']:.4f} (epoch {final['best_epoch']})"
        f"\noutputs: {output_dir}\nbrowse: make ui  (MLflow UI on http://127.0.0.1:5000)"
    )
    return final


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point (`segexp train`, `python -m segexp.train`); returns val/dice_best."""
    speed.configure_threads(sweep.threads_per_job())
    overrides = list(HydraConfig.get().overrides.task)
    if sweep.in_multirun() and os.environ.get(sweep.PARENT_ENV):
        cfg.tracking.parent_run_id = os.environ[sweep.PARENT_ENV]
        cfg.run_name = cfg.run_name or sweep.child_run_name(overrides) or None
        if cfg.sweep.resume and (reused := skip_finished(cfg)) is not None:
            return reused
    return train(cfg, overrides)["val/dice_best"]


def skip_finished(cfg: DictConfig) -> float | None:
    """`sweep.resume=true`: the val/dice_best of a FINISHED twin run, which the parent adopts."""
    client = tracking.prepare_store(*tracking.store_locations(cfg.tracking, Path(cfg.work_dir)))
    twin = sweep.finished_twin(client, cfg)
    if twin is None:
        return None
    client.set_tag(twin, "segexp.reused_by_sweep", cfg.tracking.parent_run_id)
    print(f"sweep.resume: reusing FINISHED run {twin} (same config hash and seed)")
    return client.get_run(twin).data.metrics.get("val/dice_best")


if __name__ == "__main__":
    main()

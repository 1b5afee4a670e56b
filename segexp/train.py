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

from segexp import report, sweep, tracking
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


def resolve_precision(precision: str) -> str:
    """`auto`: bf16-mixed where the hardware has fast bf16, else 32-true."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bf16-mixed" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "32-true"


def check_augment(datamodule: SegDataModule) -> None:
    """Run the augmentation once on a training item, so a bad transform fails before any run."""
    if datamodule.train_transform is None:
        return
    datamodule.setup("fit")
    try:
        datamodule.train_set[0]
    except Exception as err:
        raise ConfigError(f"augment.transforms fails on a training image: {err}") from err


def resolve_channels_last(value: bool | str, precision: str) -> bool:
    """`auto`: channels-last memory format where it is faster: on GPUs, and with bf16 on CPUs.

    In fp32 on a CPU it depends on the net (`make bench`: unet_buda at 256 px no faster,
    unet_small at 128 px 17% faster), so there `auto` stays contiguous and configs choose.
    """
    if value != "auto":
        return bool(value)
    return torch.cuda.is_available() or resolve_precision(precision).startswith("bf16")


def build_net(model_cfg: DictConfig) -> tuple[torch.nn.Module, bool | str]:
    """The network of a `model` config, and its `channels_last` setting (segexp's, not the model's)."""
    args = OmegaConf.to_container(model_cfg, resolve=True)
    channels_last = args.pop("channels_last", "auto")
    return instantiate(args), channels_last


def build_module(cfg: DictConfig, datamodule: SegDataModule) -> SegModule:
    net, channels_last = build_net(cfg.model)
    channels_last = resolve_channels_last(channels_last, cfg.trainer.precision)
    return SegModule(
        net=net,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        volumetric=datamodule.volumetric,
        channels_last=channels_last,
        monitor=cfg.checkpoint.monitor,
        hc_boundary_offset_px=datamodule.hc_boundary_offset_px,
    )


def build_trainer(cfg: DictConfig, run: tracking.TrackedRun, output_dir: Path) -> pl.Trainer:
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
    return instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision),
        default_root_dir=str(output_dir),
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
    module = build_module(cfg, datamodule)
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
        precision = resolve_precision(cfg.trainer.precision)
        run.set_tags({"segexp.precision": precision, "segexp.channels_last": module.channels_last})
        trainer = build_trainer(cfg, run, output_dir)
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
    torch.set_num_threads(sweep.threads_per_job())
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

"""`segexp train`: compose the config, train one model, log everything to MLflow."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from segexp import config, performance, report, sweep, tracking
from segexp.checks import check_run_values
from segexp.config import ConfigError
from segexp.data import DataError, SegDataModule, size_hw
from segexp.files import atomic_path, output_to
from segexp.models import SegModule, build_net
from segexp.resume import resume_target


def check_run_config(cfg: DictConfig) -> None:
    """Refuse, by key, the values that cannot train, before the store or any data is touched."""
    config.check_targets(cfg)
    check_run_values(cfg)


class AtomicModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose file is replaced atomically: a kill mid-write keeps the old one."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # every rank calls it, rank 0 writes
        with atomic_path(filepath, publish=trainer.is_global_zero) as tmp:
            super()._save_checkpoint(trainer, str(tmp))
        self._last_checkpoint_saved = filepath


def run_name(cfg: DictConfig) -> str:
    if cfg.run_name:
        return cfg.run_name
    model = (
        HydraConfig.get().runtime.choices.get("model")
        if HydraConfig.initialized()
        else OmegaConf.select(cfg, "model.arch") or str(cfg.model._target_).rsplit(".", 1)[-1]
    )
    return f"{cfg.dataset.name} {model} lr={cfg.optimizer.lr:g} bs={cfg.dataset.batch_size}"


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
    height, width = size_hw(datamodule.image_size)
    return performance.resolve(
        cfg.trainer.precision,
        cfg.get("performance") or {},
        net,
        (datamodule.batch_size, datamodule.channels, height, width),
        datamodule.cache_dir or Path(cfg.work_dir) / "cache",
        device_of(cfg),
        run_images=cfg.trainer.max_epochs * per_epoch,
    )


def build_datamodule(cfg: DictConfig) -> SegDataModule:
    """The DataModule with its data checked and decoded, and the augmentation tried once."""
    augment = config.instantiate(cfg.augment, "augment") if cfg.augment else None
    datamodule = config.instantiate(cfg.dataset, "dataset", train_transform=augment)
    datamodule.prepare_data()  # bad input fails here, before a run exists
    if augment is not None:
        datamodule.setup("fit")
        try:
            datamodule.train_set[0]
        except Exception as err:
            raise ConfigError(f"augment fails on a training image: {err}") from err
    return datamodule


def build_module(
    cfg: DictConfig,
    datamodule: SegDataModule,
    choice: performance.Choice | None = None,
    net: torch.nn.Module | None = None,
) -> SegModule:
    """The LightningModule: the net, its training parts, speed settings and `evaluation`."""
    net = net or build_net(cfg.model)
    choice = choice or resolve_speed(cfg, datamodule, net)
    evaluation = cfg.get("evaluation") or {}  # a run stored before the node: SegModule's defaults
    return SegModule(
        net=net,
        loss=config.instantiate(cfg.loss, "loss"),
        optimizer=config.instantiate(cfg.optimizer, "optimizer"),
        scheduler=config.instantiate(cfg.scheduler, "scheduler") if cfg.scheduler else None,
        volumetric=datamodule.volumetric,
        channels_last=choice.channels_last,
        compile=choice.compile,
        monitor=cfg.checkpoint.monitor,
        hc_boundary_offset_px=datamodule.hc_boundary_offset_px,
        **evaluation,  # flip_tta, single_object, hc_ellipse_fit
    )


def build_trainer(
    cfg: DictConfig, run: tracking.TrackedRun, output_dir: Path, choice: performance.Choice
) -> pl.Trainer:
    checkpoints = output_dir / "checkpoints"
    callbacks = [
        # saved when validation ends, so the epoch's last.ckpt (written at train epoch end)
        # already knows this epoch's best; one best.ckpt, overwritten in place on resume
        AtomicModelCheckpoint(
            checkpoints,
            filename="best",
            monitor=cfg.checkpoint.monitor,
            mode=cfg.checkpoint.mode,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        ),
        tracking.EpochMetricsToMLflow(run, checkpoints),
        *(
            config.instantiate(node, f"callbacks.{name}")
            for name, node in (cfg.get("callbacks") or {}).items()
            if node
        ),
    ]
    progress_bar = cfg.trainer.get("enable_progress_bar")
    extra = {}
    if device_of(cfg).type == "cuda" and cfg.trainer.get("benchmark") is None:
        extra["benchmark"] = True  # cuDNN autotuning: every batch has the same size
    return config.instantiate(
        cfg.trainer,
        "trainer",
        enable_progress_bar=sys.stderr.isatty() if progress_bar is None else progress_bar,
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


@dataclass
class Trained:
    """A finished training: its MLflow run and the restored best epoch's metrics, by MLflow name."""

    run_id: str
    metrics: dict[str, float]


def print_where(cfg: DictConfig, client, run, final: dict, output_dir: Path) -> None:
    """The run's id, its optimized metric, its outputs and where to browse it."""
    server = client.tracking_uri.startswith(("http://", "https://"))
    ui = "" if server else f"segexp ui --work-dir {Path(cfg.work_dir).resolve()}, then "
    url = tracking.experiment_url(
        client.tracking_uri if server else "http://127.0.0.1:5000", run.experiment_id
    )
    metric = cfg.optimized_metric
    print(
        f"\nrun {run.run_id} in experiment '{cfg.tracking.experiment}':"
        f" {metric}={final.get(metric, float('nan')):.4f} (epoch {final['best_epoch']})"
        f"\noutputs: {output_dir}\nbrowse: {ui}{url}"
    )


def train(cfg: DictConfig, overrides: list[str] | None = None) -> Trained:
    """Train one run and log it to MLflow."""
    overrides = list(overrides or [])
    check_run_config(cfg)
    performance.configure_allocator()
    client, artifact_root = tracking.open_store(cfg.tracking, Path(cfg.work_dir))
    resume = None
    if cfg.resume:
        resume, cfg = resume_target(client, cfg.resume, overrides, artifact_root)
        check_run_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
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
        tags={str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()},
        system_metrics=bool(cfg.tracking.get("system_metrics", True)),
    ) as run:
        if resume:
            resumed_with = config.redact("overrides", " ".join(overrides))
            run.set_tags({tracking.tags.RESUMED_WITH: resumed_with})
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
        final = report.log_final_evaluation(
            run, trainer, module, datamodule, output_dir, cfg.tracking
        )
    print_where(cfg, client, run, final, output_dir)
    return Trained(run.run_id, final)


@hydra.main(config_path=str(config.CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point (`segexp train`, `python -m segexp.train`); returns `optimized_metric`."""
    report.redact_hydra_outputs()  # Hydra wrote its copies before this job, secrets in clear
    if tracking.received_signal:  # a sweep that was told to stop starts no further job
        raise SystemExit(128 + tracking.received_signal[0])
    performance.configure_threads(sweep.threads_per_job())
    overrides = list(HydraConfig.get().overrides.task)
    log = None  # a blame cell's output goes to its own file, the blame prints progress lines
    if cfg.get("blame"):  # one cell of `segexp blame`, launched as a job of a multirun
        cfg, overrides = sweep.job_config(cfg.blame.cells, cfg.blame.cell)
        log = Path(HydraConfig.get().runtime.output_dir) / "cell.log"
    if sweep.in_multirun() and os.environ.get(sweep.PARENT_ENV):
        cfg.tracking.parent_run_id = os.environ[sweep.PARENT_ENV]
        cfg.run_name = cfg.run_name or sweep.child_run_name(overrides) or None
        if cfg.sweep.resume and (reused := skip_finished(cfg)) is not None:
            return reused
    started_ms = int(time.time() * 1000)
    try:
        with output_to(log) if log else contextlib.nullcontext():
            final = train(cfg, overrides)
    except Exception as err:
        if log:  # a failed cell's output is what explains it: with its run, if it got one
            log_failed_cell(cfg, log, started_ms)
        if not isinstance(err, ConfigError | DataError | tracking.StoreError):
            raise
        if sweep.in_multirun():
            raise  # Hydra records the failed job; the sweep's summary counts it
        raise SystemExit(f"segexp train: {err}") from None
    metric = cfg.optimized_metric
    progress = cfg.tracking.parent_run_id and os.environ.get(sweep.JOBS_ENV)
    if log or progress:
        client, _ = tracking.open_store(cfg.tracking, Path(cfg.work_dir))
    if log:
        client.log_artifact(final.run_id, str(log))
    if progress:
        name = cfg.run_name or final.run_id[:8]
        parent = cfg.tracking.parent_run_id
        print(sweep.progress_line(client, parent, name, metric, final.metrics.get(metric)))
    return final.metrics.get(metric)


def log_failed_cell(cfg: DictConfig, log: Path, started_ms: int) -> None:
    """Log `log` to the run this failed job made: its parent's newest child of its name."""
    try:
        client, _ = tracking.open_store(cfg.tracking, Path(cfg.work_dir))
        parent = client.get_run(cfg.tracking.parent_run_id)
        runs = [
            r
            for r in tracking.children(client, parent)
            if r.info.run_name == cfg.run_name and r.info.start_time >= started_ms
        ]
        if runs:
            client.log_artifact(runs[-1].info.run_id, str(log))
    except Exception as err:  # the job's own failure is what Hydra must report
        print(f"segexp train: {log} not logged to the cell's run ({err})", file=sys.stderr)


def skip_finished(cfg: DictConfig) -> float | None:
    """`sweep.resume=true`: the `optimized_metric` of a FINISHED twin, which the parent adopts."""
    client, _ = tracking.open_store(cfg.tracking, Path(cfg.work_dir))
    twin = sweep.finished_twin(client, cfg)
    if twin is None:
        return None
    client.set_tag(twin, tracking.tags.REUSED_BY_SWEEP, cfg.tracking.parent_run_id)
    print(f"sweep.resume: reusing FINISHED run {twin} (same config hash and seed)")
    return client.get_run(twin).data.metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()

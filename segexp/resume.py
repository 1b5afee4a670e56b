"""`segexp train resume=RUN_ID`: which run, from which checkpoint, with which config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.utils.file_utils import local_file_uri_to_path
from omegaconf import DictConfig, OmegaConf

from segexp import config, tracking
from segexp.config import ConfigError
from segexp.models import CheckpointError, load_checkpoint

RESTORED = ("model.", "optimizer.", "scheduler.")  # config nodes a checkpoint's state overrides


@dataclass
class Resume:
    run_id: str
    checkpoint: Path
    output_dir: Path


def check_own_store(client, run, artifact_root: str | None) -> None:
    """Refuse a run whose files another store holds: resuming it would overwrite them.

    A copied SQLite store keeps its runs' absolute artifact URIs and output dirs, so resuming a
    run found in the copy would write checkpoints and evaluations into the original's run. The
    STORE tag names the database that created a run; a run logged before that tag is judged by
    its artifact URI, which must lie under this store's artifact root.
    """
    run_id, created_by = run.info.run_id, run.data.tags.get(tracking.tags.STORE)
    here = tracking.store_file(client.tracking_uri)
    if not here:  # a server: its runs have no copies
        return
    if created_by:
        if created_by != here:
            raise ConfigError(
                f"resume={run_id}: the run was created by the store {created_by}, not {here} (a "
                "copy?): its checkpoints and artifacts belong to that store's run; resume it there"
            )
        return
    root = artifact_root or (Path(here).parent / "artifacts").as_uri()
    if not is_local(root) or not is_local(run.info.artifact_uri):
        return
    artifacts, root = (
        Path(local_file_uri_to_path(u)).resolve() for u in (run.info.artifact_uri, root)
    )
    if not artifacts.is_relative_to(root):
        raise ConfigError(
            f"resume={run_id}: the run's artifacts are at {artifacts}, outside this store's "
            f"artifact root {root} (a copied store?): resuming would overwrite them; resume it "
            "in the store that holds them"
        )


def is_local(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


def resume_target(
    client, run_id: str, overrides: list[str], artifact_root: str | None = None
) -> tuple[Resume, DictConfig]:
    """The run's last checkpoint and its logged config with `overrides` applied on top.

    The stored config is data from the store: `train` checks it again before use.
    `artifact_root` is the store's (default: the `artifacts` folder beside its SQLite file).
    """
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise ConfigError(f"resume={run_id}: no such run in the tracking store ({err})") from err
    check_own_store(client, run, artifact_root)
    output_dir = Path(run.data.tags.get(tracking.tags.OUTPUT_DIR, ""))
    checkpoint = output_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise ConfigError(
            f"resume={run_id}: no checkpoint at {checkpoint}; the run cannot be resumed"
        )
    try:
        epochs_done = 1 + load_checkpoint(checkpoint, ["epoch"])["epoch"]
    except CheckpointError as err:
        raise ConfigError(f"resume={run_id}: {err}") from None
    saved = tracking.stored_config(client, run_id)
    extra = [o for o in overrides if not o.startswith("resume=")]
    groups = {p.name for p in config.CONFIG_DIR.iterdir() if p.is_dir()}
    chosen = json.loads(run.data.tags.get(tracking.tags.CHOICES, "{}"))
    switches, values = [], []
    for override in config.parse_overrides(extra):
        key = override.key_or_group
        if key.split("/")[0] not in groups or "." in key:
            values.append(override.input_line)
        elif chosen.get(key) != override.get_value_element_as_str():  # restating one is fine
            switches.append(override.input_line)
    if switches:
        raise ConfigError(
            f"resume={run_id}: a resumed run keeps its config groups; only values can change "
            f"(e.g. trainer.max_epochs=20), got {switches}"
        )
    saved = OmegaConf.create(saved)
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(values))
    frozen = [  # restored from the checkpoint: a new value would be recorded, never applied
        f"{k}={v}"
        for k, v in config.assigned(values).items()
        if k.startswith(RESTORED) and OmegaConf.select(cfg, k) != OmegaConf.select(saved, k)
    ]
    if frozen:
        raise ConfigError(
            f"resume={run_id}: the checkpoint restores the network, optimizer and schedule, so "
            f"{frozen} would not take effect; train a new run to change them"
        )
    cfg.resume = run_id
    if run.info.status == "FINISHED" and cfg.trainer.max_epochs <= epochs_done:
        raise ConfigError(
            f"resume={run_id}: the run FINISHED its {epochs_done} epochs; "
            f"pass trainer.max_epochs > {epochs_done} to train on"
        )
    return Resume(run_id, checkpoint, output_dir), cfg

"""Test helpers that are not fixtures: composed configs, MLflow queries, the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from mlflow import MlflowClient
from omegaconf import open_dict

from segexp import config, report, tracking

SHARED_HC18 = Path(__file__).resolve().parents[2] / "shared" / "data" / "hc18"
TRAINING_TIMEOUT = 240  # seconds for one tiny `segexp` command on a loaded 2-core machine


def shared_hc18_count() -> int:
    """How many training images the shared HC18 CSV lists (rows, header excluded)."""
    import pandas as pd

    return len(pd.read_csv(SHARED_HC18 / "training_set_pixel_size_and_HC.csv"))


def make_cfg(work_dir: Path, *overrides: str):
    """Compose conf/train.yaml with CLI-style overrides, as `segexp train` would."""
    return config.compose([f"work_dir={work_dir}", *overrides])


def tiny(work_dir: Path, root: Path, *overrides: str):
    """The `debug=tiny` config on the dataset at `root`, with `overrides`."""
    return make_cfg(work_dir, "debug=tiny", f"dataset.root={root}", *overrides)


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.5):
    """The predicate's first true value, polled every `interval` s; TimeoutError past `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def an_epoch_is_logged(client: MlflowClient, experiment: str = "hc18_synthetic") -> bool:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return bool(runs) and bool(steps(client, runs[0].info.run_id, "val/dice"))


def planted_run(client, work_dir, files: dict[str, bytes]) -> str:
    """A run whose artifacts are `files` ({artifact path: bytes}), as a hostile store holds them."""
    experiment = client.create_experiment("planted", (work_dir / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    for name, content in files.items():
        local = work_dir / "plant" / name
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(content)
        client.log_artifact(run_id, str(local), os.path.dirname(name) or None)
    return run_id


def no_runs(client) -> bool:
    """No run in any experiment of the store."""
    return not client.search_runs([e.experiment_id for e in client.search_experiments()])


# ------------------------------------------------------------ the CLI in a child process


def segexp_command(*args: str, module: str = "segexp") -> list[str]:
    """The argv of `segexp ARGS` (`python -m segexp`); `module="segexp.train"` for DDP, whose
    launcher re-runs argv[0] for the other ranks."""
    return [sys.executable, "-m", module, *args]


def segexp_env(work_dir: Path | None = None, env: dict | None = None) -> dict[str, str]:
    """The child's environment: unbuffered output, SEGEXP_WORK_DIR when given, then `env`."""
    extra = {"SEGEXP_WORK_DIR": str(work_dir)} if work_dir is not None else {}
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra, **(env or {})}


def as_from_a_terminal() -> None:
    """Ctrl-C reaches the child as from a shell: a child inherits an ignored SIGINT, and
    Lightning's interrupt handling in an in-process test leaves the test process ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_segexp(
    *args: str,
    work_dir: Path | None = None,
    env: dict | None = None,
    timeout: float = TRAINING_TIMEOUT,
    module: str = "segexp",
) -> subprocess.CompletedProcess:
    """`segexp ARGS` to its end, stdout and stderr captured apart as text."""
    return subprocess.run(
        segexp_command(*args, module=module),
        env=segexp_env(work_dir, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=as_from_a_terminal,
    )


def start_segexp(
    *args: str,
    work_dir: Path | None = None,
    env: dict | None = None,
    log: Path | None = None,
    module: str = "segexp",
) -> subprocess.Popen:
    """`segexp ARGS` in the background, stderr into stdout: a text pipe, or the file `log`
    (a pipe nobody reads fills up and blocks a long child)."""
    command, child_env = segexp_command(*args, module=module), segexp_env(work_dir, env)
    if log is None:
        return subprocess.Popen(
            command,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=as_from_a_terminal,
        )
    with open(log, "w") as out:  # the child keeps its own handle
        return subprocess.Popen(
            command,
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=as_from_a_terminal,
        )


def start_long_run(work_dir: Path, client: MlflowClient, hc18_root: Path) -> subprocess.Popen:
    """`segexp train` in a subprocess with outputs in work_dir/out, once an epoch is logged."""
    proc = start_segexp(
        "train",
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "trainer.max_epochs=500",
        "hydra.run.dir=" + str(work_dir / "out"),
        work_dir=work_dir,
    )
    wait_for(lambda: an_epoch_is_logged(client))
    return proc


def predict_args(run_id: str, hc18_root: Path, work_dir: Path) -> list[str]:
    """`segexp predict RUN` on the synthetic HC18 test set, writing work_dir/sub.csv."""
    return [
        "predict",
        run_id,
        "--images",
        str(hc18_root / "test_set"),
        "--pixel-csv",
        str(hc18_root / "test_set_pixel_size.csv"),
        "--out",
        str(work_dir / "sub.csv"),
        "--work-dir",
        str(work_dir),
    ]


@contextlib.contextmanager
def hydra_job(overrides: list[str]):
    """The job config of `segexp train OVERRIDES`, Hydra's runtime config set as Hydra's
    run_job sets it for the job (what `report.choice_tags` reads)."""
    with initialize_config_dir(str(config.CONFIG_DIR), version_base="1.3"):
        composed = compose("train", overrides=overrides, return_hydra_config=True)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(composed)
    try:
        cfg = copy.deepcopy(composed)
        with open_dict(cfg):
            del cfg["hydra"]
        yield cfg
    finally:
        HydraConfig.instance().cfg = previous


def recorded_run(work_dir: Path, root: Path, *overrides: str, hydra: bool = True) -> str:
    """A run whose inputs (tags, config.yaml) `segexp train OVERRIDES` recorded; no training.

    `hydra=False`: as `train(cfg, overrides)` called from Python records them, without the
    config-group choices only a Hydra job knows.
    """
    from segexp.train import build_datamodule

    overrides = [f"work_dir={work_dir}", f"dataset.root={root}", *overrides]
    job = hydra_job(overrides) if hydra else contextlib.nullcontext(config.compose(overrides))
    with job as cfg:
        client, artifacts = tracking.open_store(cfg.tracking, work_dir)
        datamodule = build_datamodule(cfg)
        name = " ".join(overrides[2:]) or "defaults"
        with tracking.TrackedRun(client, cfg.tracking.experiment, artifacts, name) as run:
            output_dir = work_dir / "outputs" / run.run_id
            # what `segexp train` passes on: the overrides of the job, as Hydra parsed them
            task = list(HydraConfig.get().overrides.task) if hydra else overrides
            report.log_run_inputs(run, cfg, task, datamodule, output_dir)
    return run.run_id

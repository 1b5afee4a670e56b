"""The life of one MLflow run: status on every exit, params, tags and per-epoch metrics."""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Metric, Param, RunTag
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from segexp import config
from segexp.files import atomic_path

from . import stopping, store, system, tags

RUN_ENV = "SEGEXP_RUN_ID"  # rank 0's run, for the DDP processes Lightning starts
PARAM_BATCH = 100  # MLflow's per-request limit on params


def git_tags() -> dict[str, str]:
    """Commit and dirty flag of the segexp checkout, when it is one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=config.PACKAGE_DIR,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()

    try:
        return {
            "mlflow.source.git.commit": git("rev-parse", "HEAD"),
            "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {}


class TrackedRun:
    """Context manager around one MLflow run: creates or resumes it and always ends its status.

    FINISHED when the block completes; KILLED on Ctrl-C or SIGTERM; FAILED with a
    `failure_reason` tag on any other exception (which is re-raised).
    """

    def __init__(
        self,
        client: MlflowClient,
        experiment: str,
        artifact_root: str | None,
        run_name: str,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        system_metrics: bool = False,
    ):
        self.client, self.run_name, self.resume_run_id = client, run_name, resume_run_id
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})  # set when the run is created
        self.experiment_id = store.experiment_id(client, experiment, artifact_root)
        self.run_id: str | None = resume_run_id
        self.signal_received: int | None = None
        self.closing = False  # the run is being ended: a signal now only records itself
        self.interrupted = False  # set by EpochMetricsToMLflow when Lightning saw Ctrl-C
        self.system_metrics = system_metrics  # MLflow's System metrics tab, sampled in a thread
        self.monitor = None
        # DDP: the processes Lightning starts for ranks > 0 re-run `segexp train`; they train
        # and validate but write nothing, into rank 0's run (its id comes in the environment).
        self.active = rank_zero_only.rank == 0

    def open(self) -> str:
        """Create the run (or set the resumed one RUNNING) and tag this process; returns its id."""
        if self.resume_run_id:
            self.client.update_run(self.resume_run_id, status="RUNNING")
        else:
            parent = {tags.PARENT: self.parent_run_id} if self.parent_run_id else {}
            run = self.client.create_run(
                self.experiment_id, run_name=self.run_name, tags={**self.tags, **parent}
            )
            self.run_id = run.info.run_id
        where = {tags.PID: str(os.getpid()), tags.HOST: socket.gethostname()}
        if job := slurm_job_id():  # squeue / sacct / scancel know the run by it
            where[tags.SLURM_JOB] = job
        self.set_tags(where)
        if self.system_metrics:
            resumed = bool(self.resume_run_id)
            self.monitor = system.start(self.client.tracking_uri, self.run_id, resumed)
        return self.run_id

    def close(self, status: str, reason: dict[str, str] | None = None) -> None:
        """Mark the run `status`, with its `failure_reason` / `stop_reason` tag if any."""
        if self.monitor is not None:  # stopped first: its last point lands while still RUNNING
            monitor, self.monitor = self.monitor, None
            system.stop(monitor)
        self.set_tags(reason or {})
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> TrackedRun:
        if not self.active:
            self.run_id = os.environ.get(RUN_ENV)
            return self
        self.open()
        os.environ[RUN_ENV] = self.run_id
        self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_signal)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not an ignored one
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
        self._unraisable = stopping.catch_swallowed()
        stopping.run_open.set()
        launcher = os.environ.get(stopping.LAUNCHER_PID_ENV, "")
        if launcher.isdigit() and int(launcher) != os.getpid():  # a joblib/submitit worker
            stopping.watch_launcher(int(launcher))
        return self

    def _on_signal(self, signum, frame):
        self.signal_received = self.signal_received or signum
        stopping.received_signal.append(signum)
        if not self.closing:
            stopping.interrupt(signum, frame)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        self.closing = True
        os.environ.pop(RUN_ENV, None)
        try:
            status = self._end(exc_type, exc)
        finally:  # restored once the run is marked: a SIGTERM now cannot kill it half-marked
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            sys.unraisablehook = self._unraisable
            stopping.run_open.clear()
        if status == "KILLED":  # the shell's code for "killed by": 143 for SIGTERM, 130 for Ctrl-C
            raise SystemExit(128 + (self.signal_received or signal.SIGINT)) from exc
        return False

    def _end(self, exc_type, exc) -> str:
        """Mark the run FINISHED, KILLED or FAILED for how its block ended; returns the status."""
        if exc_type is None:
            status, reason = "FINISHED", {}
        elif self.signal_received or self.interrupted or issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"  # Lightning turns Ctrl-C into SystemExit(1): `interrupted` remembers
            why = f"signal {self.signal_received}" if self.signal_received else "interrupted"
            reason = {"stop_reason": why}
        else:
            status, reason = "FAILED", {"failure_reason": f"{exc_type.__name__}: {exc}"[:5000]}
        try:
            self.close(status, reason)
        except Exception as err:  # the store itself is gone: say so, keep the original error
            print(
                f"segexp: could not mark run {self.run_id} {status} in the tracking store "
                f"({type(err).__name__}); `segexp runs cleanup` marks it once the store is back"
            )
            if exc_type is None:
                raise
        return status

    def set_tags(self, values: dict[str, str]) -> None:
        if not self.active or not values:
            return
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def log_params(self, params: dict[str, str]) -> None:
        if not self.active:
            return
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def log_inputs(self, datasets: list[DatasetInput]) -> None:
        if not self.active:
            return
        self.client.log_inputs(self.run_id, datasets=datasets)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def logged_steps(self, key: str) -> set[int]:
        if not self.active:
            return set()
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def metric_history(self, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
        return {
            k: sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, k))
            for k in keys
        }


class NonFiniteMetricError(FloatingPointError):
    """A loss or metric became NaN or Inf: training stops instead of logging it as if fine."""


class EpochMetricsToMLflow(pl.Callback):
    """Logs every `train/*` and `val/*` metric once per epoch with step = epoch, then `last.ckpt`.

    Metrics are logged before `last.ckpt` is replaced, and epochs that a resumed run already
    logged are skipped, so a crash at any point leaves one value per epoch, no gaps, no duplicates.
    On an exception (Ctrl-C, SIGTERM, error) the current state goes to `on_exception.ckpt`.
    """

    def __init__(self, run: TrackedRun, checkpoint_dir: Path):
        self.run, self.checkpoint_dir = run, Path(checkpoint_dir)
        self.logged: set[int] = set()

    def state_dict(self) -> dict:
        """RNG states, so a resumed run shuffles and augments as the uninterrupted one would.

        Plain tensors and lists only: checkpoints stay loadable with `weights_only=True`.
        """
        _, keys, position, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "python": list(random.getstate()[1]),
            "python_gauss": random.getstate()[2],
        }

    def load_state_dict(self, state: dict) -> None:
        if "torch" not in state:
            return  # a checkpoint from before RNG states were saved
        torch.set_rng_state(state["torch"])
        keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate((3, tuple(state["python"]), state["python_gauss"]))

    def on_fit_start(self, trainer, pl_module) -> None:
        self.logged = self.run.logged_steps("train/loss")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])  # the epoch's, before a step
        self._start = self._train_end = time.perf_counter()
        self._images, self._first = 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch["image"])
        self._train_end = time.perf_counter()
        if self._first is None:  # (images, time) after the first step, which pays warm-ups
            self._first = (self._images, self._train_end)

    def timing(self) -> dict[str, float]:
        """Wall seconds of the epoch (validation included) and train images per second.

        `time/steady_images_per_second` leaves out the epoch's first step (loader start-up,
        kernels re-tuned after validation), which a short epoch cannot amortise.
        """
        train_seconds = max(self._train_end - self._start, 1e-9)
        timing = {
            "time/epoch_seconds": time.perf_counter() - self._start,
            "time/train_seconds": train_seconds,
            "time/train_images_per_second": self._images / train_seconds,
        }
        if self._first is not None and self._images > self._first[0]:
            steady = max(self._train_end - self._first[1], 1e-9)
            timing["time/steady_images_per_second"] = (self._images - self._first[0]) / steady
        return timing

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train/", "val/"))
        }
        metrics["train/lr"] = self._lr
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteMetricError(f"non-finite metrics at epoch {epoch}: {bad}")
        timing = self.timing()
        if epoch not in self.logged:
            self.run.log_metrics({**metrics, **timing}, step=epoch)
            self.logged.add(epoch)
        if trainer.progress_bar_callback is None and trainer.is_global_zero:
            shown = {k: v for k, v in metrics.items() if k.count("/") == 1 and "_" not in k}
            line = " ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items()))
            print(f"epoch {epoch}: {line} ({timing['time/epoch_seconds']:.0f} s)", flush=True)
        self._save(trainer, "last.ckpt")

    def _save(self, trainer, name: str) -> None:
        # atomic: a kill mid-write keeps the previous file; every rank calls it, rank 0 writes
        with atomic_path(self.checkpoint_dir / name, publish=trainer.is_global_zero) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, KeyboardInterrupt | SystemExit):
            self.run.interrupted = True
        self._save(trainer, "on_exception.ckpt")


def slurm_job_id() -> str | None:
    """This SLURM job's id as squeue shows it: `8_1` for an array task (a sweep's jobs), whose
    plain array id `8` would make `scancel` cancel every task of the sweep."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")

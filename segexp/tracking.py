"""MLflow tracking: the explicit default store, run lifecycle, params, tags and per-epoch metrics.

The embedded default is `sqlite:///<work_dir>/mlflow.db` with artifacts in `<work_dir>/artifacts`
(`work_dir` defaults to `./mlruns`); `tracking.uri` or `MLFLOW_TRACKING_URI` points at a server.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_ENV = "SEGEXP_RUN_ID"  # rank 0's run, for the DDP processes Lightning starts
PARAM_BATCH = 100  # MLflow's per-request limit on params
SECRET_KEY = re.compile(r"pass(word)?|secret|token|api_?key|credential", re.IGNORECASE)
URI_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")
OVERRIDE_SECRET = re.compile(
    r"((?:pass(?:word)?|secret|token|api_?key|credential)[^=\s]*=)\S+", re.IGNORECASE
)


def redact(key: str, value: str) -> str:
    """Hide passwords in URIs and the values of secret-looking keys."""
    if SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return "***"
    value = OVERRIDE_SECRET.sub(r"\1***", value)
    return URI_PASSWORD.sub(r"\1***\3", value)


def store_locations(tracking_cfg: DictConfig, work_dir: Path) -> tuple[str, str]:
    """(tracking URI, artifact root URI): explicit config, then MLFLOW_TRACKING_URI, then default."""
    uri = tracking_cfg.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or f"sqlite:///{(work_dir / 'mlflow.db').resolve()}"
    artifacts = tracking_cfg.get("artifact_location") or (work_dir / "artifacts").resolve().as_uri()
    return uri, artifacts


def prepare_store(uri: str, artifact_root: str) -> MlflowClient:
    """A client for `uri`; a SQLite store is created and migrated once, under a file lock.

    Several processes opening a fresh SQLite database at once race in MLflow's schema setup,
    so the first one creates it while the others wait on the lock.
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(Path(f"{db}.lock")):
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, artifact_root)  # creates or migrates the schema, then closes
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str, artifact_root: str) -> str:
    """Get or create the experiment, with its artifacts under `artifact_root/<name>`."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=f"{artifact_root.rstrip('/')}/{name}"
        )
    except MlflowException:  # created by a concurrent job in between
        return client.get_experiment_by_name(name).experiment_id


def redacted(cfg: DictConfig | ListConfig, key: str = "", raw=None):
    """The resolved config as plain containers, with secret values and URI passwords hidden.

    A value written as `${oc.env:NAME}` is kept as that text: what the environment held
    (a token, a password) never reaches params, tags or config.yaml, and resume re-reads it.
    """
    if OmegaConf.is_config(cfg):
        raw = OmegaConf.to_container(cfg, resolve=False)
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(raw, str) and "${oc.env:" in raw:
        return raw
    if isinstance(cfg, dict):
        raw = raw if isinstance(raw, dict) else {}
        return {k: redacted(v, f"{key}.{k}", raw.get(k)) for k, v in cfg.items()}
    if isinstance(cfg, list):
        raw = raw if isinstance(raw, list) and len(raw) == len(cfg) else [None] * len(cfg)
        return [redacted(v, key, r) for v, r in zip(cfg, raw, strict=True)]
    return redact(key, cfg) if isinstance(cfg, str) else cfg


def flatten(node: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict as `a.b.c -> value` strings, lists kept whole, values never truncated."""
    flat: dict[str, str] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


# Keys that say where and how a run was recorded, not what was trained.
BOOKKEEPING = (
    "work_dir",
    "run_name",
    "resume",
    "tracking.",
    "dataset.root",
    "dataset.cache_dir",
    "dataset.num_workers",
    "performance.",  # memory layout and compilation change speed, not what is trained
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "sweep.",
)
REPLICATE = ("seed", "dataset.split_seed")  # replicates, not factors


def is_bookkeeping(key: str) -> bool:
    return key in REPLICATE or any(
        key == b or (b.endswith(".") and key.startswith(b)) for b in BOOKKEEPING
    )


def config_hash(config: dict) -> str:
    """Hash of what was trained (bookkeeping and seed excluded): equal configs, equal hashes."""
    flat = {k: v for k, v in flatten(config).items() if not is_bookkeeping(k)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def git_tags() -> dict[str, str]:
    """Commit and dirty flag of the segexp checkout, when it is one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "mlflow.source.git.commit": git("rev-parse", "HEAD"),
            "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower(),
        }
    except (OSError, subprocess.SubprocessError):
        return {}


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cleanup_stale_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED the RUNNING runs whose recorded process (pid on this host) is gone.

    A run killed by SIGKILL or the OOM killer cannot end itself; its `segexp.pid` and
    `segexp.host` tags tell whether anything is still writing to it. Runs of other hosts are
    left alone. Returns the ids marked.
    """
    host, marked = socket.gethostname(), []
    for run in client.search_runs(
        experiment_ids, "attributes.status = 'RUNNING'", max_results=5000
    ):
        tags = run.data.tags
        pid = tags.get("segexp.pid", "")
        if tags.get("segexp.host") != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "stop_reason", f"process {pid} on {host} is gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(run.info.run_id)
    return marked


class Interrupted(KeyboardInterrupt):
    """Raised by segexp's SIGTERM handler so Lightning shuts down as on Ctrl-C."""


class TrackedRun:
    """Context manager around one MLflow run: creates or resumes it and always ends its status.

    FINISHED when the block completes; KILLED on Ctrl-C or SIGTERM; FAILED with a
    `failure_reason` tag on any other exception (which is re-raised).
    """

    def __init__(
        self,
        client: MlflowClient,
        experiment: str,
        artifact_root: str,
        run_name: str,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ):
        self.client, self.run_name, self.resume_run_id = client, run_name, resume_run_id
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id(client, experiment, artifact_root)
        self.run_id: str | None = resume_run_id
        self.signal_received: int | None = None
        self.interrupted = False  # set by EpochMetricsToMLflow when Lightning saw Ctrl-C
        # DDP: the processes Lightning starts for ranks > 0 re-run `segexp train`; they train
        # and validate but write nothing, into rank 0's run (its id comes in the environment).
        self.active = rank_zero_only.rank == 0

    def __enter__(self) -> TrackedRun:
        if not self.active:
            self.run_id = os.environ.get(RUN_ENV)
            return self
        if self.resume_run_id:
            self.client.update_run(self.resume_run_id, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else None
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
        self.set_tags({"segexp.pid": str(os.getpid()), "segexp.host": socket.gethostname()})
        os.environ[RUN_ENV] = self.run_id
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame):
        self.signal_received = signum
        raise Interrupted(f"received signal {signum}")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        os.environ.pop(RUN_ENV, None)
        signal.signal(signal.SIGTERM, self._previous_sigterm)
        if exc_type is None:
            status = "FINISHED"
        elif self.signal_received or self.interrupted or issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"  # Lightning turns Ctrl-C into SystemExit(1): `interrupted` remembers
            self.set_tags(
                {
                    "stop_reason": f"signal {self.signal_received}"
                    if self.signal_received
                    else "interrupted"
                }
            )
        else:
            status = "FAILED"
            self.set_tags({"failure_reason": f"{exc_type.__name__}: {exc}"[:5000]})
        self.client.set_terminated(self.run_id, status=status)
        if self.signal_received:
            raise SystemExit(
                128 + self.signal_received
            ) from exc  # the shell's code for "killed by"
        return False

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

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
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteMetricError(f"non-finite metrics at epoch {epoch}: {bad}")
        if epoch not in self.logged:
            self.run.log_metrics({**metrics, **self.timing()}, step=epoch)
            self.logged.add(epoch)
        self._save(trainer, "last.ckpt")

    def _save(self, trainer, name: str) -> None:
        tmp = self.checkpoint_dir / f".{name}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:  # atomic: a kill mid-write keeps the previous file
            os.replace(tmp, self.checkpoint_dir / name)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, KeyboardInterrupt | SystemExit):
            self.run.interrupted = True
        self._save(trainer, "on_exception.ckpt")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield

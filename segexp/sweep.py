"""Hydra multirun as one MLflow parent run with one child run per job.

`SweepCallback` (registered in conf/train.yaml under `hydra.callbacks`) runs in the launching
process: before any job starts it creates the store (so parallel jobs never race on a fresh
SQLite schema), marks runs of dead processes KILLED and opens the parent run, whose id reaches
every job through the environment (in-process, joblib workers and submitit jobs inherit it).
When the sweep ends, or the process exits because a job failed, it writes the summary
(`sweep/summary.csv`, `sweep/by_seed.csv`, `sweep/val_dice.png`) and ends the parent: FINISHED
when every job finished, else FAILED (KILLED on Ctrl-C / SIGTERM).
A search (`hparams_search=`: Optuna's sweeper proposes each config) is the same with `n_trials`
jobs; its parent also records the search space, from which `segexp effects` ranks parameters.
A listed multirun (`segexp blame`'s cells) gives each job its own overrides through a jobs file.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from segexp import compare, config, performance, tracking
from segexp.config import ConfigError, config_hash, redact, redacted
from segexp.evaluation import lower_is_better
from segexp.tracking import tags

PARENT_ENV = "SEGEXP_SWEEP_PARENT_RUN_ID"
SWEPT_ENV = "SEGEXP_SWEPT_KEYS"  # keys with several values: they name the child runs
JOBS_ENV, START_ENV = "SEGEXP_SWEEP_JOBS", "SEGEXP_SWEEP_START"  # for the progress lines


def write_jobs(jobs: list[dict], work_dir: Path) -> tuple[Path, list[str]]:
    """A jobs file (each job's `name`, `overrides`, `tags`) and the multirun overrides that run it."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=work_dir) as handle:
        json.dump(jobs, handle)
    index = ",".join(str(i) for i in range(len(jobs)))
    return Path(handle.name), [f"+blame.cells={handle.name}", f"+blame.cell={index}"]


def job_config(jobs_file: str, index: int) -> tuple[DictConfig, list[str]]:
    """(config, overrides) of job `index` of a jobs file, composed as `segexp train` would."""
    job = json.loads(Path(jobs_file).read_text())[index]
    cfg = config.compose(job["overrides"])
    cfg.run_name = job["name"]
    OmegaConf.update(cfg, "tracking.tags", job.get("tags", {}), force_add=True)
    return cfg, list(job["overrides"])


def grid(overrides: list[str]) -> str:
    """The sweep's task overrides as one string: equal strings, same sweep (for `sweep.resume`)."""
    return " ".join(sorted(o for o in overrides if not o.startswith("sweep.resume=")))


def child_run_name(overrides: list[str]) -> str:
    """A sweep job's run name: its swept values, short and distinct, e.g. `lr=3e-4 bs=16 s=2`."""
    keys = os.environ.get(SWEPT_ENV, "").split()
    values = config.assigned(overrides)
    if searching():  # a sampled 0.013826232179369865 names its run as 0.0138
        values = {k: rounded(v) for k, v in values.items()}
    seed = values.get("seed") if "seed" in keys else None
    return tracking.run_label(((k, values[k]) for k in keys if k in values and k != "seed"), seed)


def rounded(value: str) -> str:
    """A float to 3 significant digits, anything else as it is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.3g}"


@dataclass(frozen=True)
class Search:
    """A sweep whose configs a sampler proposes (Optuna's), not a grid."""

    space: list[str]  # `key=distribution` as the sweeper reads them: its params, then task sweeps
    trials: int
    direction: str
    sampler: dict

    @property
    def keys(self) -> list[str]:
        return [o.key_or_group for o in config.parse_overrides(self.space)]

    def grid(self) -> str:
        """What makes two searches the same search (`sweep.resume`), beside the task overrides."""
        sampler = json.dumps(self.sampler, sort_keys=True, default=str)
        return f" | search {self.direction} n_trials={self.trials} {sampler} " + " ".join(
            sorted(self.space)
        )


def searching() -> bool:
    """Whether this job is a trial of a search: its sweeper proposes `n_trials` configs."""
    return in_multirun() and "n_trials" in HydraConfig.get().sweeper


def search_of(cfg: DictConfig) -> Search | None:
    """The multirun's search, checked key by key; None for a grid (Hydra's basic sweeper)."""
    sweeper = cfg.hydra.sweeper
    if "n_trials" not in sweeper:
        return None
    task = list(cfg.hydra.overrides.task)  # sweeps here are searched as the sweeper's params
    parsed = config.parse_overrides(task)
    swept = [t for t, o in zip(task, parsed, strict=True) if o.is_sweep_override()]
    space = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + swept
    trials, direction = sweeper.n_trials, getattr(sweeper.direction, "name", sweeper.direction)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials={trials!r} must be an integer >= 1")
    metric = cfg.optimized_metric
    wanted = "minimize" if lower_is_better(metric) else "maximize"
    if direction != wanted:
        raise ConfigError(
            f"hydra.sweeper.direction={direction!r} does not match optimized_metric {metric} "
            f"(better {'lower' if wanted == 'minimize' else 'higher'}): set it to {wanted}"
        )
    if not space:
        raise ConfigError("hydra.sweeper.params is empty: the search has nothing to search")
    sampler = OmegaConf.to_container(sweeper.sampler, resolve=True) if "sampler" in sweeper else {}
    search = Search(space, trials, direction, sampler)
    for key in search.keys:  # else every trial would fail, after the parent run is open
        if (
            not key.startswith("+")
            and key not in cfg.hydra.runtime.choices
            and not has_key(cfg, key)
        ):
            raise ConfigError(f"hydra.sweeper.params.{key}: no such config key or group")
    return search


def has_key(cfg: DictConfig, key: str) -> bool:
    missing = object()
    return OmegaConf.select(cfg, key, default=missing, throw_on_missing=False) is not missing


def sweep_shape(overrides: list[str]) -> tuple[list[str], int]:
    """(swept keys, number of jobs) of a grid sweep."""
    swept = [o for o in config.parse_overrides(overrides) if o.is_sweep_override()]
    jobs = 1
    for o in swept:
        jobs *= len(list(o.sweep_string_iterator()))
    return [o.key_or_group for o in swept], jobs


def progress_line(
    client: MlflowClient, parent_run_id: str, name: str, metric: str, value: float | None
) -> str:
    """`job 3/8 done (lr=3e-4 bs=16): val/dice_best 0.812, ETA 14 min` after a sweep job."""
    parent = client.get_run(parent_run_id)
    done = sum(r.info.status != "RUNNING" for r in tracking.children(client, parent))
    progress = tracking.Progress(
        total=int(os.environ.get(JOBS_ENV) or done),
        done=done - 1,
        start=float(os.environ.get(START_ENV) or time.time()),
        counted=done - 1,
    )
    return progress.line("job", name, metric, value, f"no {metric}")


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def threads_per_job() -> int:
    """Cores divided by the jobs that run at once, so parallel jobs do not oversubscribe."""
    if os.environ.get("SEGEXP_THREADS"):
        return int(os.environ["SEGEXP_THREADS"])
    cores = performance.usable_cores()
    jobs = 1
    if in_multirun():
        n_jobs = HydraConfig.get().launcher.get("n_jobs") or 1
        jobs = cores if n_jobs < 0 else n_jobs
    return max(1, cores // jobs)


def finished_twin(client: MlflowClient, cfg: DictConfig) -> str | None:
    """A FINISHED run of the same config hash and seed in this experiment (`sweep.resume`)."""
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    run = tracking.finished_run(
        client, experiment.experiment_id, config_hash(redacted(cfg)), cfg.seed
    )
    return run.info.run_id if run else None


def previous_parent(client: MlflowClient, experiment_id: str, sweep_grid: str):
    """The latest parent run of the same grid (`sweep.resume=true` re-opens it), or None."""
    parents = client.search_runs(
        [experiment_id],
        f"tags.`{tags.ROLE}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    return next((r for r in parents if r.data.tags.get(tags.SWEEP_GRID) == sweep_grid), None)


class SweepCallback(Callback):
    """Parent run around a Hydra multirun; see the module docstring."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.parent: tracking.TrackedRun | None = None
        self.interrupted = False
        self.closing = False  # the summary is being written: a signal now only records itself

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if os.environ.get(PARENT_ENV):
            return  # jobs of an outer run (`segexp blame` cells): that run is their parent
        try:
            search = search_of(config)  # before the store: a bad search trains nothing
        except ConfigError as err:
            raise SystemExit(f"segexp train: {err}") from None
        self.client, artifact_root = tracking.open_store(config.tracking, Path(config.work_dir))
        experiment = config.tracking.experiment
        self.parent = tracking.TrackedRun(
            self.client, experiment, artifact_root, "", tags={tags.ROLE: "sweep"}
        )
        tracking.cleanup_stale_runs(self.client, [self.parent.experiment_id])
        task = list(config.hydra.overrides.task)
        sweep_grid = redact("overrides", grid(task) + (search.grid() if search else ""))
        keys, jobs = (search.keys, search.trials) if search else sweep_shape(task)
        previous = config.get("sweep", {}).get("resume") and previous_parent(
            self.client, self.parent.experiment_id, sweep_grid
        )
        if previous:
            self.parent.resume_run_id = self.parent.run_id = previous.info.run_id
        else:
            name = " x ".join(tracking.short_key(k) for k in keys) or "1 config"
            self.parent.run_name = f"sweep {name} ({jobs} runs)"[:250]
            self.parent.tags.update(
                {
                    "segexp.sweep_id": uuid.uuid4().hex[:8],
                    tags.SWEEP_GRID: sweep_grid,
                    "segexp.sweep_dir": str(Path(config.hydra.sweep.dir).resolve()),
                    "hydra.launcher": str(config.hydra.launcher.get("_target_", "")),
                    **tracking.git_tags(),
                    **(search_tags(search) if search else {}),
                }
            )
        parent_run_id = self.parent.open()
        os.environ[PARENT_ENV] = parent_run_id
        os.environ[tracking.LAUNCHER_PID_ENV] = str(os.getpid())
        os.environ[SWEPT_ENV] = " ".join(keys)
        os.environ[JOBS_ENV], os.environ[START_ENV] = str(jobs), str(time.time())
        print(f"sweep parent run {parent_run_id} (experiment '{experiment}')")
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        atexit.register(self.finish)  # a failed job makes Hydra exit before on_multirun_end

    def _on_sigterm(self, signum, frame):
        self.interrupted = True
        tracking.received_signal.append(signum)  # no further job starts, whatever catches this
        if not self.closing:  # raised in the summary, it would leave the parent RUNNING
            # not inside a store call: it would keep SQLite locked
            tracking.interrupt(signum, frame)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.finish()

    def finish(self) -> None:
        """Summary artifacts and the parent's final status; runs once."""
        if self.parent is None:
            return
        run, self.parent = self.parent, None
        self.closing = True
        try:
            self._summarize_and_close(run)
        finally:
            self.closing = False

    def _summarize_and_close(self, run: tracking.TrackedRun) -> None:
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(tracking.LAUNCHER_PID_ENV, None)
        client = self.client
        parent = client.get_run(run.run_id)
        wait_for_jobs(client, parent)
        tracking.cleanup_stale_runs(client, [run.experiment_id])
        runs = tracking.children(client, parent)
        runs = list(
            {r.info.run_id: r for r in runs + tracking.reused_runs(client, parent)}.values()
        )
        latest = latest_per_config(runs)
        statuses = {r.info.status for r in latest}
        if self.interrupted or "KILLED" in statuses:
            status = "KILLED"  # `sweep.resume=true` finishes it
        else:
            status = "FINISHED" if latest and statuses == {"FINISHED"} else "FAILED"
        try:
            if latest:
                compare.write_summary(client, run.run_id, latest)
        finally:  # a summary that could not be written leaves no parent RUNNING
            run.set_tags({"segexp.jobs": str(len(latest))})
            run.close(status)
        print(f"sweep parent run {run.run_id}: {status}, {len(runs)} runs")


def search_tags(search: Search) -> dict[str, str]:
    """The parent's record of its search: `segexp effects` rebuilds the distributions from it."""
    space = [redact("overrides", o) for o in search.space]
    return {
        tags.SEARCH_SPACE: json.dumps(space),
        tags.SEARCH_SAMPLER: str(search.sampler.get("_target_", "")),
    }


def wait_for_jobs(client: MlflowClient, parent, timeout: float = 30.0) -> None:
    """After an abort (a worker killed, Ctrl-C), give sibling jobs time to end their runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [
            r
            for r in tracking.children(client, parent)
            if r.info.status == "RUNNING"
            and r.data.tags.get(tags.PID, "").isdigit()
            and int(r.data.tags[tags.PID]) != os.getpid()  # in-process jobs are done
            and tracking.process_alive(int(r.data.tags[tags.PID]))
        ]
        if not running:
            return
        time.sleep(0.5)


def latest_per_config(runs: list) -> list:
    """The latest run of each (config hash, seed): a re-run replaces the FAILED one it redoes."""
    latest = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        key = tracking.run_key(run)
        if (
            run.info.status == "FINISHED"
            or latest.get(key) is None
            or latest[key].info.status != "FINISHED"
        ):
            latest[key] = run
    return list(latest.values())

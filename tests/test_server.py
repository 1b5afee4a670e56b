"""A team tracking server under parallel load: real PostgreSQL, real `mlflow server`, real trainings.

A joblib sweep (4 jobs, 2 at a time) and 4 lone `segexp train` processes write at once; then the
same while the MLflow server is stopped for 10 s. Every run must end FINISHED with one `val/dice`
per epoch, its params and its artifacts on the server, or be resumable to that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import run_segexp, start_segexp, steps, wait_for
from mlflow import MlflowClient

from segexp import tracking
from segexp.tracking import server

GRID = ["optimizer.lr=1e-3,3e-3", "seed=1,2"]
TRAINING_TIMEOUT = 900  # seconds for a wave of trainings on a loaded 2-core machine


class Team:
    """PostgreSQL + `mlflow server` on loopback; the MLflow server can be stopped and restarted."""

    def __init__(self, work_dir: Path):
        self.work_dir, self.port = work_dir, server.free_port()
        self.url = f"http://{server.HOST}:{self.port}"
        self.backend = server.start_postgres(work_dir / "postgres", server.free_port())
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = server.start_mlflow(
            self.backend, self.work_dir / "artifacts", self.port, self.work_dir / "mlflow.log"
        )

    def stop(self) -> None:
        server.stop(self.proc)


def postgres_work_dir() -> Path:
    """A fresh work dir for `segexp server`, or skip where PostgreSQL is not installed."""
    try:
        server.pg_program("initdb")
        import psycopg2  # noqa: F401
    except (server.ServerError, ImportError) as err:
        pytest.skip(f"no PostgreSQL here ({err}); `make postgres` and `pip install -e .[server]`")
    # PostgreSQL refuses root and then runs as `postgres`, which cannot enter pytest's 0700
    # tmp dirs: a dir of its own under /tmp that others may traverse
    work_dir = Path(tempfile.mkdtemp(prefix="segexp-team-"))
    work_dir.chmod(0o711)
    return work_dir


@pytest.mark.slow  # a whole process lifecycle: tens of seconds
def test_segexp_server_starts_postgres_and_mlflow_and_stops_both():
    work_dir, port = postgres_work_dir(), server.free_port()
    log = work_dir / "segexp-server.out"
    proc = start_segexp("server", "--work-dir", str(work_dir), "--port", str(port), log=log)
    try:
        wait_for(lambda: "tracking.uri=" in log.read_text() or proc.poll() is not None, 300)
        assert f"tracking.uri=http://127.0.0.1:{port}" in log.read_text(), log.read_text()
        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment(tracking.experiment_id(client, "smoke", None))
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # served, not local
        assert (work_dir / "postgres" / "PG_VERSION").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    assert not (work_dir / "postgres" / "postmaster.pid").exists(), "PostgreSQL still runs"
    shutil.rmtree(work_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def team():
    work_dir = postgres_work_dir()
    try:
        team = Team(work_dir)
    except server.ServerError as err:
        shutil.rmtree(work_dir, ignore_errors=True)
        pytest.skip(f"PostgreSQL or the MLflow server cannot start here: {err}")
    yield team
    team.stop()
    server.stop_postgres(work_dir / "postgres")
    shutil.rmtree(work_dir, ignore_errors=True)


def segexp(logs: Path, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`segexp ARGS` in the background on one thread, its output in logs/<name>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    return start_segexp(*args, env={"SEGEXP_THREADS": "1", **(env or {})}, log=logs / f"{name}.log")


def train_args(team: Team, client_dir: Path, hc18_root: Path, experiment: str) -> list[str]:
    return [
        "train",
        f"work_dir={client_dir}",
        "debug=tiny",
        f"dataset.root={hc18_root}",
        f"tracking.uri={team.url}",
        f"tracking.experiment={experiment}",
    ]


def launch_wave(team, client_dir, hc18_root, experiment, *extra) -> dict[str, subprocess.Popen]:
    """The sweep (4 jobs, 2 at a time) and 4 lone trainings, all at once."""
    base = train_args(team, client_dir, hc18_root, experiment)
    logs = client_dir / "logs"
    procs = {
        "sweep": segexp(
            logs, "sweep", base[0], "-m", *base[1:], *extra, "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2", *GRID,
        )
    }  # fmt: skip
    for i in range(4):
        procs[f"solo{i}"] = segexp(
            logs, f"solo{i}", *base, *extra, f"seed={10 + i}", f"run_name=solo {i}"
        )
    return procs


def wait_all(procs: dict[str, subprocess.Popen], logs: Path) -> dict[str, int]:
    deadline = time.monotonic() + TRAINING_TIMEOUT
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs.values():
                other.kill()
            pytest.fail(f"{name} still running after {TRAINING_TIMEOUT} s:\n{log_tail(logs, name)}")
    return {name: proc.returncode for name, proc in procs.items()}


def log_tail(logs: Path, name: str) -> str:
    return (logs / f"{name}.log").read_text()[-3000:]


def runs_of(client: MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


def is_parent(run) -> bool:
    return run.data.tags.get("segexp.role") == "sweep"


def check_complete(client: MlflowClient, team: Team, run, epochs: int) -> None:
    """FINISHED, one val/dice per epoch, params, config and checkpoint in the server's store."""
    run_id = run.info.run_id
    assert run.info.status == "FINISHED", (run.info.run_name, run.data.tags)
    assert steps(client, run_id, "val/dice") == list(range(epochs)), run.info.run_name
    assert run.data.params["dataset.image_size"] == "32"
    assert {"optimizer.lr", "seed"} <= set(run.data.params)
    logged = {a.path for a in client.list_artifacts(run_id)}
    logged |= {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {"config.yaml", "checkpoints/best.ckpt"} <= logged, (run.info.run_name, logged)
    # proxied by the server into its own artifact folder, not the client's work dir
    on_server = team.work_dir / "artifacts" / run.info.experiment_id / run_id / "artifacts"
    assert (on_server / "checkpoints" / "best.ckpt").is_file(), on_server


@pytest.fixture(scope="module")
def loaded(team, hc18_root, tmp_path_factory):
    """The first wave: 8 trainings (4 of a sweep) against the server at once."""
    client_dir = tmp_path_factory.mktemp("load")
    start = time.monotonic()
    procs = launch_wave(team, client_dir, hc18_root, "load")
    codes = wait_all(procs, client_dir / "logs")
    print(f"\nwave of 8 trainings on the team server: {time.monotonic() - start:.0f} s")
    return client_dir, codes


@pytest.mark.slow  # minutes of parallel trainings on 2 cores
@pytest.mark.timeout(1800)
def test_parallel_sweep_and_trainings_lose_nothing(team, loaded):
    client_dir, codes = loaded
    logs = client_dir / "logs"
    for name, code in codes.items():
        assert code == 0, log_tail(logs, name)
    client = MlflowClient(team.url)
    runs = runs_of(client, "load")
    [parent] = [r for r in runs if is_parent(r)]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    solos = [r for r in runs if r.info.run_name.startswith("solo ")]
    assert (len(runs), len(kids), len(solos)) == (9, 4, 4), [r.info.run_name for r in runs]
    assert parent.info.status == "FINISHED"
    assert len({k.info.run_name for k in kids}) == 4
    assert {(k.data.params["optimizer.lr"], k.data.params["seed"]) for k in kids} == {
        (lr, seed) for lr in ("0.001", "0.003") for seed in ("1", "2")
    }
    for run in kids + solos:
        check_complete(client, team, run, epochs=2)
    assert not (client_dir / "artifacts").exists()  # nothing went to the client's work dir


@pytest.mark.slow  # minutes of parallel trainings on 2 cores
@pytest.mark.timeout(1800)
def test_server_gone_for_10_s_mid_training_loses_no_run(team, hc18_root, tmp_path):
    """Stop the MLflow server mid-training: runs finish or end resumable; none stays RUNNING."""
    epochs, client = 6, MlflowClient(team.url)
    start = time.monotonic()
    procs = launch_wave(team, tmp_path, hc18_root, "outage", f"trainer.max_epochs={epochs}")
    # no retries and many epochs: this one fails during the outage, so resume is exercised
    procs["fragile"] = segexp(
        tmp_path / "logs",
        "fragile",
        *train_args(team, tmp_path, hc18_root, "outage"),
        "trainer.max_epochs=500",
        "run_name=fragile",
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )

    def all_training() -> bool:
        runs = [r for r in runs_of(client, "outage") if not is_parent(r)]
        return len(runs) >= 7 and all(steps(client, r.info.run_id, "val/dice") for r in runs)

    wait_for(all_training, timeout=TRAINING_TIMEOUT, interval=2)
    [parent] = [r for r in runs_of(client, "outage") if is_parent(r)]
    stopping = time.monotonic()
    team.stop()
    # a lone training fails fast on a server that is not there; a sweep's next job, whose
    # parent run the server just stored, waits for it to come back instead of being lost
    with pytest.raises(tracking.StoreError, match="unreachable"):
        tracking.open_store({"uri": team.url}, tmp_path)
    opened = []
    job = threading.Thread(
        target=lambda: opened.append(
            tracking.open_store({"uri": team.url, "parent_run_id": parent.info.run_id}, tmp_path)
        )
    )
    job.start()
    time.sleep(10)
    team.start()
    print(f"\nMLflow server unreachable for {time.monotonic() - stopping:.0f} s")
    job.join(timeout=tracking.SERVER_PATIENCE + 10)
    assert opened, "a sweep job gave up on a server that was back"
    codes = wait_all(procs, tmp_path / "logs")
    assert codes["fragile"] != 0, log_tail(tmp_path / "logs", "fragile")

    # runs whose end could not be recorded are marked by cleanup, once the server is back
    cleanup = run_segexp("runs", "cleanup", "--tracking-uri", team.url, timeout=300)
    assert cleanup.returncode == 0, cleanup.stderr
    runs = runs_of(client, "outage")
    assert "RUNNING" not in {r.info.status for r in runs}, [(r.info.run_name, r.info.status)
                                                              for r in runs]  # fmt: skip
    trainings = [r for r in runs if not is_parent(r)]
    assert len(trainings) == 9, [r.info.run_name for r in trainings]
    resumed, epochs_of = [], {r.info.run_id: epochs for r in trainings}
    for run in trainings:
        if run.info.status == "FINISHED":
            continue
        reason = run.data.tags.get("failure_reason", "") + run.data.tags.get("stop_reason", "")
        assert team.url.split("//")[1] in reason or "is gone" in reason, reason
        more = []
        if run.info.run_name == "fragile":  # one epoch more than it logged, not 500
            epochs_of[run.info.run_id] = len(steps(client, run.info.run_id, "val/dice")) + 1
            more = [f"trainer.max_epochs={epochs_of[run.info.run_id]}"]
        # resume trains on from last.ckpt, into the same run
        done = run_segexp(
            *["train", f"resume={run.info.run_id}", *more, f"tracking.uri={team.url}"],
            work_dir=tmp_path,
            env={"SEGEXP_THREADS": "2"},
            timeout=TRAINING_TIMEOUT,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        resumed.append(run.info.run_name)
    assert "fragile" in resumed
    lost = []
    for run in trainings:
        try:
            check_complete(
                client, team, client.get_run(run.info.run_id), epochs_of[run.info.run_id]
            )
        except AssertionError as err:
            lost.append(f"{run.info.run_name}: {err}")
    print(f"outage wave: {time.monotonic() - start:.0f} s; resumed {resumed}; lost {len(lost)}")
    assert not lost


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow  # minutes of parallel trainings on 2 cores
@pytest.mark.timeout(1800)
def test_mlflow_ui_opens_segexp_experiments_on_training_runs(team, loaded, tmp_path):
    """The experiment link segexp gives opens on the runs table; the sweep's children are distinct."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `make browser` installs Debian's chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: `make browser` installs it"
    )
    client = MlflowClient(team.url)
    experiment = client.get_experiment_by_name("load")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    [parent] = [r for r in runs_of(client, "load") if is_parent(r)]
    kids = sorted(r.info.run_name for r in runs_of(client, "load") if r.data.tags.get(
        "mlflow.parentRunId") == parent.info.run_id)  # fmt: skip
    artifacts = Path(os.environ.get("SEGEXP_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            # the closed network refuses Chromium's background connections; keep it quiet
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            + ["--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(tracking.experiment_url(team.url, experiment.experiment_id))
        row = page.locator('[role="row"]', has_text=parent.info.run_name)
        row.first.wait_for(timeout=60_000)
        landed = page.url
        row.first.locator('button[data-component-id*="runnamecellrenderer"]').click()  # expand
        page.get_by_text(kids[-1], exact=True).first.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)
        names = page.locator('[role="row"] a[href*="/runs/"]').all_inner_texts()
        body = page.inner_text("body")
        page.screenshot(path=str(artifacts / "mlflow_ui_team_server.png"))
        # what MLflow's own "View experiment at" link opens (3.17: the GenAI overview)
        page.goto(f"{team.url}/#/experiments/{experiment.experiment_id}")
        page.wait_for_timeout(5000)
        print(f"\nplain experiment link lands on {page.url}")
        browser.close()
    assert "/runs" in landed and "workflowType=machine_learning" in landed, landed
    assert "Evaluation runs" not in body and "Model registry" in body, body[:500]
    assert len(set(kids)) == 4 and sorted(n for n in names if n in kids) == kids  # once each
    assert (artifacts / "mlflow_ui_team_server.png").stat().st_size > 20_000

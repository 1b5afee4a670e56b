"""Sweeps: Hydra multirun as MLflow parent + child runs, joblib in parallel, resume, compare, UI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_segexp, start_segexp, steps
from mlflow import MlflowClient

from segexp import cli, compare, sweep, tracking

GRID = ["optimizer.lr=1e-3,-1", "seed=1,2"]  # lr=-1 makes torch.optim.Adam raise: a FAILED job


def sweep_args(hc18_root: Path, *extra: str) -> list[str]:
    return ["train", "-m", "debug=tiny", f"dataset.root={hc18_root}", *extra, *GRID]


def sweep_parents(client: MlflowClient, experiment: str = "hc18_synthetic"):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], "tags.`segexp.role` = 'sweep'")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, hc18_root) -> Path:
    """4 jobs, 2 at a time (joblib, n_jobs=2) on a fresh store that no one created beforehand; the
    FINISHED ones log their model (the browser test opens the Models page)."""
    work_dir = tmp_path_factory.mktemp("sweep")
    done = run_segexp(
        *sweep_args(
            hc18_root, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracking.log_model=true"
        ),
        work_dir=work_dir,
    )
    assert done.returncode != 0, "a sweep with a FAILED job must exit non-zero"
    assert "Invalid learning rate: -1" in done.stderr + done.stdout
    (work_dir / "sweep.log").write_text(done.stdout + done.stderr)
    return work_dir


def store(work_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")


def test_parallel_sweep_is_one_parent_with_a_child_per_job(swept):
    client = store(swept)
    log = (swept / "sweep.log").read_text()
    [parent] = sweep_parents(client)
    assert parent.info.status == "FAILED", log[-3000:]
    assert {"optimizer.lr=1e-3,-1", "seed=1,2"} <= set(
        parent.data.tags["segexp.sweep_grid"].split()
    )
    assert parent.info.run_name == "sweep lr x s (4 runs)"  # no paths, no full overrides
    # one progress line per finished job; the count depends on how the parallel jobs interleave
    progress = re.findall(
        r"job [1-4]/4 done \(lr=1e-3 s=([12])\): val/dice_best \d\.\d{3}, ETA \d+ min", log
    )
    assert sorted(progress) == ["1", "2"], log[-3000:]
    kids = tracking.children(client, parent)
    assert len(kids) == 4, log[-3000:]
    by_lr = {}
    for kid in kids:
        by_lr.setdefault(kid.data.params["optimizer.lr"], []).append(kid)
        lr, seed = kid.data.params["optimizer.lr"], kid.data.params["seed"]
        assert kid.info.run_name == f"lr={'1e-3' if lr == '0.001' else lr} s={seed}"
    assert {k.info.status for k in by_lr["0.001"]} == {"FINISHED"}
    assert {k.info.status for k in by_lr["-1"]} == {"FAILED"}
    for kid in by_lr["0.001"]:
        assert steps(client, kid.info.run_id, "val/dice") == [0, 1]
    # two worker processes, two jobs each, both writing to the store that neither created
    assert len({k.data.tags["segexp.pid"] for k in kids}) == 2
    assert str(os.getpid()) not in {k.data.tags["segexp.pid"] for k in kids}

    with tempfile.TemporaryDirectory() as tmp:
        summary = pd.read_csv(
            client.download_artifacts(parent.info.run_id, "sweep/summary.csv", tmp)
        )
        by_seed = pd.read_csv(
            client.download_artifacts(parent.info.run_id, "sweep/by_seed.csv", tmp)
        )
    assert len(summary) == 4
    assert {"optimizer.lr", "seed", "val/dice_best", "best_epoch", "status", "seconds"} <= set(
        summary.columns
    )
    assert "dataset.image_size" not in summary.columns  # only what differs
    row = by_seed[by_seed["optimizer.lr"] == 0.001].iloc[0]
    finished = summary[summary.status == "FINISHED"]["val/dice_best"]
    assert row["val/dice_best_count"] == 2
    assert row["val/dice_best_mean"] == pytest.approx(finished.mean())
    assert row["val/dice_best_std"] == pytest.approx(finished.std())
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert "sweep/val_dice.png" in names


def test_sweep_resume_skips_finished_configs_and_reruns_failed(swept, hc18_root, tmp_path):
    work_dir = tmp_path / "copy"
    shutil.copytree(swept, work_dir)
    client = store(work_dir)
    before = {r.info.run_id for r in client.search_runs(["1"], max_results=100)}
    done = run_segexp(
        *sweep_args(hc18_root, "tracking.log_model=true", "sweep.resume=true"), work_dir=work_dir
    )
    assert done.returncode != 0  # lr=-1 still fails
    assert done.stdout.count("sweep.resume: reusing FINISHED run") == 2, done.stdout[-3000:]
    [parent] = sweep_parents(client)  # the same parent, re-opened
    new = [r for r in tracking.children(client, parent) if r.info.run_id not in before]
    assert sorted((r.data.params["optimizer.lr"], r.info.status) for r in new) == [
        ("-1", "FAILED"),
        ("-1", "FAILED"),
    ]
    assert parent.info.status == "FAILED"


def test_compare_shows_only_differing_params_and_logs_the_plot(swept, capsys, tmp_path):
    client = store(swept)
    [parent] = sweep_parents(client)
    out = tmp_path / "cmp.png"
    code = cli.main(
        ["compare", parent.info.run_id, "--by", "seed", "--out", str(out), "--work-dir", str(swept)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "optimizer.lr" in printed and "dataset.image_size" not in printed
    assert "by seed" in printed and out.stat().st_size > 10_000
    lines = printed.splitlines()
    header, first = lines[0].split(), lines[1].split()
    assert header[:2] == ["best", "run"] and "vs_best" in header and "run_id" not in header
    assert first[0] == "*" and first[1] == "lr=1e-3"  # best first, marked, named
    ranked = compare.ranked(compare.runs_table(compare.expand(client, [parent.info.run_id])[0]))
    assert list(ranked.status) == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    assert ranked["val/dice_best"][0] >= ranked["val/dice_best"][1] and ranked.vs_best[0] == 0
    assert ranked.vs_best[1] == ranked["val/dice_best"][1] - ranked["val/dice_best"][0]
    assert str(ranked.best_epoch.dtype) == "Int64"  # printed as 1, not 1.0000
    assert "optimizer.lr" in ranked and ranked["optimizer.lr"].dtype.kind == "f"
    assert "compare/cmp.png" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "compare")
    }


def test_sigterm_during_a_sweep_leaves_no_run_running(work_dir, client, hc18_root):
    proc = start_segexp(
        *sweep_args(hc18_root, "trainer.max_epochs=500")[:-2], "seed=1,2", work_dir=work_dir
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        found = client.get_experiment_by_name("hc18_synthetic")
        kids = found and client.search_runs(
            [found.experiment_id], "tags.`mlflow.parentRunId` != ''"
        )
        if kids and steps(client, kids[0].info.run_id, "val/dice"):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    runs = client.search_runs([client.get_experiment_by_name("hc18_synthetic").experiment_id])
    assert runs and "RUNNING" not in {r.info.status for r in runs}, output[-3000:]
    assert "KILLED" in {r.info.status for r in runs}


def test_a_signal_while_the_summary_is_written_only_records_itself():
    # a SIGTERM re-sent after a job's run closed lands in the summary's plotting: it must
    # not raise there, or the parent stays RUNNING
    callback = sweep.SweepCallback()
    callback.closing = True
    try:
        callback._on_sigterm(signal.SIGTERM, sys._getframe())
    finally:
        tracking.received_signal.clear()
    assert callback.interrupted


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(swept):
    """`mlflow server` on a free localhost port over the sweep's store."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{swept / 'mlflow.db'}",
            "--default-artifact-root",
            (swept / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up in 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_rest_api_of_a_real_server_has_the_sweep(server):
    experiment = rest(server, "experiments/get-by-name?experiment_name=hc18_synthetic")
    experiment_id = experiment["experiment"]["experiment_id"]
    runs = rest(server, "runs/search", {"experiment_ids": [experiment_id], "max_results": 100})
    runs = runs["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("segexp.role") == "sweep"]
    assert len(parents) == 1
    parent_id = parents[0]["info"]["run_id"]
    kids = [r for r, t in zip(runs, tags, strict=True) if t.get("mlflow.parentRunId") == parent_id]
    assert len(kids) == 4
    finished = [k for k in kids if k["info"]["status"] == "FINISHED"]
    assert len(finished) == 2
    for kid in finished:
        params = {p["key"]: p["value"] for p in kid["data"]["params"]}
        assert params["optimizer.lr"] == "0.001" and params["dataset.image_size"] == "32"
        history = rest(
            server, f"metrics/get-history?run_id={kid['info']['run_id']}&metric_key=val/dice"
        )
        assert sorted(m["step"] for m in history["metrics"]) == [0, 1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def sync_api():
    """Playwright's sync API, or a skip saying what `make browser` installs."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `make browser` installs Debian's chromium")
    return pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: `make browser` installs it"
    )


@pytest.fixture
def artifacts(swept) -> Path:
    """Where the screenshots are kept: SEGEXP_TEST_ARTIFACTS, else the sweep's work dir."""
    folder = Path(os.environ.get("SEGEXP_TEST_ARTIFACTS", swept))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def chromium_page(pw):
    browser = pw.chromium.launch(
        executable_path=CHROMIUM,
        # the closed network refuses Chromium's background connections; keep it quiet
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )
    return browser, browser.new_page(viewport={"width": 1800, "height": 1000})


def expand_sweep(page, url: str, parent) -> None:
    """Open the runs table at `url` and expand the sweep's parent row."""
    page.goto(url)
    row = page.locator('[role="row"]', has_text=parent.info.run_name[:40])
    row.first.wait_for(timeout=60_000)
    row.first.locator('button[data-component-id*="runnamecellrenderer"]').click()


@pytest.mark.slow  # a browser and an MLflow server: ~15 s
def test_mlflow_ui_in_headless_chromium_shows_children_and_val_dice(
    server, swept, sync_api, artifacts
):
    client = store(swept)
    [parent] = sweep_parents(client)
    with sync_api.sync_playwright() as pw:
        browser, page = chromium_page(pw)
        expand_sweep(page, f"{server}/#/experiments/{parent.info.experiment_id}/runs", parent)
        page.get_by_text("lr=1e-3 s=1").first.wait_for(timeout=30_000)
        assert "lr=-1 s=2" in page.inner_text("body")  # the FAILED children too
        # chart view: the radio input is hidden behind its styled label; a click that lands
        # while the page is still re-rendering is lost, so try again
        search = page.get_by_placeholder("Search metric charts")
        for _ in range(4):
            page.locator('input[value="CHART"]').evaluate("e => e.click()")
            try:
                search.wait_for(timeout=20_000)
                break
            except sync_api.TimeoutError:
                page.screenshot(path=str(artifacts / "mlflow_ui_sweep_waiting.png"))
        search.fill("val/dice")  # charts below the fold are not rendered; bring this one up
        page.get_by_text("val/dice", exact=True).first.wait_for(timeout=30_000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(artifacts / "mlflow_ui_sweep.png"))
        body = page.inner_text("body")
        browser.close()
    assert "lr=1e-3 s=2 (val/dice)" in body
    assert (artifacts / "mlflow_ui_sweep.png").stat().st_size > 20_000


@pytest.mark.slow  # a browser and an MLflow server: ~30 s
def test_mlflow_ui_shows_datasets_system_metrics_and_models(server, swept, sync_api, artifacts):
    client = store(swept)
    [parent] = sweep_parents(client)
    experiment = parent.info.experiment_id
    kid = next(k for k in tracking.children(client, parent) if k.info.status == "FINISHED")
    with sync_api.sync_playwright() as pw:
        browser, page = chromium_page(pw)
        runs = f"{server}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        expand_sweep(page, runs, parent)
        page.get_by_text("hc18_synthetic/train@").first.wait_for(timeout=30_000)  # Dataset
        page.screenshot(path=str(artifacts / "mlflow_ui_datasets.png"))
        table = page.inner_text("body")
        page.goto(f"{server}/#/experiments/{experiment}/runs/{kid.info.run_id}/system-metrics")
        page.get_by_text("cpu_utilization_percentage").first.wait_for(timeout=60_000)
        page.screenshot(path=str(artifacts / "mlflow_ui_system_metrics.png"))
        page.goto(f"{server}/#/experiments/{experiment}/models")
        page.get_by_text(kid.info.run_name, exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(artifacts / "mlflow_ui_models.png"))
        models = page.inner_text("body")
        browser.close()
    assert "Models" in table and table.count("hc18_synthetic/train@") >= 2
    assert "Ready" in models and "train.py" in models  # a LoggedModel of each FINISHED child
    for name in ("datasets", "system_metrics", "models"):
        assert (artifacts / f"mlflow_ui_{name}.png").stat().st_size > 20_000


@pytest.mark.slow  # a Hydra subprocess (11 s); tests/test_slurm.py submits for real
def test_slurm_launcher_config_composes(tmp_path):
    done = run_segexp(
        "train", "hydra/launcher=slurm", "--cfg", "hydra", work_dir=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in done.stdout
    assert "export SEGEXP_THREADS=" in done.stdout


@pytest.mark.slow  # a whole process lifecycle: tens of seconds
def test_submitit_local_executor_runs_the_sweep(work_dir, client, hc18_root):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install .[cluster]")
    done = run_segexp(
        *["train", "-m", "hydra/launcher=local", "debug=tiny", f"dataset.root={hc18_root}"],
        "optimizer.lr=1e-3,3e-3",
        work_dir=work_dir,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    [parent] = sweep_parents(client)
    kids = tracking.children(client, parent)
    assert parent.info.status == "FINISHED" and len(kids) == 2
    assert {k.info.status for k in kids} == {"FINISHED"}
    assert {k.data.tags["segexp.pid"] for k in kids}.isdisjoint({str(os.getpid())})


@pytest.mark.slow
def test_kill_9_of_a_joblib_sweep_ends_its_workers_and_their_runs(work_dir, client, hc18_root):
    from segexp.tracking import process_alive

    proc = start_segexp(
        *sweep_args(hc18_root, "trainer.max_epochs=500", "hydra/launcher=joblib")[:-2],
        *["hydra.launcher.n_jobs=2", "seed=1,2"],
        work_dir=work_dir,
        log=work_dir / "sweep.log",
    )
    deadline = time.time() + 180
    kids = []
    while time.time() < deadline:
        found = client.get_experiment_by_name("hc18_synthetic")
        kids = found and client.search_runs(
            [found.experiment_id], "tags.`mlflow.parentRunId` != ''"
        )
        if kids and len(kids) == 2 and all(steps(client, k.info.run_id, "val/dice") for k in kids):
            break
        time.sleep(0.5)
    workers = [int(k.data.tags["segexp.pid"]) for k in kids]
    assert len(workers) == 2 and proc.pid not in workers
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 120  # the workers end their runs within seconds, then exit
    while time.time() < deadline and any(process_alive(pid) for pid in workers):
        time.sleep(0.5)
    log = (work_dir / "sweep.log").read_text()[-3000:]  # the workers' output
    assert not any(process_alive(pid) for pid in workers), "orphaned sweep workers\n" + log
    statuses = {client.get_run(k.info.run_id).info.status for k in kids}
    assert statuses == {"KILLED"}, f"{statuses}\n{log}"

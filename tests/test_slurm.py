"""Sweeps and blame cells submitted to a real SLURM scheduler: the one-node cluster of `make slurm`.

Each test skips, saying why, where no cluster answers (`sinfo` finds no usable node).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import run_segexp, start_segexp, wait_for
from mlflow import MlflowClient

from segexp import tracking
from segexp.tracking import tags

pytestmark = pytest.mark.slow
SLURM_CONF = os.environ.get("SLURM_CONF", "/tmp/segexp-slurm/slurm.conf")
ENV = {"SLURM_CONF": SLURM_CONF}
# the node has no GPU and 2 cores: one core and 1 GB a job
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=15",
]


def cluster_state() -> str:
    """The node's state as sinfo reports it ('' where no cluster answers)."""
    if shutil.which("sinfo") is None or not Path(SLURM_CONF).is_file():
        return ""
    found = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], env={**os.environ, **ENV}, capture_output=True, text=True
    )
    return found.stdout.strip() if found.returncode == 0 else ""


@pytest.fixture(autouse=True)
def cluster():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install .[cluster]")
    state = cluster_state()
    if not state.startswith(("idle", "mixed", "allocated")):
        pytest.skip(
            f"no SLURM cluster answers at {SLURM_CONF} (`make slurm` starts one): {state!r}"
        )


def store(work_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")


def parent_and_children(client: MlflowClient, role: str = "sweep"):
    experiment = client.get_experiment_by_name("hc18_synthetic").experiment_id
    parents = client.search_runs([experiment], f"tags.`{tags.ROLE}` = '{role}'")
    return parents, (tracking.children(client, parents[0]) if parents else [])


def scancel(job: str) -> None:
    subprocess.run(["scancel", job], env={**os.environ, **ENV}, check=True)


def test_a_grid_sweep_runs_as_slurm_jobs(work_dir, hc18_root):
    done = run_segexp(
        *["train", "-m", *LAUNCHER, "debug=tiny", f"dataset.root={hc18_root}"],
        *["optimizer.lr=1e-3,3e-3", "seed=1,2"],
        work_dir=work_dir, env=ENV, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    [parent], kids = parent_and_children(store(work_dir))
    assert parent.info.status == "FINISHED" and len(kids) == 4
    assert {k.info.status for k in kids} == {"FINISHED"}
    jobs = {k.data.tags.get(tags.SLURM_JOB) for k in kids}
    assert None not in jobs and len(jobs) == 4  # one SLURM job per child


def trained_run(work_dir, hc18_root, *overrides: str) -> str:
    """A run trained by the CLI (its overrides are what blame composes cells from)."""
    done = run_segexp(
        "train", "debug=tiny", f"dataset.root={hc18_root}", *overrides, work_dir=work_dir
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return re.search(r"^run ([0-9a-f]{32})", done.stdout, re.M).group(1)


def test_blame_cells_run_as_slurm_jobs(work_dir, hc18_root):
    run_a = trained_run(work_dir, hc18_root, "seed=1")
    run_b = trained_run(work_dir, hc18_root, "seed=1", "optimizer.lr=3e-3")
    done = run_segexp(
        "blame", run_a, run_b, "--seeds", "2", "--fidelity", "full", *LAUNCHER,
        "--out", str(work_dir / "blame"), work_dir=work_dir, env=ENV, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    [parent], kids = parent_and_children(store(work_dir), "blame")
    trained = [k for k in kids if k.info.run_id not in (run_a, run_b)]
    assert trained and all(k.data.tags.get(tags.SLURM_JOB) for k in trained)
    assert (work_dir / "blame" / "report.md").is_file()


def running_child(client: MlflowClient):
    """A sweep child RUNNING as a SLURM job with an epoch logged, or None."""
    if client.get_experiment_by_name("hc18_synthetic") is None:
        return None
    _, kids = parent_and_children(client)
    for kid in kids:
        running = kid.info.status == "RUNNING" and kid.data.tags.get(tags.SLURM_JOB)
        if running and client.get_metric_history(kid.info.run_id, "val/dice"):
            return kid
    return None


def test_a_cancelled_job_ends_killed_and_a_resume_reruns_only_it(work_dir, hc18_root):
    args = ["train", "-m", *LAUNCHER, "debug=tiny", f"dataset.root={hc18_root}"]
    args += ["trainer.max_epochs=40", "optimizer.lr=1e-3,3e-3"]
    log = work_dir / "sweep.log"
    proc = start_segexp(*args, work_dir=work_dir, env=ENV, log=log)
    client = store(work_dir)
    victim = wait_for(lambda: running_child(client), timeout=300)
    scancel(victim.data.tags[tags.SLURM_JOB])
    assert proc.wait(timeout=600) != 0, log.read_text()[-3000:]  # the sweep says it failed
    [parent], kids = parent_and_children(client)
    status = {k.info.run_id: k.info.status for k in kids}
    assert status.pop(victim.info.run_id) == "KILLED", log.read_text()[-3000:]
    assert list(status.values()) == ["FINISHED"]  # the other job ran on
    assert parent.info.status in ("KILLED", "FAILED")
    done = run_segexp(*args, "sweep.resume=true", work_dir=work_dir, env=ENV, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    [parent], kids = parent_and_children(client)
    assert parent.info.status == "FINISHED"
    assert sorted(k.info.status for k in kids) == ["FINISHED", "FINISHED", "KILLED"]
    [rerun] = [k for k in kids if k.info.run_id not in (victim.info.run_id, *status)]
    assert rerun.data.params["optimizer.lr"] == victim.data.params["optimizer.lr"]
    [kept] = status  # the job that finished was reused, not trained again
    assert client.get_run(kept).data.tags.get(tags.REUSED_BY_SWEEP) == parent.info.run_id


def restart_node() -> None:
    """slurmd back (ReturnToService=2 returns the node), waited for until the node is usable."""
    subprocess.run(["slurmd", "-f", SLURM_CONF], env={**os.environ, **ENV}, check=True)
    wait_for(lambda: cluster_state().startswith(("idle", "mixed")), timeout=120)


def requeued(job: str) -> bool:
    """Whether SLURM put the job back in the queue (a node failure requeues it)."""
    found = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], env={**os.environ, **ENV}, capture_output=True
    )
    return found.stdout.decode().strip() in ("PENDING", "REQUEUED")


@pytest.mark.timeout(900)
def test_a_job_whose_node_dies_is_reported_and_run_again(work_dir, hc18_root):
    args = ["train", "-m", *LAUNCHER, "debug=tiny", f"dataset.root={hc18_root}"]
    log = work_dir / "sweep.log"
    proc = start_segexp(*args, "trainer.max_epochs=30", work_dir=work_dir, env=ENV, log=log)
    client = store(work_dir)
    victim = wait_for(lambda: running_child(client), timeout=300)
    job = victim.data.tags[tags.SLURM_JOB]
    try:  # the node dies: its daemon, the job steps and the training with them
        subprocess.run(["pkill", "-9", "-x", "slurmd"], check=False)
        subprocess.run(["pkill", "-9", "-f", "slurmstepd"], check=False)
        os.kill(int(victim.data.tags[tags.PID]), 9)
        wait_for(lambda: requeued(job), timeout=120)  # SlurmdTimeout=20: the node is DOWN
    finally:
        restart_node()
    # Either submitit waits out the requeue and the job runs again, or it reads the attempt's
    # NODE_FAIL from sacct first and the sweep ends naming it; then a resume runs the job again.
    if proc.wait(timeout=600) != 0:
        text = log.read_text()
        assert "state: NODE_FAIL" in text, text[-3000:]
        subprocess.run(["scancel", job], env={**os.environ, **ENV}, check=False)
        [parent], _ = parent_and_children(client)
        assert parent.info.status in ("KILLED", "FAILED")
        resumed = [*args, "trainer.max_epochs=30", "sweep.resume=true"]
        done = run_segexp(*resumed, work_dir=work_dir, env=ENV, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    [parent], kids = parent_and_children(client)
    status = {k.info.run_id: k.info.status for k in kids}
    assert status.pop(victim.info.run_id) in ("KILLED", "FAILED")  # ended, not left RUNNING
    assert list(status.values()) == ["FINISHED"] and parent.info.status == "FINISHED"

"""Reliability: kill -9 and resume, reproducible resume, stale runs, hostile checkpoints, secrets."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import pytest
import torch
from helpers import (
    an_epoch_is_logged,
    make_cfg,
    only_run,
    predict_args,
    run_segexp,
    start_long_run,
    start_segexp,
    steps,
    wait_for,
)
from mlflow import MlflowClient
from omegaconf import OmegaConf

from segexp import cli, report, tracking
from segexp.checks import several_devices
from segexp.config import ConfigError
from segexp.train import train


@pytest.mark.slow  # a whole process lifecycle: tens of seconds
def test_kill_9_then_cleanup_then_resume_finishes_the_same_run(cfg, work_dir, client, hc18_root):
    proc = start_long_run(work_dir, client, hc18_root)
    wait_for(lambda: (work_dir / "out" / "checkpoints" / "last.ckpt").is_file())
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "RUNNING"  # what MLflow leaves behind a SIGKILL

    assert cli.main(["runs", "cleanup", "--work-dir", str(work_dir)]) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and "is gone" in run.data.tags["stop_reason"]

    done = steps(client, run.info.run_id, "val/dice")
    epochs = done[-1] + 3
    resumed = start_segexp(
        "train", f"resume={run.info.run_id}", f"trainer.max_epochs={epochs}", work_dir=work_dir
    )
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output[-3000:]
    assert "Changing param values" not in output
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "val/dice") == list(range(epochs))
    assert steps(client, run.info.run_id, "train/loss") == list(range(epochs))

    # exactly what an uninterrupted run of the same config ends with
    cfg.trainer.max_epochs, cfg.run_name = epochs, "straight"
    straight = train(cfg)
    straight_run = client.get_run(straight.run_id)

    def artifacts(run_id, path=""):
        found = set()
        for item in client.list_artifacts(run_id, path):
            found |= artifacts(run_id, item.path) if item.is_dir else {item.path}
        return found

    assert artifacts(run.info.run_id) == artifacts(straight.run_id)  # one best.ckpt, no -v1
    assert run.data.metrics["best_epoch"] == straight_run.data.metrics["best_epoch"]
    assert run.data.metrics["val/dice_best"] == pytest.approx(straight.metrics["val/dice_best"])
    best = [
        torch.load(
            Path(client.get_run(r).data.tags["segexp.output_dir"]) / "checkpoints" / "best.ckpt",
            weights_only=True,
        )
        for r in (run.info.run_id, straight.run_id)
    ]
    assert best[0]["epoch"] == best[1]["epoch"]
    for key, value in best[1]["state_dict"].items():
        assert torch.allclose(best[0]["state_dict"][key], value), key
    assert not list((work_dir / "out" / "checkpoints").glob("best-v*.ckpt"))
    # resuming a FINISHED run with no epochs to add is refused, never a duplicate evaluation
    again = start_segexp(
        "train", f"resume={run.info.run_id}", f"trainer.max_epochs={epochs}", work_dir=work_dir
    )
    output, _ = again.communicate(timeout=120)
    assert again.returncode != 0 and f"FINISHED its {epochs} epochs" in output
    assert len(client.get_metric_history(run.info.run_id, "val/dice_best")) == 1


def test_a_resumed_run_matches_the_uninterrupted_one(work_dir, client, hc18_root):
    common = ["debug=tiny", f"dataset.root={hc18_root}", "augment=buda", "dataset.batch_size=6"]
    straight = train(make_cfg(work_dir, *common, "trainer.max_epochs=3", "run_name=straight"))
    first = train(make_cfg(work_dir, *common, "trainer.max_epochs=2", "run_name=interrupted"))
    resumed = train(
        make_cfg(work_dir, f"resume={first.run_id}", "trainer.max_epochs=3"),
        [f"resume={first.run_id}", "trainer.max_epochs=3"],
    )
    assert resumed.run_id == first.run_id

    def curve(run_id):
        return [
            m.value
            for m in sorted(client.get_metric_history(run_id, "val/dice"), key=lambda m: m.step)
        ]

    assert len(curve(straight.run_id)) == 3
    assert curve(straight.run_id) == curve(first.run_id)
    weights = []
    for run_id in (straight.run_id, first.run_id):
        out = Path(client.get_run(run_id).data.tags["segexp.output_dir"])
        weights.append(
            torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        )
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key]), key


class Payload:
    """Unpickling this runs `touch MARKER`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_and_never_runs(cfg, work_dir, client, hc18_root, capsys):
    cfg.trainer.max_epochs = 1
    first = train(cfg)
    out = Path(client.get_run(first.run_id).data.tags["segexp.output_dir"])
    marker = work_dir / "pwned"
    torch.save({"state_dict": Payload(marker)}, out / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="unreadable"):
        train(make_cfg(work_dir, f"resume={first.run_id}"), [f"resume={first.run_id}"])
    assert not marker.exists()
    # the same file as a best checkpoint, for prediction
    torch.save({"state_dict": Payload(marker)}, out / "checkpoints" / "best.ckpt")
    client.log_artifact(first.run_id, str(out / "checkpoints" / "best.ckpt"), "checkpoints")
    capsys.readouterr()
    assert cli.main(predict_args(first.run_id, hc18_root, work_dir)) == 2
    assert "best.ckpt" in capsys.readouterr().err  # one line naming the file
    assert not marker.exists()


def test_an_exception_after_fit_marks_the_run_failed(cfg, client, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full while plotting")

    monkeypatch.setattr(report, "plot_curves", broken_plot)  # segexp's own code, not a library
    with pytest.raises(RuntimeError, match="disk full"):
        train(cfg)
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "FAILED"
    assert "disk full while plotting" in run.data.tags["failure_reason"]
    assert steps(client, run.info.run_id, "val/dice") == [0, 1]  # nothing already logged is lost


def test_a_bad_augmentation_fails_before_any_run(work_dir, client, hc18_root):
    cfg = make_cfg(
        work_dir,
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "augment=buda",
        "+augment.transforms.0={_target_: albumentations.RandomCrop, height: 999, width: 999}",
    )
    with pytest.raises(ConfigError, match="augment"):
        train(cfg)
    experiment = client.get_experiment_by_name("hc18_synthetic")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.slow  # a whole process lifecycle: tens of seconds
def test_a_dataloader_worker_killed_mid_epoch_fails_the_run_without_a_hang(
    work_dir, client, hc18_root
):
    proc = start_segexp(
        "train",
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "dataset.num_workers=2",
        "trainer.max_epochs=500",
        work_dir=work_dir,
    )
    wait_for(lambda: an_epoch_is_logged(client))
    workers = []
    wait_for(lambda: bool(workers.extend(children_of(proc.pid)) or workers), timeout=30)
    os.kill(workers[0], signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)  # no hang: pytest-timeout would stop a hung test
    assert proc.returncode != 0
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "FAILED", output[-3000:]
    assert "worker" in run.data.tags["failure_reason"].lower()


def test_env_values_and_uri_passwords_never_reach_the_store(
    work_dir, client, hc18_root, monkeypatch
):
    secret = "s3cr3t-Token-4242"
    monkeypatch.setenv("SEGEXP_TEST_SECRET", secret)
    cfg = make_cfg(
        work_dir,
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "trainer.max_epochs=1",
        "+notes.api=${oc.env:SEGEXP_TEST_SECRET}",
        f"+notes.mirror=postgresql://me:{secret}@db.example.org/mlflow",
    )
    train(cfg, ["+notes.api=${oc.env:SEGEXP_TEST_SECRET}"])
    run = only_run(client, "hc18_synthetic")
    assert run.data.params["notes.api"] == "${oc.env:SEGEXP_TEST_SECRET}"
    logged = [*run.data.params.values(), *run.data.tags.values()]
    with tempfile.TemporaryDirectory() as tmp:
        logged.append(
            Path(client.download_artifacts(run.info.run_id, "config.yaml", tmp)).read_text()
        )
    assert not [text for text in logged if re.search(re.escape(secret), text)]


def test_ui_binds_localhost_and_refuses_0_0_0_0_without_the_flag(work_dir, capsys):
    assert cli.main(["ui", "--print-command", "--work-dir", str(work_dir)]) == 0
    assert "--host 127.0.0.1" in capsys.readouterr().out
    assert cli.main(["ui", "--host", "0.0.0.0", "--work-dir", str(work_dir)]) == 2
    assert "--allowed-hosts" in capsys.readouterr().err
    code = cli.main(
        [
            "ui",
            "--host",
            "0.0.0.0",
            "--allow-remote",
            "--print-command",
            "--work-dir",
            str(work_dir),
        ]
    )
    assert code == 0 and "--host 0.0.0.0" in capsys.readouterr().out


def test_mlflow_telemetry_is_off_in_segexp_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    probe = "import segexp, os; print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "true"


def schema_is_at_head(db: Path) -> bool:
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    head = ScriptDirectory.from_config(_get_alembic_config(f"sqlite:///{db}")).get_current_head()
    with sqlite3.connect(db) as connection:
        return connection.execute("select version_num from alembic_version").fetchall() == [(head,)]


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [4, 8])
def test_concurrent_writers_on_a_fresh_store(tmp_path, hc18_root, jobs):
    """`jobs` separate `segexp train` processes started at once on a store nobody created yet."""
    procs = [
        start_segexp(
            "train", "debug=tiny", f"dataset.root={hc18_root}", f"seed={seed}", work_dir=tmp_path
        )
        for seed in range(jobs)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * jobs, [o[-2000:] for o in outputs]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hc18_synthetic").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == sorted(str(s) for s in range(jobs))
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "val/loss", "val/dice", "val/iou", "time/epoch_seconds"):
            assert steps(client, run.info.run_id, key) == [0, 1], (run.info.run_id, key)
    assert schema_is_at_head(tmp_path / "mlflow.db")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_inside_a_store_commit_ends_the_run_killed_and_leaves_the_store_writable(
    work_dir, client, signum
):
    """A SIGTERM raised inside SQLAlchemy's commit left SQLite's write lock with a connection
    nobody closed: neither this run nor any other process could write (CI: a killed sweep's
    runs stayed RUNNING). The signal must wait until the commit is done."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    armed, fired = [], []

    def fire(conn):  # the signal arrives in the commit of the first metric write
        if armed and not fired:
            fired.append(1)
            os.kill(os.getpid(), signum)

    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a shell
    event.listen(Engine, "commit", fire)
    try:
        with (
            pytest.raises(SystemExit) as stopped,
            tracking.TrackedRun(client, "e", None, "r") as run,
        ):
            armed.append(1)
            for step in range(100_000):  # until the signal stops it
                run.log_metrics({"train/loss": 1.0}, step=step)
                time.sleep(0.01)  # the training step between two writes
    finally:
        event.remove(Engine, "commit", fire)
        signal.signal(signal.SIGINT, previous_sigint)
    assert fired and stopped.value.code == 128 + signum
    assert client.get_run(run.run_id).info.status == "KILLED"
    assert steps(client, run.run_id, "train/loss")  # the write it landed in was kept
    db = sqlite3.connect(work_dir / "mlflow.db", timeout=2)  # as another sweep job would
    db.execute("UPDATE experiments SET name = name")
    db.commit()
    db.close()


def test_a_ctrl_c_that_lands_in_a_finalizer_still_ends_the_run_killed(client):
    """A signal handled while the garbage collector runs a weakref callback raises in there;
    Python prints "Exception ignored" and goes on: Ctrl-C would be lost and the training run
    on. It must be raised again outside the callback."""
    fired = []

    class Node:  # anything a weakref can point at
        pass

    def finalizer(_ref):
        fired.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(10_000))  # the handler runs here, inside the callback

    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a shell
    try:
        with (
            pytest.raises(SystemExit) as stopped,
            tracking.TrackedRun(client, "e", None, "r") as run,
        ):
            node = Node()
            ref = weakref.ref(node, finalizer)
            del node  # the callback runs now, and the Interrupted it raises is swallowed
            for step in range(300):  # 3 s of "training" in which the signal must land
                run.log_metrics({"train/loss": 1.0}, step=step)
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert fired and ref() is None
    assert stopped.value.code == 130
    assert client.get_run(run.run_id).info.status == "KILLED"
    assert len(steps(client, run.run_id, "train/loss")) < 300


@pytest.mark.slow
def test_a_sweep_job_killed_like_the_oom_killer_is_killed_and_resume_finishes_it(
    work_dir, client, hc18_root
):
    # 96 px makes an epoch last long enough to kill a job in the middle of the sweep
    args = [
        *["train", "-m", "debug=tiny", f"dataset.root={hc18_root}", "dataset.image_size=96"],
        *["trainer.max_epochs=8", "optimizer.lr=1e-3,2e-3"],
        *["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ]
    proc = start_segexp(*args, work_dir=work_dir)

    def kids():
        found = client.get_experiment_by_name("hc18_synthetic")
        return found and client.search_runs(
            [found.experiment_id], "tags.`mlflow.parentRunId` != ''"
        )

    wait_for(lambda: kids() and steps(client, kids()[0].info.run_id, "val/dice"), timeout=180)
    victim = kids()[0]
    os.kill(int(victim.data.tags["segexp.pid"]), signal.SIGKILL)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0
    experiment_id = victim.info.experiment_id
    assert "RUNNING" not in {r.info.status for r in client.search_runs([experiment_id])}, output[
        -3000:
    ]
    assert client.get_run(victim.info.run_id).info.status == "KILLED"

    done = run_segexp(*args, "sweep.resume=true", work_dir=work_dir, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    [parent] = client.search_runs([experiment_id], "tags.`segexp.role` = 'sweep'")
    assert parent.info.status == "FINISHED"
    latest = {}
    for kid in sorted(kids(), key=lambda r: r.info.start_time):
        latest[kid.data.params["optimizer.lr"]] = kid.info.status
    assert latest == {"0.001": "FINISHED", "0.002": "FINISHED"}


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(cfg, work_dir, client):
    cfg.trainer.max_epochs = 1
    first = train(cfg)
    checkpoints = Path(client.get_run(first.run_id).data.tags["segexp.output_dir"]) / "checkpoints"
    before = (checkpoints / "last.ckpt").read_bytes()
    # the next save (this process: train runs in it) cannot write its temporary file
    (checkpoints / f".last.ckpt.{os.getpid()}.tmp").mkdir()
    resume = [f"resume={first.run_id}", "trainer.max_epochs=3"]
    with pytest.raises(OSError):
        train(make_cfg(work_dir, *resume), resume)
    assert (checkpoints / "last.ckpt").read_bytes() == before
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0
    assert client.get_run(first.run_id).info.status == "FAILED"


def test_a_loss_that_turns_nan_at_epoch_2_keeps_the_earlier_best_checkpoint(
    work_dir, client, hc18_root
):
    # lr x 1e30 from epoch 2 on: the weights blow up there, as a real divergence does
    cfg = make_cfg(
        work_dir,
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "optimizer=sgd",
        "trainer.max_epochs=4",
        "scheduler=cosine",
        "scheduler._target_=torch.optim.lr_scheduler.StepLR",
        "~scheduler.T_max",
        "+scheduler.step_size=2",
        "+scheduler.gamma=1e30",
    )
    with pytest.raises(tracking.NonFiniteMetricError, match="epoch 2"):
        train(cfg)
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "FAILED" and "NonFiniteMetricError" in run.data.tags["failure_reason"]
    assert steps(client, run.info.run_id, "val/dice") == [0, 1]
    for key in run.data.metrics:  # nothing stored as NaN or as 1.8e308
        assert all(abs(m.value) < 1e300 for m in client.get_metric_history(run.info.run_id, key))
    best = Path(run.data.tags["segexp.output_dir"]) / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True)["epoch"] <= 1


# ------------------------------------------------- bad input: one line, named, nothing logged


@pytest.mark.parametrize(
    "override, named",
    [
        ("seed=abc", "seed='abc' must be an integer"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be >= 1"),
        ("checkpoint.mode=best", "checkpoint.mode='best' must be 'min' or 'max'"),
        ("dataset.batch_size=0", "dataset: ValueError: dataset.batch_size must be >= 1, got 0"),
        ("model.features=[]", "model: IndexError"),  # a constructor that refuses its arguments
        (
            "trainer=ddp dataset.oversample_hc_mm=200 dataset.oversample_factor=3",
            "dataset.oversample_factor > 1 trains in one process, not with DDP",
        ),
    ],
)
def test_bad_run_values_are_refused_by_key_before_a_run_exists(
    override, named, work_dir, client, hc18_root
):
    with pytest.raises(ConfigError, match=re.escape(named)):
        train(make_cfg(work_dir, "debug=tiny", f"dataset.root={hc18_root}", *override.split()))
    assert client.search_experiments(filter_string="name = 'hc18_synthetic'") == []


@pytest.mark.parametrize(
    "trainer, several",
    [
        ({"devices": 2}, True),
        ({"devices": [0, 1]}, True),
        ({"devices": "0,1"}, True),
        ({"devices": "2"}, True),
        ({"devices": 1, "strategy": "ddp_find_unused_parameters_true"}, True),
        ({"devices": 1}, False),
        ({"devices": [3]}, False),
        ({"devices": "1,"}, False),
        ({"devices": "auto"}, False),  # known only once torch looks: the DataModule refuses it
        ({"devices": True}, False),
    ],
)
def test_several_devices_reads_every_form_lightning_takes(trainer, several):
    assert several_devices(OmegaConf.create(trainer)) is several


def test_a_bad_value_on_the_command_line_is_one_line_and_exit_nonzero(work_dir, hc18_root):
    proc = start_segexp("train", f"dataset.root={hc18_root}", "seed=abc", work_dir=work_dir)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in output
    assert "segexp train: seed='abc' must be an integer" in output


def test_a_bad_value_is_refused_before_torch_is_imported(tmp_path):
    probe = (
        "import sys; from segexp import cli; "
        f"rc = cli.main(['train', 'seed=abc', 'work_dir={tmp_path}']); "
        "print(rc, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["1", "False"], proc.stdout + proc.stderr
    assert proc.stderr.strip() == "segexp train: seed='abc' must be an integer"
    assert list(tmp_path.iterdir()) == []  # no store, no Hydra output folder


def test_a_required_dataset_root_is_named(work_dir):
    with pytest.raises(
        ConfigError, match=r"dataset.root is required .* dataset.root=/path/to/hc18"
    ):
        train(make_cfg(work_dir, "dataset=hc18"))


@pytest.mark.parametrize("command", ["compare", "effects"])
def test_an_unknown_run_id_is_one_line(command, work_dir, capsys):
    code = cli.main([command, "0123456789abcdef", "--work-dir", str(work_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "0123456789abcdef" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("n", ["0", "-5"])
def test_make_data_refuses_a_non_positive_count(n, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["make-data", "hc18", str(tmp_path / "d"), "--n", n])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_non_numeric_pixel_size_names_the_file_and_row(hc18_root, tmp_path, capsys):
    root = tmp_path / "hc18"
    shutil.copytree(hc18_root, root)
    csv = root / "training_set_pixel_size_and_HC.csv"
    lines = csv.read_text().splitlines()
    name = lines[1].split(",")[0]
    lines[1] = ",".join([name, "abc", *lines[1].split(",")[2:]])
    csv.write_text("\n".join(lines) + "\n")
    code = cli.main(["check-data", "dataset=hc18", f"dataset.root={root}", f"work_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{name}: pixel size(mm) 'abc' is not a positive number" in err and str(csv) in err

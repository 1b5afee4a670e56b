"""A careless user's moves that once gave a wrong answer silently: each one named or handled."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest
import yaml
from helpers import planted_run, run_segexp, tiny

from segexp import config
from segexp.blame import blame
from segexp.config import ConfigError
from segexp.resume import resume_target
from segexp.train import train


def test_blame_from_another_folder_puts_cells_with_a_runs(tmp_path, hc18_root, monkeypatch):
    """A's work_dir was relative to where A trained; its store's folder is where cells go."""
    monkeypatch.chdir(tmp_path)
    runs = [
        train(config.compose(["work_dir=w", "debug=tiny", f"dataset.root={hc18_root}", lr]))
        for lr in ("optimizer.lr=1e-3", "optimizer.lr=1e-2")
    ]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from segexp import tracking

    client, artifacts = tracking.open_store({"uri": f"sqlite:///{tmp_path}/w/mlflow.db"}, "w")
    plan = blame(client, artifacts, runs[0].run_id, runs[1].run_id, dry_run=True).plan
    assert plan.work_dir == tmp_path / "w"
    assert not (elsewhere / "w").exists()


@pytest.mark.slow  # a training in a subprocess
def test_resume_accepts_the_runs_own_choices_and_refuses_another(work_dir, client, hc18_root):
    """Pressing up-arrow and appending resume= restates the run's groups: that is no change."""
    own = ["experiment=hc18_seed", "debug=tiny", f"dataset.root={hc18_root}"]
    done = run_segexp("train", f"work_dir={work_dir}", *own)
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = done.stdout.split("\nrun ", 1)[1].split()[0]
    choices = json.loads(client.get_run(run_id).data.tags["segexp.choices"])
    assert choices["experiment"] == "hc18_seed"
    resume, cfg = resume_target(client, run_id, [*own, "trainer.max_epochs=3"])
    assert cfg.trainer.max_epochs == 3 and resume.run_id == run_id
    with pytest.raises(ConfigError, match=r"only values can change.*\['model=smp'\]"):
        resume_target(client, run_id, [*own, "model=smp", "trainer.max_epochs=3"])
    # Lightning restores the optimizer's state, its learning rate with it: refused, not recorded
    with pytest.raises(ConfigError, match=r"\['optimizer.lr=0.05'\] would not take effect"):
        resume_target(client, run_id, [*own, "optimizer.lr=0.05", "trainer.max_epochs=3"])
    same_lr = "optimizer.lr=0.001"  # the run's own value (Adam's default here): accepted
    assert resume_target(client, run_id, [*own, same_lr, "trainer.max_epochs=3"])[1]


@pytest.mark.slow  # three trainings
def test_blame_reuses_no_run_trained_on_other_data(work_dir, client, hc18_root, tmp_path):
    """Same config hash and seed on another dataset is another cell, and blame says so."""
    from segexp.blame.training import reuse
    from segexp.data import make_hc18

    other = make_hc18(tmp_path / "other", n=24, seed=1, n_test=0)
    a = train(tiny(work_dir, hc18_root, "optimizer.lr=1e-3")).run_id
    b = train(tiny(work_dir, hc18_root, "optimizer.lr=1e-2")).run_id
    twin = train(tiny(work_dir, other, "optimizer.lr=1e-3")).run_id  # A's hash, other data
    artifacts = (work_dir / "artifacts").as_uri()
    plan = blame(client, artifacts, a, b, seeds=1, dry_run=True).plan
    cells = list(plan.cells.rows.values())
    experiment_id = client.get_run(a).info.experiment_id
    reuse(client, experiment_id, cells, plan.fingerprint)
    assert {c.run_id for c in cells} == {a, b}  # the newer twin on other data is not A's cell
    with pytest.raises(ConfigError, match="same config on different data"):
        blame(client, artifacts, a, twin, dry_run=True)
    plan = blame(client, artifacts, twin, b, dry_run=True).plan
    assert any("A and B saw different data" in line for line in plan.lines)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # an `@` in the password
        ("http://:tok@h:5000", "http://:***@h:5000"),  # a token with no user
        ("http://alice:s3cretPW@host:5000", "http://alice:***@host:5000"),
    ],
)
def test_passwords_in_uris_are_hidden_whole(uri, shown):
    assert config.redact("tracking.uri", uri) == shown


def test_uri_credentials_reach_mlflow_as_its_variables_and_are_never_printed(work_dir, monkeypatch):
    from segexp import tracking

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    port = tracking.server.free_port()  # nothing listens there
    uri = f"http://alice:s3cretPW@127.0.0.1:{port}"
    with pytest.raises(tracking.StoreError) as err:
        tracking.open_store({"uri": uri}, work_dir)
    assert "s3cretPW" not in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cretPW"


def test_make_data_refuses_a_folder_that_holds_anything(tmp_path, capsys):
    from segexp import cli

    target = tmp_path / "hc18"
    target.mkdir()
    (target / "training_set_pixel_size_and_HC.csv").write_text("real data\n")
    assert cli.main(["make-data", "hc18", str(target), "--n", "4"]) == 2
    assert "not empty: pass --force" in capsys.readouterr().err
    assert (target / "training_set_pixel_size_and_HC.csv").read_text() == "real data\n"
    assert cli.main(["make-data", "hc18", str(target), "--n", "4", "--force"]) == 0


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write into, root included (immutable), made writable again after."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)]).returncode:
        pytest.skip("root, and no chattr +i here: nothing is read-only to root")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, read_only, capsys):
    """Checked before the store is opened: a bad --out must not cost an inference or trainings."""
    from segexp import cli

    a_file, a_folder = tmp_path / "taken.csv", tmp_path / "taken"
    a_file.write_text("kept\n")
    a_folder.mkdir()
    predict = ["predict", "RUN", "--images", "i", "--pixel-csv", "p.csv"]
    cases = [
        ([*predict, "--out", str(a_folder)], f"--out {a_folder} is a folder, not a file"),
        ([*predict, "--out", str(read_only / "s.csv")], f"{read_only} is read-only"),
        ([*predict, "--out", str(tmp_path / "s.csv"), "--masks", str(a_file)], "--masks .* a file"),
        (["blame", "A", "B", "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
        (["blame", "--from-table", "t.csv", "--out", str(read_only)], "is read-only"),
        (
            ["compare", "A", "--out", str(a_folder / "x" / "c.png"), "--html", str(a_folder)],
            "--html .* is a folder, not a file",
        ),
        (["compare", "A", "--out", str(a_file / "c.png")], f"{a_file} is a file, not a folder"),
    ]
    for argv, reason in cases:
        assert cli.main([*argv, "--work-dir", str(tmp_path / "w")]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(reason, err) and err.count("\n") == 1, (argv, err)
    assert a_file.read_text() == "kept\n" and not (tmp_path / "w").exists()  # no store opened


def test_a_taken_port_is_named_by_server_and_ui_at_once(tmp_path, monkeypatch, capsys):
    """On a taken port, the other server's health check would answer for one that never bound."""
    from segexp import cli, tracking

    def must_not_start(*args, **kwargs):
        raise AssertionError("started on a taken port")

    monkeypatch.setattr(tracking.server, "start_postgres", must_not_start)
    monkeypatch.setattr(os, "execv", must_not_start)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        started = time.monotonic()
        for command in ("server", "ui"):
            assert cli.main([command, "--work-dir", str(tmp_path / "w"), "--port", str(port)]) == 2
            err = capsys.readouterr().err
            assert f"port {port} on 127.0.0.1 is taken" in err and err.count("\n") == 1, err
        assert time.monotonic() - started < 2
    assert not (tmp_path / "w").exists()


def test_hydras_copies_of_the_overrides_hide_their_secrets(tmp_path):
    """Hydra writes .hydra/ and multirun.yaml before the job, the command line's values in clear."""
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import _save_config  # how Hydra's run_job writes them
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from segexp import report

    uri = "http://alice:s3cretPW@host:5000"
    overrides = [f"work_dir={tmp_path}", f"tracking.uri={uri}", "+api_token=hunter2"]
    with initialize_config_dir(str(config.CONFIG_DIR), version_base="1.3"):
        composed = compose("train", overrides=overrides, return_hydra_config=True)
    hydra_cfg = composed.hydra
    with open_dict(hydra_cfg):
        hydra_cfg.runtime.output_dir = str(tmp_path / "multirun" / "0")
        hydra_cfg.sweep.dir, hydra_cfg.mode = str(tmp_path / "multirun"), RunMode.MULTIRUN
    task = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
    hydra_dir = tmp_path / "multirun" / "0" / ".hydra"
    _save_config(task, "config.yaml", hydra_dir)
    _save_config(OmegaConf.create({"hydra": hydra_cfg}), "hydra.yaml", hydra_dir)
    _save_config(hydra_cfg.overrides.task, "overrides.yaml", hydra_dir)
    OmegaConf.save(composed, tmp_path / "multirun" / "multirun.yaml")
    assert len(report.redact_hydra_outputs(hydra_cfg)) == 4
    for path in (tmp_path / "multirun").rglob("*.yaml"):
        text = path.read_text()
        assert "s3cretPW" not in text and "hunter2" not in text, path
    saved = yaml.safe_load((hydra_dir / "config.yaml").read_text())
    assert saved["tracking"]["uri"] == "http://alice:***@host:5000" and saved["api_token"] == "***"
    assert "+api_token=***" in yaml.safe_load((hydra_dir / "overrides.yaml").read_text())


@pytest.mark.slow  # a training in a subprocess
def test_no_file_a_run_writes_holds_an_override_secret(work_dir, hc18_root):
    done = run_segexp(
        "train",
        f"work_dir={work_dir}",
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "+api_token=hunter2",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = [p for p in work_dir.rglob("*") if p.is_file()]
    assert any(p.parent.name == ".hydra" for p in files)
    assert [p for p in files if b"hunter2" in p.read_bytes()] == []


def test_resume_in_a_copied_store_is_refused_before_it_writes(work_dir, client, tmp_path):
    """A copy's runs point at the original's checkpoints: resuming there would overwrite them."""
    import shutil

    from mlflow import MlflowClient

    from segexp import tracking

    run_id = planted_run(client, work_dir, {})
    original = tracking.store_file(client.tracking_uri)
    client.set_tag(run_id, tracking.tags.STORE, original)
    shutil.copy(original, tmp_path / "copy.db")
    copy = MlflowClient(f"sqlite:///{tmp_path / 'copy.db'}")
    with pytest.raises(ConfigError, match=r"created by the store .*mlflow.db, not .*copy.db"):
        resume_target(copy, run_id, ["trainer.max_epochs=3"])
    with pytest.raises(ConfigError, match="no checkpoint"):  # its own store: checked further
        resume_target(client, run_id, ["trainer.max_epochs=3"])


def test_resume_of_an_untagged_run_in_a_copied_work_dir_is_refused(work_dir, client, tmp_path):
    """A run logged before the store tag: its artifact URI, into the original, gives it away."""
    from mlflow import MlflowClient

    run_id = planted_run(client, work_dir, {})  # no segexp.store tag
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(work_dir / "mlflow.db", copy / "mlflow.db")
    copied = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    original = (work_dir / "artifacts").resolve()
    with pytest.raises(
        ConfigError,
        match=f"artifacts are at {re.escape(str(original))}/.*, outside this store's artifact root",
    ):
        resume_target(copied, run_id, ["trainer.max_epochs=3"])  # root: copy/artifacts
    with pytest.raises(ConfigError, match="no checkpoint"):  # its own store: checked further
        resume_target(client, run_id, ["trainer.max_epochs=3"])


def test_a_failed_blame_cells_output_goes_to_its_own_run(work_dir, client, cfg):
    """A cell's terminal output is only in its cell.log: a failed cell's too, not an older twin's."""
    from segexp import tracking
    from segexp.train import log_failed_cell

    experiment = client.create_experiment("cells", (work_dir / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    named = {"run_name": "cell 1", "tags": {tracking.tags.PARENT: parent}}
    older = client.create_run(experiment, **named).info
    started = older.start_time + 1
    failed = client.create_run(experiment, start_time=started, **named).info.run_id
    log = work_dir / "job" / "cell.log"
    log.parent.mkdir()
    log.write_text("Traceback: out of memory\n")
    cfg.tracking.parent_run_id, cfg.run_name = parent, "cell 1"
    log_failed_cell(cfg, log, started + 60_000)  # the job failed before it made a run
    assert client.list_artifacts(failed) == client.list_artifacts(older.run_id) == []
    log_failed_cell(cfg, log, started)
    assert [a.path for a in client.list_artifacts(failed)] == ["cell.log"]
    assert client.list_artifacts(older.run_id) == []

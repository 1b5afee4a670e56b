"""A careless user's moves that once gave a wrong answer silently: each one named or handled."""

from __future__ import annotations

import json
import os

import pytest
from helpers import run_segexp, tiny

from segexp import config
from segexp.blame import blame
from segexp.config import ConfigError
from segexp.train import resume_target, train


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
    plan = blame(client, artifacts, runs[0]["run_id"], runs[1]["run_id"], dry_run=True).plan
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
    a = train(tiny(work_dir, hc18_root, "optimizer.lr=1e-3"))["run_id"]
    b = train(tiny(work_dir, hc18_root, "optimizer.lr=1e-2"))["run_id"]
    twin = train(tiny(work_dir, other, "optimizer.lr=1e-3"))["run_id"]  # A's hash, other data
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

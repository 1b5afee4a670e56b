"""`segexp blame --replicate fold|fold,seed`: the folds of A's k-fold split replicate every cell,
each fold a block, so a verdict holds over data draws and not only initialisations."""

from __future__ import annotations

import functools

import pandas as pd
import pytest
from helpers import make_cfg, recorded_run
from mlflow import MlflowClient

from segexp import cli
from segexp.blame import blame
from segexp.blame.replicates import Replicate
from segexp.blame.tables import from_table
from segexp.config import ConfigError
from segexp.train import train

FOLDS = ["debug=tiny", "dataset.folds=3", "dataset.fold=1"]


@pytest.fixture
def record(work_dir, hc18_root):
    return functools.partial(recorded_run, work_dir, hc18_root)


def test_replicate_ids_map_to_seeds_and_folds():
    crossed = Replicate("fold,seed", folds=3, seed=7)
    ids = crossed.first(7, 2)
    assert [(crossed.seed_of(r), crossed.fold_of(r)) for r in ids] == [
        (s, f) for s in (7, 8) for f in range(3)
    ]
    assert crossed.overrides(ids[4]) == ["seed=8", "dataset.fold=1"]
    folds = Replicate("fold", folds=3, seed=7)
    assert folds.first(7, 5) == [0, 1, 2]  # every fold, whatever --seeds says
    assert folds.overrides(2) == ["seed=7", "dataset.fold=2"] and folds.label(2) == [("fold", 2)]
    assert Replicate().overrides(43) == ["seed=43"] and Replicate().label(43) == [("seed", 43)]


def test_runs_csv_names_the_replicate_the_seed_and_the_fold_and_reads_back(tmp_path):
    crossed = Replicate("fold,seed", folds=2, seed=7)
    ids = crossed.first(7, 2)  # 14, 15, 16, 17: seeds 7, 8 x folds 0, 1
    y = [0.80, 0.82, 0.79, 0.81, 0.70, 0.73, 0.69, 0.72]  # B (f=1) 0.095 lower
    results = pd.DataFrame(
        {"f": [0] * 4 + [1] * 4, "seed": ids * 2, "run_id": list("abcdefgh"), "val/dice": y}
    )
    shown = crossed.readable(results)
    assert list(results.columns) == ["f", "seed", "run_id", "val/dice"]  # the analysis's, kept
    assert list(shown.columns) == ["f", "replicate", "seed", "fold", "run_id", "val/dice"]
    assert list(shown.seed) == [7, 7, 8, 8] * 2 and list(shown.fold) == [0, 1] * 4
    assert Replicate().readable(results.copy()).equals(results)  # seeds: as before
    shown.to_csv(tmp_path / "runs.csv", index=False)
    again = from_table(tmp_path / "runs.csv", "val/dice", tmp_path / "out")
    direct = from_table(results, "val/dice", tmp_path / "direct")
    assert again.effects.equals(direct.effects)  # the fold (two values) is no factor
    assert again.effects.set_index("term").loc["f", "verdict"] == "hurt"


def test_a_fold_plan_trains_every_fold_at_a_seed_and_says_so(work_dir, client, record, capsys):
    a = record(*FOLDS, "seed=5")
    b = record(*FOLDS, "seed=5", "optimizer.lr=0.5")
    artifacts = (work_dir / "artifacts").as_uri()
    plan = blame(client, artifacts, a, b, dry_run=True, replicate="fold").plan
    out = capsys.readouterr().out
    assert "replicates: the 3 folds of A's k-fold split x seeds [5] (3 per cell" in out
    assert "trainings at most: 6 " in out and "fidelity: full (folds as replicates" in out
    cells = list(plan.cells.rows.values())
    assert sorted((c.levels, c.seed) for c in cells) == [
        (lv, f) for lv in ((0,), (1,)) for f in range(3)
    ]
    assert {c.training_seed for c in cells} == {5}
    assert all(f"dataset.fold={c.seed}" in c.overrides for c in cells)
    assert [c.cfg.dataset.fold for c in cells if c.levels == (0,)] == [0, 1, 2]
    assert len({c.hash for c in cells}) == 6  # a run is reused only for its own fold
    assert {c.name for c in cells if c.levels == (0,)} == {"A fold=0", "A fold=1", "A fold=2"}


@pytest.mark.parametrize(
    "a_overrides, options, message",
    [
        (["debug=tiny"], {}, r"run A was not trained with k folds \(dataset.folds=None\)"),
        (FOLDS, {"seeds": "auto"}, "trains every fold: give --seeds N, not auto"),
    ],
)
def test_a_fold_replicate_that_cannot_be_is_refused(
    work_dir, client, record, a_overrides, options, message
):
    a = record(*a_overrides)
    b = record(*a_overrides, "optimizer.lr=0.5")
    artifacts = (work_dir / "artifacts").as_uri()
    with pytest.raises(ConfigError, match=message):
        blame(client, artifacts, a, b, dry_run=True, replicate="fold", **options)


@pytest.mark.slow
def test_blame_over_folds_reuses_a_and_b_on_their_fold_and_blames_the_harm(
    work_dir, hc18_root, capsys
):
    base = ["debug=tiny", "dataset.folds=4", "dataset.fold=1", f"dataset.root={hc18_root}"]
    base += ["model.batch_norm=true", "loss=dice"]
    base += ["trainer.max_epochs=8"]  # as test_blame's: lr 100 ruins Dice, never NaN
    run_a = train(make_cfg(work_dir, *base, "optimizer.lr=1e-2")).run_id
    run_b = train(make_cfg(work_dir, *base, "optimizer.lr=100")).run_id
    out = work_dir / "blame"
    args = ["blame", run_a, run_b, "--replicate", "fold", "--work-dir", str(work_dir)]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs.replicate) == [0, 0, 1, 1, 2, 2, 3, 3]  # the replicate: the fold
    assert (runs.fold == runs.replicate).all() and set(runs.seed) == {42}
    for row in runs.itertuples():
        params = client.get_run(row.run_id).data.params
        assert params["dataset.fold"] == str(row.fold) and params["seed"] == "42"
    assert {run_a, run_b} <= set(runs.run_id)  # trained at fold 1: reused there
    report = (out / "report.md").read_text()
    assert "replicates: the 4 folds of A's k-fold split" in report
    assert "- validation cases: fold 0: " in report
    effects = pd.read_csv(out / "effects.csv").set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt", printed[-3000:]

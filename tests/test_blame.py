"""segexp blame: factors as the user changed them, composed cells, end to end with trainings.

The estimator's statistics (bias, coverage, family-wise error) are simulated in test_analysis.py.
"""

from __future__ import annotations

import functools
import re

import pytest
from helpers import make_cfg, recorded_run, run_segexp, steps

from segexp import cli, config, tracking
from segexp.blame import Change, blame, from_choices, from_leaves
from segexp.config import ConfigError
from segexp.train import train


@pytest.fixture
def record(work_dir, hc18_root):
    """`recorded_run` on the synthetic HC18 set into this test's store."""
    return functools.partial(recorded_run, work_dir, hc18_root)


def change_between(client, run_a: str, run_b: str) -> Change:
    """The factors between two recorded runs, from the tags and config.yaml blame reads."""
    tags = [client.get_run(r).data.tags for r in (run_a, run_b)]
    stored = [tracking.stored_config(client, r) for r in (run_a, run_b)]
    return from_choices(*tags, *stored)


def test_a_group_switch_is_one_factor_and_a_leaf_on_top_is_another(client, record):
    run_a = record("debug=tiny", "optimizer=adam")
    run_b = record("debug=tiny", "optimizer=sgd", "optimizer.lr=100")
    change = change_between(client, run_a, run_b)
    assert [f.label() for f in change.factors] == [
        "optimizer: adam -> sgd",
        "optimizer.lr: <default> -> 100",
    ]
    cells = {lv: change.cell_config(lv, ["seed=1"]) for lv in [(0, 0), (1, 0), (0, 1), (1, 1)]}
    assert (
        cells[(0, 0)].optimizer._target_ == "torch.optim.Adam"
        and "momentum" not in cells[(0, 0)].optimizer
    )
    assert (cells[(1, 0)].optimizer._target_, cells[(1, 0)].optimizer.lr) == (
        "torch.optim.SGD",
        1e-2,
    )
    assert (cells[(0, 1)].optimizer._target_, cells[(0, 1)].optimizer.lr) == (
        "torch.optim.Adam",
        100,
    )
    assert cells[(1, 1)].optimizer.momentum == 0.9 and cells[(1, 1)].optimizer.lr == 100
    # the cell at A's levels is A itself: the config hash A recorded
    recorded_hash = client.get_run(run_a).data.tags["segexp.config_hash"]
    assert config.config_hash(config.redacted(cells[(0, 0)])) == recorded_hash


def test_a_model_switch_is_one_factor_not_its_leaves(client, record):
    change = change_between(client, record("debug=tiny"), record("debug=tiny", "model=smp"))
    assert [f.label() for f in change.factors] == ["model: unet_small -> smp"]


def test_experiments_are_split_into_the_changes_they_bundle(work_dir, client, lgg_root):
    common = ["dataset.image_size=32", "dataset.val_count=1"]  # small, and a validation patient
    change = change_between(
        client,
        recorded_run(work_dir, lgg_root, "experiment=lgg_buda_1", *common),
        recorded_run(work_dir, lgg_root, "experiment=lgg_buda_2", *common),
    )
    assert {f.name: f.levels for f in change.factors} == {
        "dataset.batch_size": (16, 32),
        "optimizer.lr": (3e-4, 1e-3),
        "optimizer.weight_decay": (0.0, 1e-4),
        "trainer.max_epochs": (7, 10),
    }
    cfg = change.cell_config((1, 0, 1, 0), ["seed=3", "trainer.max_epochs=1"])
    assert (cfg.dataset.batch_size, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (
        32,
        3e-4,
        1e-4,
    )
    assert (cfg.trainer.max_epochs, cfg.seed, cfg.dataset.root) == (1, 3, str(lgg_root))


def test_a_cell_that_cannot_exist_is_named_not_built(client, record):
    change = change_between(
        client,
        record("debug=tiny", "optimizer=adam"),
        record("debug=tiny", "optimizer=sgd", "optimizer.momentum=0.5"),
    )
    with pytest.raises(
        ConfigError, match="optimizer=adam, optimizer.momentum=0.5.*cannot be composed"
    ):
        change.cell_config((0, 1), [])
    assert change.cell_config((1, 1), []).optimizer.momentum == 0.5


def test_runs_without_choices_fall_back_to_leaves_grouped_per_config_group(client, record):
    runs = [
        record("debug=tiny", "optimizer=adam", "dataset.batch_size=8", hydra=False),
        record("debug=tiny", "optimizer=sgd", "dataset.batch_size=16", hydra=False),
    ]
    assert not any(tracking.tags.CHOICES in client.get_run(r).data.tags for r in runs)
    change = from_leaves(*(tracking.stored_config(client, r) for r in runs))
    assert [f.name for f in change.factors] == ["optimizer", "dataset.batch_size"]
    cfg = change.cell_config((1, 0), [])
    assert cfg.optimizer._target_ == "torch.optim.SGD" and "betas" not in cfg.optimizer
    assert cfg.dataset.batch_size == 8


def test_options_and_overrides_mix_in_any_order():
    _, commands = cli.build_parser()
    args = commands["blame"].parse_intermixed_args(
        [
            "A",
            "B",
            "--seeds",
            "2",
            "trainer.max_epochs=3",
            "--design",
            "path",
            "hydra/launcher=joblib",
        ]
    )
    assert args.runs_and_overrides == ["A", "B", "trainer.max_epochs=3", "hydra/launcher=joblib"]
    assert (args.seeds, args.design) == (2, "path")
    assert commands["blame"].parse_intermixed_args(["A", "B", "--seeds", "auto"]).seeds == "auto"


def test_from_table_reanalyses_without_training(tmp_path, capsys):
    rows = [
        {
            "lr": lr,
            "wd": wd,
            "seed": s,
            "val/dice_best": 0.8 - 0.05 * lr + 0.001 * s * (-1) ** (lr + wd),
        }
        for lr in (0, 1)
        for wd in (0, 1)
        for s in range(3)
    ]
    rows[0]["val/dice_best"] = None  # a failed cell
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    code = cli.main(
        [
            "blame",
            "--from-table",
            str(tmp_path / "runs.csv"),
            "--metric",
            "val/dice_best",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    effects = pd.read_csv(tmp_path / "out" / "effects.csv").set_index("term")
    assert {"effect", "ci_low", "ci_high", "p_holm", "verdict"} <= set(effects.columns)
    assert effects.loc["lr", "verdict"] == "hurt" and effects.loc["lr", "effect"] == pytest.approx(
        -0.05, abs=0.005
    )
    assert effects.loc["wd", "verdict"] == "within noise"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "lr hurt val/dice_best by 0.05" in report and "within noise" in report
    assert "lr hurt val/dice_best by 0.05" in capsys.readouterr().out


BLAME_BASE = [
    # 32 px, batch 4, and every cell in fp32: a probe under load must not pick another
    # precision for some cells
    "debug=tiny",
    "model.batch_norm=true",
    "loss=dice",
    "trainer.max_epochs=8",
]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_blame_flags_the_harmful_change_and_not_the_harmless_one(
    work_dir, client, hc18_root, capsys
):
    data = f"dataset.root={hc18_root}"
    run_a = train(
        make_cfg(
            work_dir, *BLAME_BASE, data, "optimizer.lr=1e-2", "optimizer.weight_decay=0", "seed=1"
        )
    ).run_id
    run_b = train(
        make_cfg(
            work_dir, *BLAME_BASE, data, "optimizer.lr=100", "optimizer.weight_decay=1e-6", "seed=1"
        )
    ).run_id
    artifacts = (work_dir / "artifacts").as_uri()

    plan = blame(client, artifacts, run_a, run_b, seeds=3, dry_run=True, fidelity="full")
    assert "trainings at most: 12" in capsys.readouterr().out and len(plan.plan.design.cells) == 4

    result = blame(
        client, artifacts, run_a, run_b, seeds=3, out_dir=work_dir / "blame", fidelity="full"
    )
    effects = result.effects.set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt"
    assert (
        effects.loc["optimizer.lr", "ci_high"] < 0 and effects.loc["optimizer.lr", "p_holm"] < 0.05
    )
    assert effects.loc["optimizer.weight_decay", "verdict"] == "within noise"
    assert result.trained == 10  # 4 cells x 3 seeds, A and B reused
    assert set(result.results.run_id) >= {run_a, run_b}
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("blame")
    assert {"effects.csv", "runs.csv", "effects.png", "report.md"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 10 and all(
        steps(client, c.info.run_id, "val/dice") == list(range(8)) for c in children[:2]
    )
    # a second blame retrains nothing
    assert blame(client, artifacts, run_a, run_b, seeds=3, fidelity="full").trained == 0


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_blame_through_the_joblib_launcher_splits_a_group_switch_from_a_harmful_leaf(
    work_dir, client, hc18_root, capsys
):
    # batch 2 x 10 epochs: the learning cells reach Dice 0.78-0.94 on every seed tried (1-3), far
    # above lr=0's 0.22-0.30; at batch 4 x 8 epochs they spread 0.29-0.60 and 2 seeds can miss it
    base = [*BLAME_BASE, "dataset.batch_size=2", "trainer.max_epochs=10"]
    base += [f"dataset.root={hc18_root}", "seed=1"]

    def segexp_train(*overrides: str) -> str:
        done = run_segexp("train", *base, *overrides, work_dir=work_dir, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout.split("\nrun ", 1)[1].split()[0]

    run_a = segexp_train("optimizer=adam", "optimizer.lr=1e-2")
    run_b = segexp_train("optimizer=sgd", "optimizer.lr=0")  # planted: B never learns
    artifacts = (work_dir / "artifacts").as_uri()
    result = blame(
        client,
        artifacts,
        run_a,
        run_b,
        seeds=2,
        work_dir=work_dir,
        overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        fidelity="full",
    )
    assert [f.label() for f in result.plan.change.factors] == [
        "optimizer: adam -> sgd",
        "optimizer.lr: 0.01 -> 0",
    ]
    table = result.results
    assert len(table) == 8 and table["val/dice_best"].notna().all(), table  # every cell FINISHED
    effects = result.effects.set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt", effects
    out = capsys.readouterr().out
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == result.trained == 6 and all(
        c.info.status == "FINISHED" for c in children
    )
    # A and B count as done: one line per trained cell, numbered 3..8 of 8, each cell once
    progress = re.findall(r"^cell (\d+)/8 done \((.+)\): val/dice_best \d\.\d{3}, ETA", out, re.M)
    assert [n for n, _ in progress] == ["3", "4", "5", "6", "7", "8"], out[-3000:]
    assert sorted(name for _, name in progress) == sorted(c.info.run_name for c in children)


def test_dry_run_prints_factors_design_trainings_and_impossible_cells(
    work_dir, client, record, capsys
):
    a = record("debug=tiny", "optimizer=adam")
    b = record("debug=tiny", "optimizer=sgd", "optimizer.momentum=0.5", "optimizer.lr=0.1")
    artifacts = (work_dir / "artifacts").as_uri()
    plan = blame(client, artifacts, a, b, seeds=2, dry_run=True, work_dir=work_dir)
    out = capsys.readouterr().out
    assert "factors (3): optimizer: adam -> sgd, optimizer.lr: <default> -> 0.1, " in out
    assert "design: full factorial 2^3" in out and "trainings at most: 12 " in out  # 6 cells x 2
    # Adam has no momentum: the two cells that give it one are named, not trained
    assert len(plan.plan.cells.impossible) == 2 and "cannot compose cell (0, 0, 1)" in out
    assert (
        client.search_runs(
            [client.get_experiment_by_name("hc18_synthetic").experiment_id],
            "tags.`segexp.role` = 'blame'",
        )
        == []
    )

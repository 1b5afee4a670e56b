"""segexp blame: the effect estimator on known answers, and end to end with a planted change."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from conftest import make_cfg, steps

from segexp import tracking
from segexp.blame import (
    blame,
    cell_config,
    effects_table,
    factors_between,
    make_design,
    marginal_means,
    parse_value,
    sweep_effects,
)
from segexp.train import train


def constructed(
    main: dict[str, float],
    interaction: float = 0.0,
    seeds: int = 4,
    noise: float = 0.002,
    rng_seed: int = 1,
) -> pd.DataFrame:
    rng = np.random.default_rng(rng_seed)
    rows = []
    for levels in itertools.product((0, 1), repeat=len(main)):
        for seed in range(seeds):
            x = dict(zip(main, levels, strict=True))
            y = (
                0.8
                + sum(effect * x[f] for f, effect in main.items())
                + interaction * int(all(levels[:2]))
            )
            rows.append({**x, "seed": seed, "val/dice_best": y + rng.normal(0, noise)})
    return pd.DataFrame(rows)


def test_main_effects_and_verdicts_on_known_answers():
    effects, noise = effects_table(
        constructed({"lr": -0.05, "wd": 0.0, "bs": 0.02}), ["lr", "wd", "bs"], "val/dice_best"
    )
    effects = effects.set_index("term")
    assert effects.loc["lr", "effect"] == pytest.approx(-0.05, abs=0.003)
    assert effects.loc["bs", "effect"] == pytest.approx(0.02, abs=0.003)
    assert effects.loc[["lr", "wd", "bs"], "verdict"].tolist() == ["hurt", "within noise", "helped"]
    assert (
        effects.loc["lr", "ci_high"] < 0 < effects.loc["wd", "ci_high"]
        and effects.loc["wd", "ci_low"] < 0
    )
    assert noise["seed_sd"] == pytest.approx(0.002, rel=0.4) and noise["dof"] == 8 * 3
    assert effects.loc["lr x wd", "verdict"] == "within noise"


def test_confidence_intervals_have_their_nominal_coverage():
    # a zero effect is called `hurt`/`helped` in about 5% of experiments, a real one almost always
    flagged = [
        effects_table(
            constructed({"lr": -0.004, "wd": 0.0}, rng_seed=i), ["lr", "wd"], "val/dice_best"
        )[0]
        .set_index("term")
        .verdict
        for i in range(200)
    ]
    false_positive = np.mean([v["wd"] != "within noise" for v in flagged])
    power = np.mean([v["lr"] == "hurt" for v in flagged])
    assert 0.01 <= false_positive <= 0.10 and power > 0.95


def test_interactions_are_estimated():
    effects, _ = effects_table(
        constructed({"lr": 0.0, "wd": 0.0}, interaction=-0.04), ["lr", "wd"], "val/dice_best"
    )
    effects = effects.set_index("term")
    # y = c * lr * wd: half of c shows as each main effect and as the interaction contrast
    assert effects.loc["lr x wd", "effect"] == pytest.approx(-0.02, abs=0.003)
    assert effects.loc["lr x wd", "verdict"] == "hurt"


def test_lower_is_better_metrics_flip_the_verdict():
    data = constructed({"lr": 0.05})
    data["val/loss"] = data.pop("val/dice_best")
    effects, _ = effects_table(data, ["lr"], "val/loss")
    assert effects.verdict.tolist() == ["hurt"]


def test_no_replicates_gives_no_verdict():
    effects, _ = effects_table(constructed({"lr": -0.05}, seeds=1), ["lr"], "val/dice_best")
    assert effects.verdict.tolist() == ["no replicates"]


def test_marginal_means_on_known_answers():
    table = marginal_means(
        constructed({"lr": -0.05, "wd": 0.0}), ["lr", "wd"], "val/dice_best"
    ).set_index(["factor", "level"])
    assert table.loc[("lr", 1), "mean"] - table.loc[("lr", 0), "mean"] == pytest.approx(
        -0.05, abs=0.003
    )
    assert table.loc[("lr", 1), "ci_high"] < table.loc[("lr", 0), "ci_low"]
    assert table.loc[("wd", 0), "runs"] == 8


def test_designs():
    assert len(make_design(3).cells) == 8 and make_design(3).name.startswith("full")
    oat = make_design(5)
    assert len(oat.cells) == 12 and (0,) * 5 in oat.cells and (1,) * 5 in oat.cells
    assert (1, 0, 0, 0, 0) in oat.cells and (0, 1, 1, 1, 1) in oat.cells
    with pytest.raises(ValueError, match="--design"):
        make_design(2, "latin")


def test_factors_ignore_bookkeeping_and_cells_apply_them(tmp_path):
    a = tracking.redacted(make_cfg(tmp_path / "a", "experiment=lgg_buda_1"))
    b = tracking.redacted(
        make_cfg(tmp_path / "b", "experiment=lgg_buda_2", "run_name=other", "seed=7")
    )
    factors = factors_between(a, b)
    assert set(factors) == {
        "dataset.batch_size",
        "optimizer.lr",
        "optimizer.weight_decay",
        "trainer.max_epochs",
    }
    assert factors["optimizer.lr"] == ("0.0003", "0.001")
    assert (
        parse_value("1e-06") == 1e-6
        and parse_value("[16, 32]") == [16, 32]
        and parse_value("None") is None
    )
    cfg = cell_config(a, factors, (1, 0, 1, 0), seed=3, overrides=["trainer.max_epochs=1"])
    assert (
        cfg.dataset.batch_size,
        cfg.optimizer.lr,
        cfg.optimizer.weight_decay,
        cfg.trainer.max_epochs,
        cfg.seed,
    ) == (32, 3e-4, 1e-4, 1, 3)
    assert tracking.config_hash(a) != tracking.config_hash(b)
    assert tracking.config_hash(a) == tracking.config_hash(
        {**a, "seed": 99, "work_dir": "/elsewhere"}
    )


BLAME_BASE = [
    "dataset.image_size=32",
    "dataset.batch_size=4",
    "trainer.enable_progress_bar=false",
    "model.batch_norm=true",
    "loss=dice",
    "trainer.max_epochs=8",
]


def test_blame_flags_the_harmful_change_and_not_the_harmless_one(
    work_dir, client, hc18_root, capsys
):
    data = f"dataset.root={hc18_root}"
    run_a = train(
        make_cfg(
            work_dir, *BLAME_BASE, data, "optimizer.lr=1e-2", "optimizer.weight_decay=0", "seed=1"
        )
    )["run_id"]
    run_b = train(
        make_cfg(
            work_dir, *BLAME_BASE, data, "optimizer.lr=100", "optimizer.weight_decay=1e-6", "seed=1"
        )
    )["run_id"]
    artifacts = (work_dir / "artifacts").as_uri()

    plan = blame(client, artifacts, run_a, run_b, seeds=3, dry_run=True)
    assert "trainings at most: 12" in capsys.readouterr().out and len(plan["design"].cells) == 4

    result = blame(client, artifacts, run_a, run_b, seeds=3, out_dir=work_dir / "blame")
    effects = result["effects"].set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt"
    assert effects.loc["optimizer.lr", "ci_high"] < 0
    assert effects.loc["optimizer.weight_decay", "verdict"] == "within noise"
    assert result["trained"] == 10  # 4 cells x 3 seeds, A and B reused
    assert set(result["results"].run_id) >= {run_a, run_b}
    parent = client.get_run(result["parent_run_id"])
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
    assert blame(client, artifacts, run_a, run_b, seeds=3)["trained"] == 0
    # effects over the existing children: per-level means agree with the blame's main effect
    table = sweep_effects(client, result["parent_run_id"]).set_index(["factor", "level"])
    lr_effect = (
        table.loc[("optimizer.lr", "100"), "mean"] - table.loc[("optimizer.lr", "0.01"), "mean"]
    )
    children_only = result["results"][
        result["results"].run_id.isin({c.info.run_id for c in children})
    ]
    expected = children_only.groupby("optimizer.lr")["val/dice_best"].mean()
    assert lr_effect == pytest.approx(expected[1] - expected[0])
    assert (
        table.loc[("optimizer.lr", "100"), "ci_high"]
        < table.loc[("optimizer.lr", "0.01"), "ci_low"]
        or lr_effect < 0
    )

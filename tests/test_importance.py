"""`segexp effects`: ANOVA importance and marginal means over a planted sweep grid."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from segexp.compare import importance_table, marginal_means, plot_marginal_means

METRIC = "val/dice_best"
LR = {"1e-4": -0.03, "3e-4": 0.0, "1e-3": 0.01}  # planted level effects
PARAMS = ["optimizer.lr", "dataset.batch_size", "augment"]


def grid(seeds: int = 3, noise: float = 0.005, rng_seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(rng_seed)
    rows = []
    for lr, bs, aug, seed in itertools.product(LR, ["8", "16"], ["none", "buda"], range(seeds)):
        value = 0.8 + LR[lr] + 0.02 * (aug == "buda") + rng.normal(0, noise)
        rows.append({"optimizer.lr": lr, "dataset.batch_size": bs, "augment": aug, "seed": seed})
        rows[-1][METRIC] = value
    return pd.DataFrame(rows)


def test_importance_ranks_the_planted_parameters():
    table = importance_table(grid(), PARAMS, METRIC).set_index("term")
    assert table.loc["optimizer.lr", "p"] < 1e-6 and table.loc["augment", "p"] < 1e-6
    assert table.loc["dataset.batch_size", "p"] > 0.01
    assert table.loc["optimizer.lr", "share"] > table.loc["augment", "share"] > 0.2
    assert table.loc["dataset.batch_size", "share"] < 0.05
    assert "optimizer.lr x augment" in table.index and table.loc["residual", "df"] > 0
    assert table.share.sum() == pytest.approx(1.0, abs=1e-6)  # balanced grid: SS add up


def test_importance_leaves_out_interactions_the_grid_cannot_estimate():
    data = grid(seeds=1)
    data = data[~((data["optimizer.lr"] == "1e-3") & (data.augment == "buda"))]  # never ran
    data["model.name"] = "unet"  # constant over the sweep: left out
    terms = importance_table(data, [*PARAMS, "model.name"], METRIC).term.tolist()
    assert "optimizer.lr x augment" not in terms and "optimizer.lr" in terms
    assert not any("model.name" in t for t in terms)


def test_marginal_means_are_not_tilted_by_missing_runs(tmp_path):
    data = grid(noise=0.0)
    # drop most `buda` runs at lr 1e-4: raw means of lr 1e-4 would lose the +0.02 of buda
    drop = (data["optimizer.lr"] == "1e-4") & (data.augment == "buda") & (data.seed > 0)
    data = data[~drop]
    data.loc[data.index[:2], METRIC] = np.nan  # and two failed runs
    table = marginal_means(data, PARAMS, METRIC).set_index(["param", "level"])
    raw = data.groupby("optimizer.lr")[METRIC].mean()
    for lr, effect in LR.items():  # least-squares means: 0.8 + effect + half of buda's 0.02
        assert table.loc[("optimizer.lr", lr), "mean"] == pytest.approx(0.81 + effect, abs=1e-9)
    assert abs(raw["1e-4"] - (0.81 + LR["1e-4"])) > 0.003
    assert list(table.loc["optimizer.lr"].index) == ["1e-4", "3e-4", "1e-3"]  # numeric order


def test_marginal_means_cis_cover_and_plot(tmp_path):
    hits = 0
    for i in range(200):
        table = marginal_means(grid(seeds=2, rng_seed=i), PARAMS, METRIC)
        row = table.set_index(["param", "level"]).loc[("optimizer.lr", "1e-4")]
        hits += row.ci_low <= 0.81 + LR["1e-4"] <= row.ci_high
    assert 0.90 <= hits / 200 <= 0.99
    assert table.attrs["variance"].startswith("within-config")
    path = plot_marginal_means(table, METRIC, tmp_path / "means.png")
    assert path.stat().st_size > 1000

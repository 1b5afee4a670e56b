"""k-fold cross-validation: a fold sweep's parent pools its folds (cv.csv, cv_cases.csv, cv/*),
and `compare --by fold` / `fold,seed` pool over folds as over seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import run_segexp
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from segexp import compare, tracking
from segexp.evaluation import range_names


def hc_columns(cases: list[str]) -> dict:
    """HC18's columns for planted cases: case k has a 60 + 20k mm head, its error k - 5 mm."""
    k = np.array([int(c.removeprefix("case")) for c in cases])
    hc, errors = 60.0 + 20 * k, k - 5.0
    return {
        "hc_true_mm": hc,
        "hc_range": range_names(hc),
        "hc_error_mm": errors,
        "hc_abs_error_mm": np.abs(errors),
        "pixel_size_mm": 0.1,
    }


def plant_fold_run(client, experiment, parent, work_dir, fold, seed, lr, dice, cases, hc=False):
    """A FINISHED child as a fold sweep logs it: params, metrics, evaluation/val_cases.csv."""
    run_id = client.create_run(experiment, tags={tracking.tags.PARENT: parent}).info.run_id
    params = {"dataset.fold": fold, "dataset.folds": 3, "seed": seed, "optimizer.lr": lr}
    params["optimized_metric"] = "val/dice_best"
    metrics = [Metric("val/dice_best", dice, 0, 1), Metric("best_epoch", 1, 0, 1)]
    metrics += [Metric("val/dice", dice - 0.1 / (e + 1), 0, e) for e in range(2)]
    client.log_batch(run_id, metrics, [Param(k, str(v)) for k, v in params.items()])
    folder = work_dir / run_id / "evaluation"
    folder.mkdir(parents=True)
    table = pd.DataFrame({"case_id": cases, "group": cases, "dice": np.linspace(0.5, 0.9, 4)})
    if hc:
        table = table.assign(**hc_columns(cases))
    table.to_csv(folder / "val_cases.csv", index=False)
    client.log_artifact(run_id, str(folder / "val_cases.csv"), "evaluation")
    client.set_terminated(run_id)
    return client.get_run(run_id)


def planted_cv(client, work_dir, lrs=(1e-3,), seeds=(1,), overlap=False, hc=False):
    """A parent and one child per lr x seed x fold; fold f validated cases 4f..4f+3."""
    experiment = client.create_experiment("cv", (work_dir / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={tracking.tags.ROLE: "sweep"}).info.run_id
    rng = np.random.default_rng(0)
    runs = []
    for lr in lrs:
        for seed in seeds:
            for fold in range(3):
                start = 0 if overlap and fold == 1 else 4 * fold
                cases = [f"case{c:02d}" for c in range(start, start + 4)]
                dice = float(0.8 + rng.normal(0, 0.02))
                runs.append(
                    plant_fold_run(
                        client, experiment, parent, work_dir, fold, seed, lr, dice, cases, hc
                    )
                )
    return parent, runs


def artifact_csv(client, run_id, path, work_dir) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, path, str(work_dir / "down")))


def test_a_fold_sweep_pools_its_folds_on_the_parent(client, work_dir, capsys):
    parent, runs = planted_cv(client, work_dir)
    compare.write_summary(client, parent, runs)
    printed = capsys.readouterr().out
    cases = artifact_csv(client, parent, "sweep/cv_cases.csv", work_dir)
    assert sorted(cases.case_id) == [f"case{c:02d}" for c in range(12)]  # each case once
    assert cases.groupby("dataset.fold").case_id.count().tolist() == [4, 4, 4]
    written = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert "sweep/cv_hc_ranges.csv" not in written  # no head sizes, no table
    by_hand = np.mean([d for d in np.linspace(0.5, 0.9, 4) for _ in range(3)])
    summary = artifact_csv(client, parent, "sweep/cv.csv", work_dir)
    assert summary.case_dice.tolist() == pytest.approx([by_hand])
    folds = [r.data.metrics["val/dice_best"] for r in runs]
    assert summary["val/dice_best_mean"][0] == pytest.approx(np.mean(folds))
    assert summary["val/dice_best_std"][0] == pytest.approx(np.std(folds, ddof=1))
    assert summary["val/dice_best_count"][0] == 3
    metrics = client.get_run(parent).data.metrics
    assert metrics["cv/case_dice"] == pytest.approx(by_hand)
    assert metrics["cv/val/dice_best_sd"] == pytest.approx(np.std(folds, ddof=1))
    assert (
        f"cross-validation, all runs: val/dice_best {np.mean(folds):.4f} "
        f"(sd {np.std(folds, ddof=1):.4f} over 3 folds); pooled dice over 12 cases {by_hand:.4f}"
    ) in printed


def test_hc_folds_pool_their_head_size_ranges(client, work_dir, capsys):
    parent, runs = planted_cv(client, work_dir, lrs=(1e-3, 1e-4), hc=True)
    compare.write_summary(client, parent, runs)
    ranges = artifact_csv(client, parent, "sweep/cv_hc_ranges.csv", work_dir)
    # cases 0-11: heads 60-280 mm, errors -5..6 mm, each case once per lr
    assert ranges.columns[0] == "optimizer.lr" and len(ranges) == 6
    lr = ranges[ranges["optimizer.lr"] == 1e-3].set_index("hc_range")
    assert lr.images.to_dict() == {"lt100": 2, "100_200": 5, "200_300": 5}
    assert lr.hc_mae_mm["200_300"] == pytest.approx(np.mean([2, 3, 4, 5, 6]))
    assert lr.hc_mae_lo_mm["200_300"] < 4.0 < lr.hc_mae_hi_mm["200_300"]
    printed = capsys.readouterr().out
    assert printed.count("HC over the pooled cases:") == 2 and "200-300 mm" in printed


def test_configs_and_seeds_are_pooled_each_on_their_own(client, work_dir):
    parent, runs = planted_cv(client, work_dir, lrs=(1e-3, 1e-4), seeds=(1, 2))
    table = compare.runs_table(runs)
    result = compare.cross_validation(client, runs, table)
    assert result.keys == ["optimizer.lr", "seed"]
    assert len(result.summary()) == 4 and set(result.summary().cases) == {12}
    assert len(result.cases) == 48
    both = compare.by_replicates(table, "fold,seed")  # two seeds x three folds per lr
    assert both["val/dice_best_count"].tolist() == [6, 6]
    assert both.attrs["params"] == ["optimizer.lr"]
    seeds = compare.by_replicates(table, "seed")  # per lr and fold, over the two seeds
    assert len(seeds) == 6 and set(seeds["val/dice_best_count"]) == {2}
    compare.write_summary(client, parent, runs)
    assert "cv/case_dice" not in client.get_run(parent).data.metrics  # four configs: the CSV


def test_folds_that_overlap_are_named_not_averaged(client, work_dir, capsys):
    parent, runs = planted_cv(client, work_dir, overlap=True)
    with pytest.raises(ValueError, match="case case00 was validated by more than one fold"):
        compare.cross_validation(client, runs, compare.runs_table(runs))
    compare.write_summary(client, parent, runs)  # the rest of the summary is still written
    assert "cross-validation not pooled: case case00 was validated" in capsys.readouterr().out
    written = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert "sweep/summary.csv" in written and "sweep/cv.csv" not in written


@pytest.mark.slow
def test_a_real_fold_sweep_validates_every_case_once(work_dir, hc18_root):
    args = ["train", "-m", "debug=tiny", f"dataset.root={hc18_root}", "dataset.folds=3"]
    done = run_segexp(*args, "dataset.fold=0,1,2", work_dir=work_dir)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hc18_synthetic").experiment_id
    [parent] = client.search_runs([experiment], "tags.`segexp.role` = 'sweep'")
    assert parent.info.status == "FINISHED"
    cases = artifact_csv(client, parent.info.run_id, "sweep/cv_cases.csv", work_dir)
    splits = artifact_csv(
        client, tracking.children(client, parent)[0].info.run_id, "split.csv", work_dir
    )
    trainable = splits[splits.split != "test"]
    assert sorted(cases.case_id) == sorted(trainable.case_id)  # every case, once
    assert parent.data.metrics["cv/case_dice"] == pytest.approx(cases.dice.mean())
    assert "cross-validation, all runs: val/dice_best" in done.stdout

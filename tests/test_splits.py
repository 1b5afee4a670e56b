"""A held-out test split and k-fold cross-validation: grouped, stable, never leaking."""

from __future__ import annotations

import random

import pandas as pd
import pytest
from helpers import only_run, steps, tiny
from mlflow import MlflowClient

from segexp.data import SegDataModule, scan_hc18
from segexp.data.splits import SplitSpec, assign_folds, make_splits
from segexp.train import train


def datamodule(root, **kwargs) -> SegDataModule:
    args = dict(name="hc18_synthetic", layout="hc18", root=str(root), channels=1)
    return SegDataModule(**args, image_size=32, batch_size=4, **kwargs)


def loader_ids(loader) -> set[str]:
    return {case for batch in loader for case in batch["case_id"]}


def test_folds_partition_the_cases_by_group_and_are_stable(hc18_root):
    cases = scan_hc18(hc18_root)
    folds = assign_folds((c.group for c in cases), 5, seed=3)
    groups = {c.group for c in cases}
    assert set(folds) == groups and set(folds.values()) == set(range(5))
    sizes = pd.Series(folds).value_counts()
    assert sizes.max() - sizes.min() <= 1
    shuffled = cases[:]
    random.Random(0).shuffle(shuffled)
    assert assign_folds((c.group for c in shuffled), 5, seed=3) == folds
    validated = []
    for fold in range(5):
        splits = make_splits(cases, SplitSpec(folds=5, fold=fold, split_seed=3))
        validated += sorted(splits.val)
        assert splits.folds == folds  # fold 3 is the same cases in every run that says fold 3
    assert sorted(validated) == sorted(groups)  # every group validated exactly once


def test_the_test_split_never_reaches_training_or_validation(hc18_root):
    found = []
    for seed in (0, 1):
        dm = datamodule(hc18_root, test_count=3, split_seed=seed, folds=3, fold=seed)
        dm.setup()
        test, train_ids = loader_ids(dm.test_dataloader()), loader_ids(dm.train_dataloader())
        val = loader_ids(dm.val_dataloader())
        assert test and not test & (train_ids | val) and not train_ids & val
        exams = {dm.cases[i].group for i in dm.test_idx}
        assert (
            len(exams) == 3
            and {c.group for c in dm.cases if c.case_id in train_ids} & exams == set()
        )
        table = dm.split_table()
        assert (
            set(table.split) == {"train", "val", "test"}
            and (table.fold[table.split == "test"] == -1).all()
        )
        found.append(test)
    assert found[0] == found[1]  # the test cases do not follow the seed


@pytest.mark.parametrize(
    "kwargs, key",
    [(dict(folds=5, fold=5), "dataset.fold"), (dict(folds=1), "dataset.folds"),
     (dict(test_fraction=1.0), "dataset.test_fraction")],
)  # fmt: skip
def test_bad_split_values_name_their_key(hc18_root, kwargs, key):
    with pytest.raises(ValueError, match=key):
        datamodule(hc18_root, **kwargs)


def test_a_run_with_a_test_split_evaluates_the_best_weights_once(work_dir, hc18_root):
    cfg = tiny(work_dir, hc18_root, "dataset.test_count=3", "trainer.max_epochs=3")
    final = train(cfg)
    client = MlflowClient(cfg.tracking.uri or f"sqlite:///{work_dir / 'mlflow.db'}")
    run = only_run(client, "hc18_synthetic")
    assert steps(client, run.info.run_id, "test/dice") == steps(
        client, run.info.run_id, "val/dice_best"
    )
    assert len(steps(client, run.info.run_id, "test/dice")) == 1
    path = client.download_artifacts(run.info.run_id, "evaluation/test_cases.csv", str(work_dir))
    cases = pd.read_csv(path)
    assert len(cases) >= 3 and final.metrics["test/dice"] == pytest.approx(cases.dice.mean())
    assert "test/hc_mae_mm" in final.metrics
    path = client.download_artifacts(
        run.info.run_id, "evaluation/test_hc_ranges.csv", str(work_dir)
    )
    ranges = pd.read_csv(path)  # per head-size range of the test cases, as validation has it
    assert set(ranges.hc_range) == set(cases.hc_range) and ranges.images.sum() == len(cases)
    assert all(f"test/hc_mae_mm_{name}" in final.metrics for name in ranges.hc_range)
    history = client.get_metric_history(run.info.run_id, "val/dice")
    last = max(history, key=lambda m: m.step).value
    assert run.data.metrics["val/dice_last"] == pytest.approx(last)

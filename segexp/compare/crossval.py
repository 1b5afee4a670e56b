"""k-fold cross-validation pooled over a sweep's folds, as nnU-Net's summary gives it.

`segexp train -m dataset.folds=5 dataset.fold=0,1,2,3,4` trains one run per fold; each run's
`evaluation/val_cases.csv` holds its best weights' scores on the cases its fold validated.
Pooled, every case appears once, scored by the one model that never trained on it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from segexp.evaluation import hc_range_report, hc_range_table

from .runs import REPLICATES, by_replicates, param_value

FOLD = REPLICATES["fold"]
CASES_ARTIFACT = "evaluation/val_cases.csv"


@dataclass
class CrossValidation:
    """A sweep's folds pooled: per config, the metric over folds and every case's score once."""

    folds: pd.DataFrame  # one row per config (and seed): metric mean, sd, count and CI over folds
    cases: pd.DataFrame  # cv_cases.csv: one row per (config, seed, case), from its validating fold
    pooled: pd.DataFrame  # one row per config (and seed): mean case dice over cv_cases, n cases
    keys: list[str]  # the columns that name a config (swept params, seed where it varies)

    def summary(self) -> pd.DataFrame:
        """cv.csv: the over-folds columns beside the pooled case dice, one row per config."""
        if self.keys:
            return self.folds.merge(self.pooled, on=self.keys)
        return self.folds.assign(**self.pooled.iloc[0].to_dict())

    def config_cases(self) -> list[tuple[dict, pd.DataFrame]]:
        """Per config its key values and its pooled cases (each case once)."""
        if not self.keys:
            return [({}, self.cases)]
        return [
            (dict(zip(self.keys, key, strict=True)), cases)
            for key, cases in self.cases.groupby(self.keys)
        ]

    def hc_ranges(self) -> pd.DataFrame | None:
        """cv_hc_ranges.csv: per config the `hc_range_table` of its pooled cases; None without HC."""
        if "hc_range" not in self.cases:
            return None
        parts = [hc_range_table(cases).assign(**key) for key, cases in self.config_cases()]
        table = pd.concat(parts, ignore_index=True)
        return table[[*self.keys, *(c for c in table if c not in self.keys)]]

    def lines(self) -> list[str]:
        """What the sweep prints: one line per config, with HC its pooled head-size ranges."""
        metric = self.folds.attrs["metric"].removesuffix("_mean")
        ranges = {
            tuple(key.values()): hc_range_report(cases)
            for key, cases in self.config_cases()
            if "hc_range" in cases
        }
        out = []
        for _, row in self.summary().iterrows():
            name = " ".join(f"{k}={row[k]}" for k in self.keys) or "all runs"
            out.append(
                f"cross-validation, {name}: {metric} {row[f'{metric}_mean']:.4f} "
                f"(sd {row[f'{metric}_std']:.4f} over {int(row[f'{metric}_count'])} folds); "
                f"pooled dice over {int(row['cases'])} cases {row['case_dice']:.4f}"
            )
            report = ranges.get(tuple(row[k] for k in self.keys))
            if report:
                out += ["HC over the pooled cases:", report]
        return out


def is_cross_validation(table: pd.DataFrame) -> bool:
    """Whether a runs table's runs differ by their fold."""
    return FOLD in table.attrs.get("params", [])


def fold_cases(client: MlflowClient, run: Run, keys: dict) -> pd.DataFrame:
    """One run's validation cases, with the config keys and fold that name where they came from."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, CASES_ARTIFACT, tmp)
        cases = pd.read_csv(path)
    identity = {**keys, FOLD: param_value(run.data.params.get(FOLD)), "run_id": run.info.run_id}
    return cases.assign(**identity)[[*identity, *cases.columns]]


def cross_validation(client: MlflowClient, runs: list[Run], table: pd.DataFrame) -> CrossValidation:
    """Pool the FINISHED runs of a fold sweep (`table`: their runs_table)."""
    folds = by_replicates(table, "fold")
    keys = folds.attrs["params"]
    finished = table[table.status == "FINISHED"].set_index("run_id")
    by_id = {r.info.run_id: r for r in runs}
    parts = [
        fold_cases(client, by_id[run_id], {k: row[k] for k in keys})
        for run_id, row in finished.iterrows()
    ]
    cases = pd.concat(parts, ignore_index=True)
    twice = cases.duplicated([*keys, "case_id"], keep=False)
    if twice.any():  # folds that overlap are not a cross-validation: say which case, not a mean
        first = cases[twice].iloc[0]
        raise ValueError(
            f"case {first.case_id} was validated by more than one fold of the same config: "
            "the runs do not share one fold assignment (dataset.folds / split_seed differ)"
        )
    grouped = cases.groupby(keys) if keys else cases.groupby(lambda _: 0)
    pooled = grouped.agg(case_dice=("dice", "mean"), cases=("case_id", "size")).reset_index()
    pooled = pooled.drop(columns="index", errors="ignore")
    return CrossValidation(folds, cases, pooled, keys)


def write(result: CrossValidation, out: Path) -> list[Path]:
    """cv.csv, cv_cases.csv and, with HC, cv_hc_ranges.csv in `out`."""
    paths = [out / "cv.csv", out / "cv_cases.csv"]
    result.summary().to_csv(paths[0], index=False)
    result.cases.to_csv(paths[1], index=False)
    ranges = result.hc_ranges()
    if ranges is not None:
        paths.append(out / "cv_hc_ranges.csv")
        ranges.to_csv(paths[-1], index=False)
    return paths

"""`segexp blame --from-table` input, checked and never silently changed; what runs logged.

Each refused table is one line on stderr naming the row or column, and exit status 2.
"""

from __future__ import annotations

import itertools
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from segexp import cli
from segexp.blame import from_table, make_design, write_csv
from segexp.blame.evidence import case_lines, mask_levels, why

METRIC = "val/dice_best"


def runs(seeds: int = 3, k: int = 2, seed: int = 0) -> pd.DataFrame:
    """A k-factor full factorial where f0 costs 0.05 and f1 nothing."""
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(k)]
    rows = [
        {**dict(zip(names, c, strict=True)), "seed": s}
        for c, s in itertools.product(make_design(k).cells, range(seeds))
    ]
    table = pd.DataFrame(rows)
    table[METRIC] = 0.8 - 0.05 * table.f0 + rng.normal(0, 0.005, len(table))
    return table


def blame_table(tmp_path, table: pd.DataFrame | str, capsys) -> tuple[int, str, str]:
    path = tmp_path / "runs.csv"
    if isinstance(table, str):
        path.write_text(table)
    else:
        table.to_csv(path, index=False)
    args = ["blame", "--from-table", str(path), "--metric", METRIC, "--out", str(tmp_path / "o")]
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("coding", [(-1, 1), (1, 2)])
def test_a_factor_coded_other_than_0_1_is_recoded_with_a_note(tmp_path, capsys, coding):
    table = runs()
    table["f0"] = table.f0.map({0: coding[0], 1: coding[1]})
    code, out, _ = blame_table(tmp_path, table, capsys)
    effects = pd.read_csv(tmp_path / "o" / "effects.csv").set_index("term")
    assert code == 0 and effects.loc["f0", "verdict"] == "hurt"
    assert effects.loc["f0", "effect"] == pytest.approx(-0.05, abs=0.01)
    low, high = coding
    assert f"factor f0 coded {low}/{high}: {low} read as A's level (0), {high} as B's (1)" in out


def test_columns_that_are_no_factor_are_named(tmp_path, capsys):
    table = runs().assign(minutes=3.5, name="cell")
    code, out, _ = blame_table(tmp_path, table, capsys)
    assert code == 0
    assert "columns that are not factors (two levels needed): minutes (1 value), name (text)" in out


def test_an_infinite_metric_is_a_named_failed_run(tmp_path, capsys):
    table = runs()
    table[METRIC] = table[METRIC].astype(object)
    table.loc[4, METRIC] = "inf"
    code, out, _ = blame_table(tmp_path, table, capsys)
    effects = pd.read_csv(tmp_path / "o" / "effects.csv").set_index("term")
    assert code == 0 and effects.loc["f0", "verdict"] == "hurt" and effects.p.notna().all()
    assert f"{METRIC} is infinite in {tmp_path / 'runs.csv'} line 6: analysed as failed runs" in out
    assert "Failed runs (1)" in out


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.assign(**{METRIC: t[METRIC].astype(object).where(t.index != 6, "n/a")}),
            "runs.csv line 8: column 'val/dice_best' holds 'n/a', not a number",
        ),
        (lambda t: t.iloc[:1], "runs.csv: 1 row: a verdict needs runs of two cells"),
        (
            lambda t: t[t.seed == 0],
            "4 runs with a value in 4 cells leave no residual degrees of freedom",
        ),
        (
            lambda t: t.assign(f1=t.f1.astype(object).where(t.index != 2, "x")),
            "runs.csv line 4: factor column 'f1' holds 'x', not a level",
        ),
        (lambda t: t.assign(**{METRIC: np.nan}), "no run has a value of val/dice_best"),
    ],
    ids=["text in the metric", "one row", "one run per cell", "text in a factor", "no values"],
)
def test_what_cannot_be_analysed_is_one_line_and_exit_2(tmp_path, capsys, change, message):
    code, out, err = blame_table(tmp_path, change(runs()), capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith("segexp blame: ")


def test_duplicate_column_names_are_refused_not_renamed(tmp_path, capsys):
    text = runs().to_csv(index=False).replace("f0,f1,seed", "f0,f0,seed", 1)
    code, _, err = blame_table(tmp_path, text, capsys)
    assert code == 2 and "duplicate column names: 'f0' (columns 1, 2)" in err


def test_text_that_a_spreadsheet_runs_is_escaped_in_effects_csv(tmp_path):
    table = runs().rename(columns={"f1": '=HYPERLINK("http://x")', "f0": "@SUM(1)"})
    from_table(table, METRIC, tmp_path)
    written = pd.read_csv(tmp_path / "effects.csv")
    assert {'\'=HYPERLINK("http://x")', "'@SUM(1)"} <= set(written.term)
    assert not written.term.str.startswith(("=", "+", "-", "@")).any()
    write_csv(pd.DataFrame({"+cmd": ["-2+3", "ok"], "n": [-1.5, 2.0]}), tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_text().splitlines() == ["'+cmd,n", "'-2+3,-1.5", "ok,2.0"]


@pytest.mark.slow  # 100k-row tables
def test_memory_grows_linearly_with_the_rows(tmp_path):
    rows = 100_000  # an n x n matrix of these would need 80 GB
    rng = np.random.default_rng(5)
    table = pd.DataFrame(rng.integers(0, 2, (rows, 3)), columns=["f0", "f1", "f2"])
    table["seed"] = rng.integers(0, 1000, rows)
    table[METRIC] = 0.8 - 0.01 * table.f0 + rng.normal(0, 0.02, rows)
    tracemalloc.start()
    start = time.time()
    result = from_table(table, METRIC, tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.effects.set_index("term").loc["f0", "verdict"] == "hurt"
    assert peak < 1e9 and time.time() - start < 60, (peak, time.time() - start)


def test_why_reads_the_runs_history(client):
    experiment = client.create_experiment("histories")
    run = client.create_run(experiment).info.run_id
    for epoch, (dice, val_loss, train_loss) in enumerate(
        [(0.0, 0.70, 0.693), (0.0, 0.69, 0.692), (0.0, 0.68, 0.690), (0.594, 0.71, 0.689)]
    ):
        for key, value in (("val/dice", dice), ("val/loss", val_loss), ("train/loss", train_loss)):
            client.log_metric(run, key, value, step=epoch)
    client.log_metric(run, "best_epoch", 2)
    client.log_param(run, "checkpoint.monitor", "val/loss")
    client.log_param(run, "trainer.max_epochs", "10")
    assert why(client, run) == (
        "best epoch 2 of 4 by val/loss while val/dice reached 0.594 at epoch 3; "
        "train/loss flat (0.693 -> 0.689); stopped after 4 of 10 epochs"
    )
    assert why(client, None) == ""


def test_per_case_lines_pair_seeds_and_name_the_shared_cases():
    table = runs(seeds=2).assign(run_id=lambda t: [f"r{i}" for i in range(len(t))])
    cases = {}
    for row in table.itertuples():
        ids = [f"c{i}" for i in range(row.seed, row.seed + 10)]  # seeds share 9 of 10 cases
        dice = np.full(10, 0.8 - 0.05 * row.f0)
        cases[row.run_id] = pd.DataFrame({"case_id": ids, "dice": dice, "true_pixels": 100})
        cases[row.run_id]["pixels"] = 400
    from segexp.blame import analyze

    lines = case_lines(cases, table, analyze(table, ["f0", "f1"], METRIC))
    assert lines[0].startswith("- validation cases: seed 0: 10, seed 1: 10; 9 validated by every")
    assert (
        "| f0 | 20 | 0.800 | 0.750 | 100% |" in lines
        and "| f1 | 20 | 0.775 | 0.775 | 0% |" in lines
    )
    assert not any("p =" in line or "wilcoxon" in line.lower() for line in lines)
    levels = mask_levels(cases, table)  # per run: an empty and an all-foreground mask's Dice
    assert levels.index.equals(table.index) and (levels["empty"] == 0).all()
    assert levels["full"].to_numpy() == pytest.approx(0.4)

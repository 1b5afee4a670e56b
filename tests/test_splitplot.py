"""The split plot of nested epochs, on planted tables: false verdicts, bias, coverage, dead runs.

Each planted run has its own noise (shared by its two budgets) and a smaller noise per budget;
its shorter budget's row is read from its history, as factors.table writes it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from segexp.blame import analyze
from segexp.blame.nested import EPOCHS

METRIC = "val/dice_best"
NAMES = ["f0", "f1", EPOCHS]
RUN_SD, BUDGET_SD = 0.01, 0.003  # between runs, and each budget's own
SIMS = 150
FALSE_BOUND = 0.05 + 2.326 * math.sqrt(0.05 * 0.95 / SIMS)  # 99% above a true 5%


def planted(rng, effects: dict[str, float] | None = None, seeds: int = 3) -> pd.DataFrame:
    """2^3 cells x seeds, epochs nested: 0.8 plus the planted terms plus the run's noise."""
    effects = effects or {}
    rows = []
    for f0, f1, seed in itertools.product((0, 1), (0, 1), range(seeds)):
        run = rng.normal(0, RUN_SD)
        for epochs in (0, 1):
            z = {"f0": f0 - 0.5, "f1": f1 - 0.5, EPOCHS: epochs - 0.5}
            value = 0.8 + run + rng.normal(0, BUDGET_SD)
            for term, size in effects.items():
                # an interaction's size: one factor's effect at the other's B minus at its A
                value += size * math.prod(z[name] for name in term.split(" x "))
            own = f"run-{f0}{f1}-{seed}"
            rows.append(
                {
                    "f0": f0, "f1": f1, EPOCHS: epochs, "seed": seed,
                    "run_id": own if epochs else None, "read_from": None if epochs else own,
                    METRIC: value,
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def false_rate(tables, drop_pairing: bool = False) -> float:
    found = []
    for table in tables:
        used = table.drop(columns="read_from") if drop_pairing else table
        verdicts = analyze(used, NAMES, METRIC).effects.verdict
        found.append(verdicts.isin(("hurt", "helped")).any())
    return float(np.mean(found))


def test_nested_epochs_keep_false_verdicts_within_alpha():
    rng = np.random.default_rng(0)
    tables = [planted(rng) for _ in range(SIMS)]
    assert false_rate(tables) <= FALSE_BOUND
    # the same rows taken as independent runs: the noise between runs counted half
    assert false_rate(tables[:80], drop_pairing=True) > 0.1


def test_split_plot_effects_are_unbiased_and_cover():
    truth = {"f0": -0.02, EPOCHS: 0.015, f"f0 x {EPOCHS}": -0.01, "f0 x f1": 0.0}
    rng = np.random.default_rng(1)
    tables = [planted(rng, truth) for _ in range(100)]
    found = [analyze(t, NAMES, METRIC).effects.set_index("term") for t in tables]
    for term, size in truth.items():
        effects = np.array([f.effect[term] for f in found])
        covered = np.mean([f.ci_low[term] <= size <= f.ci_high[term] for f in found])
        assert abs(effects.mean() - size) < 3 * effects.std() / math.sqrt(len(found)), term
        assert covered >= 0.9, term
    within = np.array([f.se[EPOCHS] for f in found])
    between = np.array([f.se["f0"] for f in found])
    assert within.mean() < 0.5 * between.mean()  # epochs is tested against the smaller noise


def test_the_report_says_which_terms_were_tested_within_runs():
    result = analyze(planted(np.random.default_rng(2), {"f0": -0.05}), NAMES, METRIC)
    assert any(note.startswith("split plot:") for note in result.notes)
    table = result.effects.set_index("term")
    assert table.verdict["f0"] == "hurt" and list(result.effects.term[:3]) == NAMES
    assert result.seed_sd == pytest.approx(math.hypot(RUN_SD, BUDGET_SD), rel=0.5)


def test_a_run_that_never_learned_is_left_out_with_its_own_row():
    table = planted(np.random.default_rng(3), {"f0": -0.05})
    dead = (table.f0 == 1) & (table.f1 == 0) & (table.seed == 1)
    table.loc[dead, METRIC] = 0.0
    result = analyze(table, NAMES, METRIC)
    [out] = result.left_out
    assert out.run_id == "run-10-1" and out.value == 0.0 and out.levels == (1, 0, 1)
    assert out.twins == pytest.approx(0.775, abs=0.03)
    assert result.effects.set_index("term").verdict["f0"] == "hurt"


def test_runs_without_a_twin_are_left_out_and_named():
    table = planted(np.random.default_rng(4))
    table = table.drop(table.index[(table.f0 == 0) & (table.f1 == 0) & (table.seed == 0)][:1])
    result = analyze(table, NAMES, METRIC)
    assert any("without a twin" in note for note in result.notes)
    assert result.runs == 2 * (4 * 3 - 1)

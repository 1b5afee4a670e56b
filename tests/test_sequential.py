"""The `--seeds auto` looks: alpha spent by information fraction against Bonferroni over looks.

The rates are simulated by benchmarks/sim_sequential.py on planted 2^3 blames of 2 to 5 seeds;
`python -m benchmarks.sim_sequential` prints the whole table.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from segexp.blame import seeds_decision
from segexp.blame.sequential import look_level, look_levels, round_of, settled, spent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed
from benchmarks import sim_sequential as sim  # noqa: E402

REPS = 800
# a false-verdict rate of 0.05 lands below this with 99% chance over REPS blames
FALSE_BOUND = 0.05 + 2.326 * math.sqrt(0.05 * 0.95 / REPS)


def test_spending_shares_alpha_out_over_the_rounds():
    levels = look_levels(4)
    assert levels.sum() == pytest.approx(0.05) and np.all(np.diff(levels) > 0)
    assert levels[0] < 0.0025 and levels[-1] > 0.02  # little at 2 seeds, most at 5
    assert spent(2 / 5) == pytest.approx(levels[0]) and spent(1.0) == pytest.approx(0.05)
    assert look_levels(4, spending="bonferroni").tolist() == [0.0125] * 4
    assert look_levels(1).tolist() == [0.05]
    with pytest.raises(ValueError, match="spending"):
        look_levels(4, spending="pocock")


def test_the_round_comes_from_the_planned_seeds():
    table = sim.runs_table(4)
    table.loc[3, sim.METRIC] = np.nan  # a failed run is still planned
    assert round_of(sim.runs_table(2)) == 0 and round_of(table) == 2
    assert look_level(table, 4, 0.05, "obf") == look_levels(4)[2]
    with pytest.raises(ValueError, match="no look"):
        look_level(sim.runs_table(6), 4, 0.05, "obf")
    with pytest.raises(ValueError, match="no round"):
        round_of(sim.runs_table(1))


def test_settled_needs_a_final_verdict_or_a_ci_inside_the_margin():
    verdict = np.array(["hurt", "within noise", "within noise", "aliased", "no replicates"])
    low, high = np.array([-3, -0.5, -2, np.nan, -0.1]), np.array([-1, 0.5, 0.5, np.nan, 0.1])
    assert settled(verdict, low, high, 1.0).tolist() == [True, True, False, True, False]


def test_the_simulation_decides_as_seeds_decision_does():
    rng = np.random.default_rng(4)
    full = sim.runs_table(5)
    y = sim.planted(full, -1.5, 3, rng)
    for r, spending in [(0, "obf"), (1, "bonferroni"), (3, "obf")]:
        rows = (full.seed < 2 + r).to_numpy()
        table = full[rows].reset_index(drop=True)
        level = look_levels(4, spending=spending)[r]
        verdict, terms, done = sim.look(table, y[rows], level, None)
        for j in range(y.shape[1]):
            one = table.assign(**{sim.METRIC: y[rows, j]})
            decision = seeds_decision(one, sim.FACTORS, sim.METRIC, 4, spending=spending)
            effects = decision["analysis"].effects.set_index("term").verdict
            assert decision["alpha"] == level and decision["stop"] == done[j]
            assert effects[terms].tolist() == verdict[:, j].tolist()


@pytest.fixture(scope="module")
def figures():
    with sim.one_thread():
        rng = np.random.default_rng(0)
        scenarios = [sim.Scenario("no effect", 0.0), sim.Scenario("harm", -1.25)]
        return {s.name: sim.rates(s, REPS, rng) for s in scenarios}


def test_both_rules_keep_the_family_wise_false_verdict_rate(figures):
    for found in figures.values():
        for rates in found.values():
            assert rates.false <= FALSE_BOUND, figures


def test_spending_finds_the_harm_more_often_than_bonferroni(figures):
    obf, bonferroni = figures["harm"]["obf"], figures["harm"]["bonferroni"]
    assert obf.power >= bonferroni.power + 0.03 and obf.seeds <= bonferroni.seeds + 0.05, figures

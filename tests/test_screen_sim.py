"""Screen, then confirm: screening.py's pure functions, and its rates on planted learning curves.

The rates come from benchmarks/sim_screen.py (no training); `python -m benchmarks.sim_screen`
prints the whole table. Targets: a family-wise false-verdict rate of at most 5%, power of 90%
where the screen sees the harm, screens that miss it caught or still right, and the compute
spent at most 0.2 of the full factorial at k = 4 and 0.1 at k = 6.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segexp.blame import analysis
from segexp.blame.factors import Change, Factor
from segexp.blame.screening import (
    Fidelity,
    check,
    held_check,
    seeds_needed,
    sub_change,
    suspects,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed
from benchmarks import sim_screen as sim  # noqa: E402

SIMS = 150
Z99 = 2.326  # a rate at its target lands within this many binomial SEs with 99% chance
FALSE_BOUND = 0.05 + Z99 * math.sqrt(0.05 * 0.95 / SIMS)
POWER_BOUND = 0.9 - Z99 * math.sqrt(0.9 * 0.1 / SIMS)
METRIC = "val/dice_best"


def screen_table(effects: dict[str, float], noise: float = 0.002, seed: int = 0) -> pd.DataFrame:
    """A 2^k screen at 2 seeds: 0.8 plus each factor's effect at its B level, plus noise."""
    names = list(effects)
    found = sim.table_of(
        names, sim.designs.make_design(len(names), "full").cells, 2, lambda c, s: 0
    )
    found[METRIC] = 0.8 + found[names].to_numpy(float) @ np.array(list(effects.values()))
    found[METRIC] += np.random.default_rng(seed).normal(0, noise, len(found))
    return found


def screened(effects: dict[str, float], noise: float = 0.002, seed: int = 0):
    found = screen_table(effects, noise, seed)
    return found, analysis.analyze(found, list(effects), METRIC)


def test_fidelity_says_what_the_screen_trains():
    assert Fidelity(2, 0.25, 64).text() == "2 epochs, 1/4 of the cases, 64 px"
    assert Fidelity(3, 1.0).text() == "3 epochs, all of the cases"


def test_a_screen_gap_of_the_wrong_sign_is_not_trusted():
    found, result = screened({"f0": 0.05, "f1": 0.0})
    assert not check(found, result, ["f0", "f1"], -0.05).ok


def test_a_screen_that_shows_the_gap_is_trusted():
    found, result = screened({"f0": -0.04, "f1": 0.0})
    done = check(found, result, ["f0", "f1"], -0.05)
    assert done.ok and done.screen_gap == pytest.approx(-0.04, abs=0.005)


def test_a_screen_where_every_run_scored_the_same_is_not_trusted():
    found = screen_table({"f0": 0.0, "f1": 0.0}, noise=0.0)
    result = analysis.analyze(found, ["f0", "f1"], METRIC)
    done = check(found, result, ["f0", "f1"], -0.05)
    assert not done.ok and "every screened run scored 0.8000" in done.line


def test_a_large_screened_effect_stays_a_suspect_and_a_small_one_is_ruled_out():
    _, result = screened({"f0": -0.05, "f1": 0.0005, "f2": 0.0})
    keep, ruled = suspects(result, -0.05, "2 epochs")
    assert keep == ["f0"]
    assert [line.split(" ")[0] for line in ruled] == ["f1", "f2"]
    assert "screened out: effect" in ruled[0] and "at 2 epochs" in ruled[0]


def test_without_suspects_the_largest_main_effect_is_confirmed():
    _, result = screened({"f0": 0.0, "f1": 0.0, "f2": 0.0}, noise=0.01, seed=1)
    assert (result.effects.verdict == "within noise").all()
    mains = result.effects[result.effects.kind == "main"].set_index("term").effect
    keep, ruled = suspects(result, 1.0, "2 epochs")  # every effect far below SHARE of the gap
    assert keep == [mains.abs().idxmax()] and len(ruled) == 2


def test_b_is_held_against_the_all_b_run_of_its_seed():
    found, result = screened({"f0": -0.05}, noise=0.005)
    twin = found.loc[(found.f0 == 1) & (found.seed == 0), METRIC].iloc[0]
    assert held_check(found, result, ["f0"], twin + 0.002, 0).ok
    missed = held_check(found, result, ["f0"], twin - 0.1, 0)
    assert (
        not missed.ok and "its seed-0 run" in missed.line and "the screen missed it" in missed.line
    )


def test_a_is_held_against_the_all_a_run_of_its_seed_where_the_others_sit_at_b_s_levels():
    found, result = screened({"f0": -0.05}, noise=0.005)
    twin = found.loc[(found.f0 == 0) & (found.seed == 0), METRIC].iloc[0]
    assert held_check(found, result, ["f0"], twin - 0.002, 0, level=0).ok
    missed = held_check(found, result, ["f0"], twin - 0.1, 0, level=0)
    assert not missed.ok and missed.line.startswith("A check:") and "all-A cell" in missed.line
    assert missed.full_gap == pytest.approx(0.1)  # B's held levels minus A's: A lower, so +


def test_a_sub_change_holds_the_other_factors_at_a_s_level():
    factors = [
        Factor("optimizer.lr", "leaf", (3e-4, 1e-3)),
        Factor("optimizer", "group", ("adam", "sgd")),
        Factor("optimizer.weight_decay", "leaf", (None, 1e-4)),
    ]
    sub = sub_change(Change(factors, ["seed=1"]), [0])
    assert [f.name for f in sub.factors] == ["optimizer.lr"]
    assert sub.base == ["seed=1", "optimizer=adam"]  # A without weight decay: no override
    at_b = sub_change(Change(factors, ["seed=1"]), [0], level=1)
    assert at_b.base == ["seed=1", "optimizer=sgd", "optimizer.weight_decay=0.0001"]
    assert sub.cell_overrides((1,), []) == ["seed=1", "optimizer=adam", "optimizer.lr=0.001"]


def test_the_simulation_counts_compute_as_the_blame_does():
    lgg = sim.SCENARIOS[3]  # batch size, lr, weight decay, epochs 7 -> 10
    blame = sim.Blame(lgg, None, {})
    assert sim.yardstick(lgg) == 3 * 8 * (7 + 10)
    confirm = sim.confirmed(lgg.names, lgg.names[:3], [sim.LR])
    assert confirm == [1, 3]  # lr and the epochs, which no screen varies
    cells = sim.designs.make_design(2, "full").cells
    assert blame.cost(blame.trainings(confirm, cells)) == 6 * 10  # 7 epochs read, A reused
    assert blame.hold(confirm) == 1  # B trained the longer budget: the others at B's levels
    assert blame.cost(blame.trainings(confirm, cells)) == 5 * 10  # B reused whole
    blame.held = 0
    every = list(range(4))
    whole = blame.trainings(every, sim.designs.make_design(4, "full").cells)
    assert blame.cost(whole) == (8 * 3 - 1) * 10  # B reused
    assert sim.confirmed(lgg.names, lgg.names[:3], None) == every


def test_a_small_confirmation_gets_the_seeds_its_noise_estimate_needs():
    one = sim.designs.make_design(2, "full").cells
    assert seeds_needed(one, [sim.LR, sim.EPOCHS], 3, nested=True) == 4  # 2 runs a seed
    assert seeds_needed(one, [sim.LR, sim.EPOCHS], 3, nested=False) == 3
    assert seeds_needed(sim.designs.make_design(1, "full").cells, [sim.LR], 3, False) == 4
    three = sim.designs.make_design(3, "full").cells
    assert seeds_needed(three, ["a", "b", sim.EPOCHS], 3, nested=True) == 3


def test_planted_effects_are_zero_only_where_nothing_was_planted():
    truth = sim.truth(sim.SCENARIOS[3], (0, 1, 2, 3))
    assert abs(truth[sim.LR]) > 0.05 and abs(truth[f"{sim.LR} x {sim.EPOCHS}"]) > 1e-4
    zero = [t for t, v in truth.items() if abs(v) < sim.NULL_TOL]
    assert set(zero) == {t for t in truth if "batch_size" in t or "weight_decay" in t}


@pytest.fixture(scope="module")
def figures():
    names = [
        "null, k=4 with epochs", "null, k=6", "harm early, k=4 with epochs",
        "harm late, k=4 with epochs", "helps early, hurts late, k=4", "one harm, k=6",
    ]  # fmt: skip
    chosen = [s for s in sim.SCENARIOS if s.name in names]
    return sim.table(SIMS, chosen, seed=5, reference=False).set_index("scenario")


@pytest.mark.slow
def test_no_false_verdicts_beyond_alpha_without_an_epochs_factor(figures):
    assert figures.loc[["null, k=6", "one harm, k=6"], "FWER"].max() <= FALSE_BOUND


@pytest.mark.slow
def test_no_false_verdicts_beyond_alpha_with_nested_epochs(figures):
    assert figures.loc["null, k=4 with epochs", "FWER"] <= FALSE_BOUND


@pytest.mark.slow
def test_a_screen_that_sees_the_harm_confirms_it(figures):
    assert figures.loc["harm early, k=4 with epochs", "power"] >= POWER_BOUND


@pytest.mark.slow
def test_a_single_confirmed_harm_keeps_its_power(figures):
    assert figures.loc["one harm, k=6", "power"] >= POWER_BOUND


@pytest.mark.slow
def test_a_screen_that_cannot_see_the_harm_is_caught_or_still_right(figures):
    invalid = figures.loc[["harm late, k=4 with epochs", "helps early, hurts late, k=4"]]
    assert invalid["caught or right"].min() >= POWER_BOUND, invalid


@pytest.mark.slow
def test_at_k_6_the_screen_spends_a_tenth_of_the_full_design(figures):
    assert figures.loc["one harm, k=6", "compute"] <= 0.1


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="lr x epochs at 4 seeds (3 dof between runs), B reused: 7 ten-epoch trainings, 0.17 "
    "alone; the screen and null factors kept as suspects add about 0.05",
)
def test_at_k_4_the_screen_spends_a_fifth_of_the_full_design(figures):
    assert figures.loc["harm early, k=4 with epochs", "compute"] <= 0.2

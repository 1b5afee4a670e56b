"""Designs of `segexp blame`: resolution and aliases of the fractions, the ablation path's walk."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from segexp.blame import letters, make_design, path_next, path_steps, seed_rounds


def regular_fraction(k: int) -> np.ndarray:
    """The fraction's cells in -1/+1 coding without the runs added for A or B."""
    design = make_design(k)
    cells = np.array(design.cells) * 2 - 1
    if k == 5:  # the 2^(5-1) with E = ABCD holds B but not A, which was added
        cells = cells[cells.sum(axis=1) != -k]
    return cells


@pytest.mark.parametrize("k, resolution", [(5, 5), (6, 4), (7, 4), (8, 4)])
def test_fractions_have_the_stated_resolution_and_defining_relation(k, resolution):
    design = make_design(k)
    cells = regular_fraction(k)
    assert len(cells) == 16 and design.resolution == resolution
    assert (0,) * k in design.cells and (1,) * k in design.cells
    columns = dict(zip(letters(k), cells.T, strict=True))
    for word in design.defining_relation:  # every word of I = ... is constant over the fraction
        assert abs(np.prod([columns[c] for c in word], axis=0).sum()) == 16
    assert min(len(w) for w in design.defining_relation) == resolution
    # resolution >= IV, checked on the cells themselves: main effects orthogonal to all 2FIs
    pairs = {a + b: columns[a] * columns[b] for a, b in itertools.combinations(letters(k), 2)}
    for main, pair in itertools.product(columns.values(), pairs.values()):
        assert main @ pair == 0
    # the alias chains stated are exactly the 2FIs with equal columns (up to sign)
    stated = {frozenset(chain) for chain in design.aliases}
    found = {frozenset(p for p, c in pairs.items() if abs(c @ col) == 16) for col in pairs.values()}
    assert stated == {chain for chain in found if len(chain) > 1}
    if resolution >= 5:
        assert not design.aliases
    else:
        assert design.aliases and "aliased" in design.note


def test_design_kinds_and_limits():
    assert make_design(3).cells == list(itertools.product((0, 1), repeat=3))
    oat = make_design(5, "oat")
    assert len(oat.cells) == 12 and (1, 0, 0, 0, 0) in oat.cells and (0, 1, 1, 1, 1) in oat.cells
    assert "not estimable" in oat.note
    assert make_design(5).note.endswith("run A added") and len(make_design(5).cells) == 17
    assert make_design(4, "path").cells == [(0,) * 4, (1,) * 4]
    with pytest.raises(ValueError, match="narrow"):
        make_design(9)
    with pytest.raises(ValueError, match="--design"):
        make_design(3, "latin")


def drive_path(effects: np.ndarray, noise: float, rng) -> tuple[pd.DataFrame, list[int]]:
    """Run the ablation path on planted additive effects, two seeds per cell."""
    factors = [f"f{i}" for i in range(len(effects))]
    rows, calls = pd.DataFrame(columns=[*factors, "seed", "val/dice"]), []
    while cells := path_next(rows, factors, "val/dice"):
        calls.append(len(cells))
        new = pd.DataFrame(
            [
                {**dict(zip(factors, c, strict=True)), "seed": s}
                | {"val/dice": 0.8 + effects @ np.array(c) + rng.normal(0, noise)}
                for c in cells
                for s in (0, 1)
            ]
        )
        rows = new if rows.empty else pd.concat([rows, new], ignore_index=True)
    return rows, calls


@pytest.mark.parametrize(
    "effects, order",
    [
        ([-0.03, 0.01, -0.06, 0.0], [2, 0, 3, 1]),  # B worse: most harm first
        ([0.02, 0.05, -0.01, 0.03], [1, 3, 0, 2]),  # B better: most help first
    ],
)
def test_path_visits_k_k_plus_1_over_2_configurations_in_order(effects, order):
    rows, calls = drive_path(np.array(effects), 0.001, np.random.default_rng(0))
    assert calls == [2, 4, 3, 2]  # A and B, then the candidates of steps 1-3 (step 4 is B)
    assert rows.groupby(["f0", "f1", "f2", "f3"]).ngroups == 1 + 4 * 5 // 2
    steps, missing = path_steps(rows, ["f0", "f1", "f2", "f3"], "val/dice", False)
    assert [j for j, _ in steps] == order and missing == []


def test_path_on_a_loss_goes_most_harm_first_and_steps_around_failed_cells():
    factors, rows = ["f0", "f1", "f2"], pd.DataFrame(columns=["f0", "f1", "f2", "seed", "val/loss"])
    effects = np.array([0.1, 0.3, 0.2])  # every change raises the loss; f1 most
    while cells := path_next(rows, factors, "val/loss", True):
        new = pd.DataFrame(
            [
                {**dict(zip(factors, c, strict=True)), "seed": 0, "val/loss": effects @ c}
                for c in cells
            ]
        )
        new.loc[new[factors].apply(tuple, axis=1) == (0, 1, 0), "val/loss"] = np.nan  # failed
        rows = new if rows.empty else pd.concat([rows, new], ignore_index=True)
    steps, _ = path_steps(rows, factors, "val/loss", True)
    assert [j for j, _ in steps] == [2, 1, 0]  # f1 alone failed, so f2 (+0.2) first, then f1


def test_seed_rounds_fit_the_budget():
    assert seed_rounds(64, 8) == 7  # 2 seeds on 8 cells, then 6 rounds of 8
    assert seed_rounds(20, 8) == 1 and seed_rounds(48, 8, first=3, per_round=2) == 2
    with pytest.raises(ValueError, match="budget"):
        seed_rounds(10, 8)

"""`segexp fidelity`: what a run reports after each budget, and rank agreement per budget."""

from __future__ import annotations

import pandas as pd
import pytest

from segexp.compare.fidelity import Fidelity, padded, rank_agreement
from segexp.tracking.history import best_so_far


def test_a_budget_reports_the_metric_at_the_best_epoch_so_far_by_the_monitor():
    loss = [0.9, 0.5, 0.6, 0.5, 0.4]  # val/loss, min: best epochs 0, 1, 1, 1 (tie: earliest), 4
    dice = [0.1, 0.6, 0.7, 0.8, 0.75]
    assert best_so_far(loss, dice, "min") == [0.1, 0.6, 0.6, 0.6, 0.75]
    assert best_so_far(dice, dice, "max") == [0.1, 0.6, 0.7, 0.8, 0.8]
    assert padded([0.1, 0.6], 4) == [0.1, 0.6, 0.6, 0.6]  # stopped early: its end thereafter


def test_rank_agreement_is_one_where_a_budget_ranks_as_the_end_and_names_the_earliest():
    final = pd.Series([0.1, 0.5, 0.9, 0.7], index=list("abcd"))
    curves = pd.DataFrame(
        {1: [0.4, 0.3, 0.1, 0.2], 2: [0.1, 0.3, 0.6, 0.5], 3: list(final)}, index=list("abcd")
    )
    rho, tau, runs = rank_agreement(curves, final)
    assert rho == pytest.approx([-1.0, 1.0, 1.0]) and tau == pytest.approx([-1.0, 1.0, 1.0])
    assert runs == [4, 4, 4]
    result = Fidelity("val/dice_best", [1, 2, 3], rho, tau, runs)
    assert result.earliest == 2
    assert list(result.table().columns) == ["epochs", "spearman", "kendall", "runs"]
    few = rank_agreement(curves.iloc[:2], final)[0]
    assert all(pd.isna(few))  # two runs rank nothing

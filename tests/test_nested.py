"""Nested epoch budgets: a longer run's history holds a shorter run's result."""

from __future__ import annotations

import pytest
from helpers import recorded_run, tiny
from omegaconf import OmegaConf

from segexp.blame import blame, from_leaves, screening
from segexp.blame.nested import Nesting, nesting, value_at_budget
from segexp.blame.plan import make_plan
from segexp.train import train


@pytest.mark.slow  # four trainings
@pytest.mark.parametrize(
    "extra",
    [
        ["checkpoint.monitor=val/loss", "checkpoint.mode=min"],
        # patience 1 on the Dice: the 4-epoch run stops early; the 2-epoch one cannot tell
        ["callbacks=early_stopping", "callbacks.early_stopping.patience=1"],
    ],
    ids=["best-by-val-loss", "early-stopping"],
)
def test_a_longer_runs_history_gives_the_shorter_runs_result(work_dir, client, hc18_root, extra):
    short = train(tiny(work_dir, hc18_root, "trainer.max_epochs=2", *extra))
    long = train(tiny(work_dir, hc18_root, "trainer.max_epochs=4", *extra))
    cfg = tiny(work_dir, hc18_root, *extra)
    nest = Nesting(0, 2, 4, cfg.checkpoint.monitor, cfg.checkpoint.mode, "val/dice")
    assert value_at_budget(client, long.run_id, nest) == pytest.approx(
        short.metrics["val/dice_best"], abs=1e-6
    )
    whole = Nesting(0, 4, 4, cfg.checkpoint.monitor, cfg.checkpoint.mode, "val/dice")
    assert value_at_budget(client, long.run_id, whole) == pytest.approx(
        long.metrics["val/dice_best"], abs=1e-6
    )


def test_a_schedule_annealed_over_max_epochs_trains_both_budgets(work_dir, hc18_root):
    def change(*overrides):
        a, b = (
            OmegaConf.to_container(tiny(work_dir, hc18_root, *overrides, f"trainer.max_epochs={n}"))
            for n in (7, 10)
        )
        return from_leaves(a, b)

    def compose(extra):
        def cell_config(levels):
            return tiny(work_dir, hc18_root, *extra, f"trainer.max_epochs={(7, 10)[levels[0]]}")

        return cell_config

    found, why = nesting(change("scheduler=cosine"), "val/dice_best", compose(["scheduler=cosine"]))
    assert found is None and "scheduler.T_max" in why
    found, why = nesting(change(), "val/dice_best", compose([]))
    assert why is None and (found.short, found.long, found.history_key) == (7, 10, "val/dice")
    assert found.short_level == 0
    found, why = nesting(change(), "val/dice", compose([]))
    assert found is None and "not a best-epoch metric" in why


def test_train_every_budget_holds_for_the_confirmation_too(work_dir, client, hc18_root):
    a = recorded_run(work_dir, hc18_root, "debug=tiny", "seed=1", "trainer.max_epochs=2")
    b = recorded_run(
        work_dir, hc18_root, "debug=tiny", "seed=1", "trainer.max_epochs=4", "optimizer.lr=0.1"
    )
    for nest_epochs in (True, False):
        plan = make_plan(client, a, b, None, 2, "full", [], None, work_dir, nest_epochs)
        confirm = screening.confirmation(plan, list(range(len(plan.names))), b_seed=1)
        assert (plan.nesting is not None, confirm.nesting is not None) == (nest_epochs,) * 2
        # nested, B's 4-epoch runs hold the 2-epoch cells: 2 runs a seed, else all 4 train
        runs = 2 if nest_epochs else 4
        assert len(confirm.planned()) == runs * len(confirm.seeds)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_blame_reading_the_shorter_budget_reaches_the_verdicts_of_training_both(
    work_dir, client, hc18_root, capsys
):
    # batch 2, batch norm, Dice loss: the learning cells reach Dice ~0.8 within 8 epochs
    base = ["model.batch_norm=true", "loss=dice", "dataset.batch_size=2", "seed=1"]
    run_a = train(tiny(work_dir, hc18_root, *base, "trainer.max_epochs=8")).run_id
    # lr 0: nothing learns, the harm; 10 epochs: the budget read back for the 8-epoch cells
    b = tiny(work_dir, hc18_root, *base, "trainer.max_epochs=10", "optimizer.lr=0")
    run_b = train(b).run_id
    artifacts = (work_dir / "artifacts").as_uri()

    nested = blame(
        client, artifacts, run_a, run_b, seeds=2, out_dir=work_dir / "nested", fidelity="full"
    )
    out = capsys.readouterr().out
    assert "trainer.max_epochs=8 is read from the 10-epoch runs' histories" in out
    assert nested.trained == 3  # of 8 runs: A and B reused, 3 read from 10-epoch histories
    assert nested.results.read_from.notna().sum() == 3

    both = blame(
        client, artifacts, run_a, run_b, seeds=2, out_dir=work_dir / "both", nest_epochs=False,
        fidelity="full",
    )  # fmt: skip
    assert both.trained == 3  # the 8-epoch cells nested read from histories (A reused)
    keys = ["trainer.max_epochs", "optimizer.lr", "seed"]
    read = nested.results.set_index(keys)["val/dice_best"].sort_index()
    trained = both.results.set_index(keys)["val/dice_best"].sort_index()
    assert read.to_numpy() == pytest.approx(trained.to_numpy(), abs=1e-6)
    verdicts = [r.effects.set_index("term").verdict.sort_index() for r in (nested, both)]
    assert verdicts[0].equals(verdicts[1])
    assert verdicts[1]["optimizer.lr"] == "hurt"

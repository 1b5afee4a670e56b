"""Blame on heavy-tailed training noise: runs that never learned or disagree with their twins.

The rates are simulated by benchmarks/blame_noise.py on planted tables that today's estimator
(least squares on every run) and the robust one (the screen, then least squares on the runs it
keeps) both analyse; `python -m benchmarks.blame_noise` prints the whole table.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from helpers import make_cfg
from scipy import stats

from segexp.blame import analyze, blame, headline, make_design, model, note, robust, write_report
from segexp.blame.robust import bisquare_fit, fisher_p, huber_fit, lad_fit, robust_estimate
from segexp.tracking import tags
from segexp.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed
from benchmarks import blame_noise  # noqa: E402

METRIC = "val/dice_best"
FALSE_BOUND = 0.065  # 1000 replications: a rate of 0.05 lands below this with > 98% chance
DESIGNS = {"full k=3": make_design(3).cells, "full k=4": make_design(4).cells}
DESIGNS["fraction k=6"] = make_design(6).cells
SCENARIOS = {s.name: s for s in blame_noise.SCENARIOS}
HEAVY = ["t3 + 10% dead", "t3 + dead A", "t3 + 10% dead + dead A"]


def simulated(design: str, seeds: int, scenario: str, reps: int = 1000, seed: int = 0):
    with blame_noise.one_thread():
        rng = np.random.default_rng(seed)
        return blame_noise.rates(DESIGNS[design], seeds, SCENARIOS[scenario], reps, rng)


@pytest.mark.parametrize("scenario", HEAVY)
@pytest.mark.parametrize("design", list(DESIGNS))
def test_dead_starts_neither_hide_a_harm_nor_make_false_verdicts(design, scenario):
    rates = simulated(design, 3, scenario)
    assert rates.false_new <= FALSE_BOUND, rates
    assert rates.power_new >= (0.85 if design == "full k=3" else 0.9), rates
    assert rates.power_today < 0.5, rates  # one dead run erases least squares' verdicts


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("design", list(DESIGNS))
def test_two_seeds_keep_the_family_wise_false_verdict_rate(design, scenario):
    assert simulated(design, 2, scenario, seed=1).false_new <= FALSE_BOUND


@pytest.mark.parametrize("scenario", ["normal", "t3"])
def test_on_well_behaved_noise_the_screen_costs_no_power(scenario):
    rates = simulated("full k=3", 3, scenario, seed=2)
    assert rates.false_new <= FALSE_BOUND and rates.power_new >= rates.power_today - 0.01
    assert rates.left_out < (0.01 if scenario == "normal" else 0.1)  # runs left out per table


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("seeds", [2, 3])
def test_full_six_factor_design_on_heavy_noise(seeds, scenario):
    cells = make_design(6, "full").cells
    with blame_noise.one_thread():
        rng = np.random.default_rng(seeds)
        rates = blame_noise.rates(cells, seeds, SCENARIOS[scenario], 1000, rng)
    assert rates.false_new <= FALSE_BOUND and rates.power_new >= 0.9, rates


def regression_table(rows: int, rng) -> tuple[np.ndarray, np.ndarray]:
    x = np.column_stack([np.ones(rows), rng.integers(0, 2, (rows, 3)) - 0.5])
    y = x @ [0.8, -0.04, 0.01, 0.0] + 0.02 * rng.standard_t(3, rows)
    y[:3] = 0.0  # dead starts
    return x, y


def test_the_m_fits_are_statsmodels_rlm_and_quantreg():
    x, y = regression_table(40, np.random.default_rng(3))
    keep, col = np.ones((40, 1), bool), y[:, None]
    lad = lad_fit(x, col, keep, 1e-9)[0]
    median = sm.QuantReg(y, x).fit(q=0.5).params
    assert np.abs(y - x @ lad).sum() == pytest.approx(np.abs(y - x @ median).sum(), rel=1e-5)
    beta, scale = huber_fit(x, col, keep, lad[None], 1e-9)
    huber = sm.RLM(y, x, M=sm.robust.norms.HuberT()).fit(
        start_params=lad, maxiter=200, tol=1e-12, conv="coefs"
    )
    assert beta[0] == pytest.approx(huber.params, abs=1e-7)
    assert scale[0] == pytest.approx(huber.scale, rel=1e-6)
    bisquare = sm.RLM(y, x, M=sm.robust.norms.TukeyBiweight()).fit(
        start_params=huber.params, start_scale=huber.scale, update_scale=False, tol=1e-12,
        maxiter=200, conv="coefs",
    )  # fmt: skip
    ours = bisquare_fit(x, col, keep, beta, scale)[0]
    assert ours == pytest.approx(bisquare.params, abs=1e-7)


def test_fisher_p_is_scipys_two_sided_exact_test():
    rng = np.random.default_rng(4)
    levels = rng.integers(0, 2, (30, 3))
    hit = rng.random((30, 200)) < rng.uniform(0.05, 0.5, 200)
    p = fisher_p(hit, levels, np.ones(hit.shape, bool))
    for j, r in itertools.product(range(3), range(0, 200, 7)):
        a, h = levels[:, j] == 1, hit[:, r]
        table = [[(h & a).sum(), (~h & a).sum()], [(h & ~a).sum(), (~h & ~a).sum()]]
        assert p[j, r] == pytest.approx(stats.fisher_exact(table).pvalue, rel=1e-6), (j, r)


NAMES = ["optimizer.lr", "optimizer.weight_decay", "scheduler"]
LABELS = {"optimizer.lr": "3e-3 -> 1e-5", "optimizer.weight_decay": "0 -> 1e-6"}
LABELS["scheduler"] = "none -> cosine"


def issue_table(dead_b: bool = False, seed: int = 1) -> pd.DataFrame:
    """The real HC18 blame of the issue: lr 3e-3 -> 1e-5 costs 0.33; A at seed 43 scored 0."""
    rng = np.random.default_rng(seed)
    rows = [
        {**dict(zip(NAMES, c, strict=True)), "seed": s, "run_id": f"run{i}"}
        for i, (c, s) in enumerate(itertools.product(make_design(3).cells, (42, 43)))
    ]
    table = pd.DataFrame(rows)
    table[METRIC] = 0.78 - 0.33 * table["optimizer.lr"] + rng.normal(0, 0.006, len(table))
    if dead_b:
        table.loc[table["optimizer.lr"] == 1, METRIC] = 0.0
    table.loc[(table[NAMES].sum(axis=1) == 0) & (table.seed == 43), METRIC] = 0.0
    return table


def test_one_seed_that_never_took_off_no_longer_hides_the_harm(tmp_path):
    result = analyze(issue_table(), NAMES, METRIC)
    effects, plain = result.effects.set_index("term"), result.plain.set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt"
    assert effects.loc["optimizer.lr", "effect"] == pytest.approx(-0.33, abs=0.01)
    assert (effects.verdict.drop("optimizer.lr") == "within noise").all()
    assert (plain.verdict == "within noise").all() and result.plain_seed_sd > 0.1
    [dead] = result.left_out
    assert (dead.levels, dead.seed, dead.run_id, dead.reason) == (
        (0, 0, 0),
        43,
        "run1",
        "constant prediction",
    )
    assert dead.value == 0.0 and dead.twins == pytest.approx(0.78, abs=0.02)
    text = headline(result, LABELS)
    assert text.startswith("optimizer.lr 3e-3 -> 1e-5 hurt val/dice_best by 0.33")
    assert "1 run left out, named below; least squares on every run, which it sways, said: " in text
    assert "all 3 changes are within noise (seed SD 0.1" in text
    lines = write_report(result, tmp_path, "blame", LABELS).read_text().splitlines()
    assert lines[2] == text and lines[4] == "## Runs left out of the analysis (1)"
    assert lines[6].startswith("- A, seed 43 (run run1): val/dice_best 0.000 vs 0.78")
    assert "never learned: at the level of a constant prediction" in lines[6]


def test_a_level_that_stops_training_is_the_harm_and_says_how_often_runs_learned():
    result = analyze(issue_table(dead_b=True), NAMES, METRIC)
    effects = result.effects.set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt"
    assert effects.loc["optimizer.lr", "effect"] == pytest.approx(-0.78, abs=0.01)
    [finding] = result.takeoff
    assert (finding.factor, finding.hits, finding.runs) == ("optimizer.lr", (7, 0), (8, 8))
    text = headline(result, LABELS)
    assert "With optimizer.lr=1e-5, 0 of 8 runs learned (7 of 8 with 3e-3; Fisher" in text


def test_the_note_is_the_verdict_with_a_and_b_by_name():
    result = analyze(issue_table(), NAMES, METRIC)
    text = note(result, LABELS, (("lr3e-3", "a1b2"), ("lr1e-5", "c3d4")), trainings=14)
    first, *rest = text.splitlines()
    assert first == headline(result, LABELS, trainings=14)
    assert "A = `lr3e-3` (a1b2), B = `lr1e-5` (c3d4)." in rest
    assert "| optimizer.lr | 3e-3 -> 1e-5 | -0.33" in text and "![" not in text
    assert sum(line.startswith("| optimizer.lr |") for line in rest) == 1  # one factor list


@pytest.mark.parametrize("scenario", ["t3", "t3 + 10% dead + dead A"])
def test_robust_effects_are_unbiased_and_their_cis_cover(scenario):
    table = blame_noise.runs_table(DESIGNS["full k=4"], 3)
    factors = [f"f{i}" for i in range(4)]
    with blame_noise.one_thread():
        y, _ = blame_noise.planted(
            table, blame_noise.HARM, SCENARIOS[scenario], 2000, np.random.default_rng(6)
        )
        fit = model(table, factors, METRIC)
        out, _ = robust_estimate(
            fit, y, table[factors].to_numpy(int), METRIC, floors=blame_noise.DEAD
        )
    truth = np.zeros(len(out["effect"]))
    truth[0] = blame_noise.HARM * blame_noise.SD
    bias = np.nanmean(out["effect"], axis=1) - truth
    cover = ((out["ci_low"] <= truth[:, None]) & (truth[:, None] <= out["ci_high"])).mean(axis=1)
    assert np.abs(bias).max() < 0.1 * blame_noise.SD, bias / blame_noise.SD
    assert 0.93 <= cover.mean() <= 0.97 and cover.min() >= 0.92, cover


def test_a_run_whose_training_loss_never_fell_is_dead_whatever_its_dice(tmp_path):
    table = issue_table()
    table.loc[1, METRIC] = 0.3  # A at seed 43: a random net's Dice, not a constant's level
    stalled = pd.Series(table.index == 1, index=table.index)
    [dead] = analyze(table, NAMES, METRIC, stalled=stalled).left_out
    assert (dead.run_id, dead.reason) == ("run1", "train/loss flat")
    report = write_report(analyze(table, NAMES, METRIC, stalled=stalled), tmp_path, "b")
    assert "never learned: its training loss never fell" in report.read_text()


def test_a_run_that_never_learned_but_scored_like_its_twins_stays():
    table = issue_table()  # run1 (A, seed 43) at 0: far below its twin, left out
    at_b = table.index[(table["optimizer.lr"] == 1) & (table.seed == 43)][0]
    stalled = pd.Series(table.index == at_b, index=table.index)  # flat loss, a twin's Dice
    result = analyze(table, NAMES, METRIC, stalled=stalled)
    assert [run.run_id for run in result.left_out] == ["run1"]
    assert any("scored like its cell's runs that learned" in n for n in result.notes)
    effects = result.effects.set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt" and result.runs == len(table) - 1


@pytest.mark.parametrize(
    ("design", "seeds", "power"),
    [("full k=3", 3, 0.9), ("full k=3", 2, 0.5), ("fraction k=6", 2, 0.9)],
)
def test_near_a_constant_predictions_level_twin_like_dead_runs_keep_the_power(design, seeds, power):
    # Dice 0.33 +/- 0.03: ordinary runs land within the all-foreground floor's tolerance (a
    # quarter of those at the harmed level, 0.30) and count as dead. Leaving them all out cost
    # power: 0.81, 0.37 and 0.86 here.
    rates = simulated(design, seeds, "near floor", seed=3)
    assert rates.false_new <= FALSE_BOUND and rates.power_new >= power, rates
    assert rates.left_out < 1  # runs left out per table under no effect (2.7-5.2 without)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_blame_with_a_seed_that_never_learned_still_names_the_harm(work_dir, client, hc18_root):
    base = ["debug=tiny", "model.batch_norm=true", "loss=dice", "dataset.batch_size=2"]
    base += ["trainer.max_epochs=10", f"dataset.root={hc18_root}"]

    def trained(*overrides: str) -> str:
        return train(make_cfg(work_dir, *base, *overrides)).run_id

    run_a = trained("optimizer.lr=1e-2", "optimizer.weight_decay=0", "seed=1")
    run_b = trained("optimizer.lr=1e-5", "optimizer.weight_decay=1e-6", "seed=1")  # the harm
    artifacts = (work_dir / "artifacts").as_uri()
    plan = blame(client, artifacts, run_a, run_b, seeds=2, dry_run=True, work_dir=work_dir).plan
    a_seed_2 = plan.cells.rows[((0, 0), 2)]
    # planted: A's cell at seed 2 is a training that never learned (lr 0), reused by its hash
    dead = trained("optimizer.lr=0", "optimizer.weight_decay=0", "seed=2")
    client.set_tag(dead, tags.CONFIG_HASH, a_seed_2.hash)
    result = blame(client, artifacts, run_a, run_b, seeds=2, work_dir=work_dir, fidelity="full")
    assert result.trained == 5 and dead in set(result.results.run_id)
    effects = result.effects.set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt", (
        result.out_dir / "report.md"
    ).read_text()
    assert effects.loc["optimizer.weight_decay", "verdict"] == "within noise", effects
    [named] = [r for r in result.analysis.left_out if r.run_id == dead]
    assert (named.levels, named.seed, named.reason) == ((0, 0), 2, "train/loss flat")
    assert "train/loss flat (" in named.why
    report = (result.out_dir / "report.md").read_text().splitlines()
    assert report[0] == f"# blame {client.get_run(run_a).info.run_name} ({run_a}) -> " + (
        f"{client.get_run(run_b).info.run_name} ({run_b})"
    )
    assert report[2].startswith("optimizer.lr 0.01 -> 1e-5 hurt val/dice_best by ")
    assert any(line.startswith(f"- A, seed 2 (run {dead}): val/dice_best ") for line in report)
    parent = client.get_run(result.parent_run_id)
    description = parent.data.tags["mlflow.note.content"]
    assert (
        description.splitlines()[0] == report[2]
        and "| optimizer.lr | 0.01 -> 1e-5 |" in description
    )
    assert "effects.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_the_lad_start_finds_more_of_many_unusual_runs(monkeypatch):
    # 20% of runs 0.4 low (20 SD, not at a constant prediction's level): a least-squares start
    # is dragged towards them, and the M-fits from it miss more of them
    table = blame_noise.runs_table(DESIGNS["fraction k=6"], 3)
    factors = [f"f{i}" for i in range(6)]
    rng = np.random.default_rng(7)
    y, _ = blame_noise.planted(table, blame_noise.HARM, SCENARIOS["t3"], 1000, rng)
    unusual = rng.random(y.shape) < 0.2
    y = np.where(unusual, y - 0.4, y)
    fit, levels = model(table, factors, METRIC), table[factors].to_numpy(int)
    found = []
    with blame_noise.one_thread():
        for start in ("lad", "least squares"):
            if start != "lad":
                monkeypatch.setattr(
                    robust,
                    "lad_fit",
                    lambda x, y, keep, floor: robust.weighted_fit(x, y, keep * 1.0),
                )
            _, screen = robust_estimate(fit, y, levels, METRIC)
            found.append((screen.unusual & unusual).sum() / unusual.sum())
    assert found[0] > found[1] + 0.02, found

"""Blame statistics on planted tables: bias, CI coverage, family-wise error, reports.

Simulations fit each table of replications at once (`estimate` takes a matrix of responses);
with failed cells, 20 random failure patterns of 50 replications each make the 1000.
Run `python tests/test_analysis.py` for the design comparison figures.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from segexp.blame import (
    analyze,
    estimate,
    from_table,
    headline,
    make_design,
    model,
    path_analysis,
    path_next,
    seeds_decision,
    write_report,
)
from segexp.blame.sequential import look_levels

METRIC = "val/dice_best"
SD = 0.01  # seed-to-seed SD of the planted metric


def runs_table(cells, seeds: int, factors: list[str]) -> pd.DataFrame:
    levels = np.repeat(np.array(cells), seeds, axis=0)
    table = pd.DataFrame(levels, columns=factors)
    table["seed"] = np.tile(np.arange(seeds), len(cells))
    table[METRIC] = 0.0
    return table


def planted(table: pd.DataFrame, factors, main, pairs, reps: int, rng, mirror=False):
    """(runs, reps) metric values: +-1/2 coded effects, a seed effect and seed noise.

    mirror: append the reps with the noise negated (antithetic), so that the mean estimate of any
    linear estimator over all 2 x reps columns is its exact expectation: bias without MC error.
    """
    z = table[factors].to_numpy(float) - 0.5
    mean = 0.8 + z @ np.asarray(main) + 0.5 * SD * table.seed.to_numpy()
    for (i, j), effect in pairs.items():
        mean = mean + effect * z[:, i] * z[:, j]
    noise = rng.normal(0, SD, (len(table), reps))
    return mean[:, None] + (np.hstack([noise, -noise]) if mirror else noise)


def simulate(cells, main, pairs=None, seeds=2, reps=1000, fail=0.0, metric=METRIC, rng_seed=0):
    """Planted tables analysed `reps` times; with `fail`, 20 random failure patterns share them.

    Returns per term {truth, bias: [exact bias per failure pattern], est, cover (per rep)} and
    per replication (any false verdict, every verdict right).
    """
    rng = np.random.default_rng(rng_seed)
    k, pairs = len(main), pairs or {}
    factors = [f"f{i}" for i in range(k)]
    truth = dict(zip(factors, main, strict=True))
    truth |= {
        f"f{i} x f{j}": pairs.get((i, j), 0.0) for i, j in itertools.combinations(range(k), 2)
    }
    records, false_any, all_right = {}, [], []
    patterns = 20 if fail else 1
    for _ in range(patterns):
        table = runs_table(cells, seeds, factors)
        failed = rng.choice(len(cells), max(1, round(fail * len(cells))), replace=False)
        for c in failed if fail else []:
            table.loc[(table[factors] == cells[c]).all(axis=1), METRIC] = np.nan
        fit = model(table, factors, METRIC)
        ok = table[METRIC].notna().to_numpy()
        n = reps // patterns
        y = planted(table, factors, main, pairs, n, rng, mirror=True)[ok]
        out = estimate(fit, y, metric)
        terms = fit.terms.term[fit.terms.column >= 0]
        true = np.array([truth[t] for t in terms])[:, None]
        good = true < 0 if "loss" in metric else true > 0
        right = np.where(true == 0, "within noise", np.where(good, "helped", "hurt"))
        verdict = out["verdict"][:, :n]  # the independent draws, not their mirror images
        significant = np.isin(verdict, ["hurt", "helped"])
        false_any.append((significant & (verdict != right)).any(axis=0))
        all_right.append((verdict == right).all(axis=0))
        for i, term in enumerate(terms):
            rec = records.setdefault(
                term, {"truth": truth[term], "bias": [], "est": [], "cover": [], "right": []}
            )
            rec["right"].append(verdict[i] == right[i])
            rec["bias"].append(out["effect"][i].mean() - truth[term])
            rec["est"].append(out["effect"][i, :n])
            covered = (out["ci_low"][i] <= true[i]) & (true[i] <= out["ci_high"][i])
            rec["cover"].append(covered[:n])
    for rec in records.values():
        for key in ("est", "cover", "right"):
            rec[key] = np.concatenate(rec[key])
    return records, np.concatenate(false_any), np.concatenate(all_right)


def mains(k: int) -> list[float]:
    return [-2 * SD, SD] + [0.0] * (k - 2)  # one harmful change of 2 SD, one helpful of 1 SD


SCENARIOS = {  # design, planted main effects, planted interactions
    "full k=3": (make_design(3).cells, mains(3), {(0, 1): -SD}),
    "full k=4": (make_design(4).cells, mains(4), {(0, 1): -SD, (2, 3): SD}),
    "fractional k=5": (make_design(5).cells, mains(5), {(0, 1): -SD}),
    "fractional k=6": (make_design(6).cells, mains(6), {}),
    "one-at-a-time k=5": (make_design(5, "oat").cells, mains(5), {}),
}


@pytest.mark.parametrize("fail", [0.0, 0.1], ids=["complete", "10% failed"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_estimates_are_unbiased_and_cis_cover(scenario, fail):
    cells, main, pairs = SCENARIOS[scenario]
    records, _, _ = simulate(cells, main, pairs, fail=fail)
    assert {f"f{i}" for i in range(len(main))} <= set(records)  # every main effect estimated
    coverage = []
    for term, rec in records.items():
        bias = max(rec["bias"], key=abs)  # the worst failure pattern
        assert abs(bias) < 0.1 * SD, f"{term}: bias {bias / SD:+.2f} SD"
        coverage.append(rec["cover"].mean())
        assert 0.92 <= coverage[-1] <= 0.98, f"{term}: coverage {coverage[-1]:.3f}"
    assert 0.93 <= np.average(coverage, weights=[len(r["est"]) for r in records.values()]) <= 0.97


@pytest.mark.parametrize("fail", [0.0, 0.1], ids=["complete", "10% failed"])
@pytest.mark.parametrize("k", [4, 6])
def test_family_wise_false_verdicts_stay_at_5_percent_under_the_null(k, fail):
    # 1000 replications: a rate of 0.05 lands within 0.065 with > 98% chance; unadjusted per-term tests (~0.4) never do
    _, false_any, _ = simulate(make_design(k).cells, [0.0] * k, fail=fail, rng_seed=k)
    assert len(false_any) == 1000 and 0.02 <= false_any.mean() <= 0.065


def test_sequential_looks_at_a_split_alpha_keep_the_family_wise_error():
    # seeds added in rounds (2 -> 5 per cell), a verdict allowed at every look: union bound
    rng, k, rounds = np.random.default_rng(7), 3, 4
    factors = [f"f{i}" for i in range(k)]
    full = runs_table(make_design(k).cells, 2 + rounds - 1, factors)
    y = planted(full, factors, [0.0] * k, {}, 1000, rng)
    false_any = np.zeros(1000, bool)
    for seeds in range(2, 2 + rounds):
        keep = (full.seed < seeds).to_numpy()
        out = estimate(model(full[keep], factors, METRIC), y[keep], METRIC, alpha=0.05 / rounds)
        false_any |= np.isin(out["verdict"], ["hurt", "helped"]).any(axis=0)
    assert false_any.mean() <= 0.065


def noise_free(cells, k: int, seeds: int = 3) -> pd.DataFrame:
    factors = [f"f{i}" for i in range(k)]
    table = runs_table(cells, seeds, factors)
    table[METRIC] = 0.8 - 0.05 * table.f0
    return table


@pytest.mark.parametrize("kind", ["oat", "fractional"])
def test_level_means_counterexample_only_factor_0_costs(kind):
    # level means over the one-at-a-time cells would say -0.017 and `hurt` for f1..f4
    effects = analyze(
        noise_free(make_design(5, kind).cells, 5), [f"f{i}" for i in range(5)], METRIC
    )
    table = effects.effects.set_index("term")
    assert table.loc["f0", "effect"] == pytest.approx(-0.05, abs=1e-9)
    assert table.loc["f0", "verdict"] == "hurt"
    others = table.loc[["f1", "f2", "f3", "f4"]]
    assert (others.effect.abs() < 1e-9).all() and (others.verdict == "within noise").all()


def test_lower_is_better_metrics_flip_the_verdict():
    table = noise_free(make_design(3).cells, 3)
    for metric, verdict in [(METRIC, "hurt"), ("val/loss", "helped"), ("val/hc_mae_mm", "helped")]:
        result = analyze(table.rename(columns={METRIC: metric}), ["f0", "f1", "f2"], metric)
        assert result.effects.set_index("term").loc["f0", "verdict"] == verdict


def test_failed_cells_make_terms_inestimable_and_they_are_named(tmp_path):
    table = noise_free(make_design(3).cells, 3)
    table[METRIC] += np.random.default_rng(0).normal(0, SD, len(table))
    table.loc[table.f2 == 1, METRIC] = np.nan  # every cell with B's value of f2 failed
    result = from_table(table, METRIC, tmp_path)
    verdicts = result.effects.set_index("term").verdict
    assert verdicts[["f2", "f0 x f2", "f1 x f2"]].eq("inestimable").all()
    assert verdicts[["f0", "f1"]].ne("inestimable").all()
    assert "f2 could not be estimated" in headline(result)
    report = (tmp_path / "report.md").read_text()
    assert "- inestimable: f2, f0 x f2, f1 x f2" in report and "Failed runs (12)" in report


def test_fractional_aliases_are_reported():
    table = noise_free(make_design(6).cells, 6, seeds=2)
    effects = analyze(table, [f"f{i}" for i in range(6)], METRIC).effects.set_index("term")
    assert effects.loc["f0 x f1", "verdict"] == "aliased"  # AB = CE
    assert effects.loc["f0 x f1", "aliased_with"] == "f2 x f4"
    assert effects.loc["f0 x f4", "aliased_with"] == "f1 x f2, f3 x f5"  # AE = BC = DF
    assert effects.loc["f0 x f1", ["effect", "p_holm"]].isna().all()


def test_fractional_report_names_the_alias_chains(tmp_path):
    table = noise_free(make_design(6).cells, 6, seeds=2)
    table[METRIC] += np.random.default_rng(2).normal(0, SD, len(table))
    from_table(table, METRIC, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert (
        "aliased (the data hold only their sum or difference): f0 x f4 = f1 x f2 = f3 x f5"
        in report
    )
    assert report.count("- aliased") == 7  # the seven chains of the 2^(6-2) IV


def test_path_analysis_orders_the_changes_with_holm_verdicts(tmp_path):
    rng, factors = np.random.default_rng(4), ["f0", "f1", "f2", "f3"]
    main = np.array([-3 * SD, 0.0, -8 * SD, 0.0])
    table = pd.DataFrame(columns=[*factors, "seed", METRIC])
    while cells := path_next(table, factors, METRIC):
        new = runs_table(cells, 3, factors)
        new[METRIC] = planted(new, factors, main, {}, 1, rng)[:, 0]
        table = pd.concat([table, new], ignore_index=True) if len(table) else new
    result = path_analysis(table, factors, METRIC)
    effects = result.effects
    assert effects.term.tolist()[:2] == ["f2", "f0"] and effects.step.tolist() == [1, 2, 3, 4]
    assert effects.verdict.tolist()[:2] == ["hurt", "hurt"]
    assert effects.effect.sum() == pytest.approx(
        table.groupby(factors)[METRIC].mean().iloc[-1]
        - table.groupby(factors)[METRIC].mean().iloc[0]
    )
    write_report(result, tmp_path, title="ablation path")
    assert headline(result).startswith("f2 hurt val/dice_best by 0.0")
    assert (tmp_path / "effects.png").exists()


def test_no_replicates_gives_no_verdicts():
    result = analyze(noise_free(make_design(3).cells, 3, seeds=1), ["f0", "f1", "f2"], METRIC)
    assert (result.effects.verdict == "no replicates").all()
    assert result.effects.ci_low.isna().all() and "no replicates" in headline(result)
    table = noise_free(make_design(2).cells, 2)
    table[METRIC] = 0.8 + np.random.default_rng(1).normal(0, SD, len(table))
    assert headline(analyze(table, ["f0", "f1"], METRIC)).startswith(
        "No change moved val/dice_best beyond seed noise: all 2 changes are within noise (seed SD"
    )


def test_from_table_round_trip_and_headline(tmp_path):
    rng = np.random.default_rng(3)
    names = ["optimizer.lr", "loss.name", "dataset.batch_size"]
    table = runs_table(make_design(3).cells, 2, names)
    table[METRIC] = 0.8 - 0.04 * table["optimizer.lr"] + rng.normal(0, 0.003, len(table))
    table["run_id"], table["minutes"] = [f"r{i}" for i in range(len(table))], 3.5
    table[METRIC] = table[METRIC].round(6).astype(str)
    table.loc[5, METRIC] = ""  # a failed run: empty in the CSV
    table.to_csv(tmp_path / "runs.csv", index=False)
    result = from_table(tmp_path / "runs.csv", METRIC, tmp_path / "out")
    effects = pd.read_csv(tmp_path / "out" / "effects.csv")
    assert {"term", "effect", "ci_low", "ci_high", "p_holm", "verdict"} <= set(effects.columns)
    assert effects.term.tolist()[:4] == [*names, "optimizer.lr x loss.name"]
    assert (tmp_path / "out" / "effects.png").stat().st_size > 1000
    assert result.runs == 15 and len(result.failed) == 1
    text = headline(result, {"optimizer.lr": "optimizer.lr 3e-4 -> 1e-3"}, trainings=12, minutes=38)
    assert text.startswith("optimizer.lr 3e-4 -> 1e-3 hurt val/dice_best by 0.03")
    assert "Holm p < 0.001); the other 2 changes are within noise (seed SD 0.00" in text
    assert text.endswith("12 trainings, 38 min.")
    assert (tmp_path / "out" / "report.md").read_text().splitlines()[2] == headline(result)


def test_seeds_decision_settles_clear_terms_and_keeps_unclear_ones_open():
    rng = np.random.default_rng(5)
    factors = ["f0", "f1", "f2"]
    table = runs_table(make_design(3).cells, 2, factors)
    table[METRIC] = planted(table, factors, [-5 * SD, 0.3 * SD, 0.0], {}, 1, rng)[:, 0]
    decision = seeds_decision(table, factors, METRIC, max_rounds=4)  # 2 seeds: the first look
    assert decision["settled"]["f0"] == "hurt" and decision["alpha"] == look_levels(4)[0]
    assert not decision["stop"] and "f1" in decision["open"]
    many = runs_table(make_design(3).cells, 30, factors)
    many[METRIC] = planted(many, factors, [-5 * SD, 0.0, 0.0], {}, 1, rng)[:, 0]
    decision = seeds_decision(many, factors, METRIC, max_rounds=4, margin=SD, round_index=3)
    assert decision["settled"]["f1"] == decision["settled"]["f2"] == f"within +-{SD:.3g}"
    assert decision["alpha"] == look_levels(4)[3]
    assert seeds_decision(many, factors, METRIC, 4, margin=2 * SD, round_index=3)["stop"]


def path_correct(k: int, seeds: int, reps: int, rng) -> tuple[float, float]:
    """Shares of ablation paths calling f0 (2 SD harm) hurt, and also every other step noise."""
    factors, main = [f"f{i}" for i in range(k)], np.array([-2 * SD] + [0.0] * (k - 1))
    right, power = 0, 0
    for _ in range(reps):
        table = pd.DataFrame(columns=[*factors, "seed", METRIC])
        while cells := path_next(table, factors, METRIC):
            new = runs_table(cells, seeds, factors)
            new[METRIC] = planted(new, factors, main, {}, 1, rng)[:, 0]
            table = pd.concat([table, new], ignore_index=True) if len(table) else new
        verdicts = path_analysis(table, factors, METRIC).effects.set_index("term").verdict
        power += verdicts.f0 == "hurt"
        right += verdicts.f0 == "hurt" and (verdicts.drop("f0") == "within noise").all()
    return power / reps, right / reps


def design_figures(reps: int = 1000, seed_counts=(2, 3, 4)) -> pd.DataFrame:
    """Trainings and shares of right verdicts per design: one change of -2 SD, the rest zero."""
    rows, rng = [], np.random.default_rng(11)
    for k, seeds in itertools.product((3, 6), seed_counts):
        main = [-2 * SD] + [0.0] * (k - 1)
        kinds = ["full", "fractional", "oat"] if k > 4 else ["full", "oat"]
        for kind in kinds:
            cells = make_design(k, kind).cells
            records, _, all_right = simulate(cells, main, seeds=seeds, reps=reps, rng_seed=k)
            mains_right = np.all([records[f"f{i}"]["right"] for i in range(k)], axis=0)
            power = records["f0"]["right"].mean()
            rows.append(
                (k, kind, seeds, seeds * len(cells), power, mains_right.mean(), all_right.mean())
            )
        power, right = path_correct(k, seeds, reps // 4, rng)
        rows.append((k, "path", seeds, seeds * (1 + k * (k + 1) // 2), power, right, right))
    columns = ["k", "design", "seeds", "trainings", "f0 hurt", "mains right", "all right"]
    return pd.DataFrame(rows, columns=columns).sort_values(["k", "design", "seeds"])


if __name__ == "__main__":
    print(design_figures().to_string(index=False))

"""`segexp blame RUN_A RUN_B`: which of the changed hyperparameters moved the metric, and by how much.

The configs of A and B are diffed; each changed key is a two-level factor (A's value, B's value).
A designed experiment (full 2^k factorial for k <= 4, else one-at-a-time from both ends) is run
with seed replicates; main effects (mean at B's level minus mean at A's level), two-way
interactions and 95% confidence intervals come from the pooled seed-to-seed variance.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from segexp import compare, tracking

LOWER_IS_BETTER = ("loss", "hd95", "mae", "error")


def factors_between(config_a: dict, config_b: dict) -> dict[str, tuple[str, str]]:
    """Changed leaves: key -> (A's value, B's value), as strings, bookkeeping ignored."""
    flat_a, flat_b = tracking.flatten(config_a), tracking.flatten(config_b)
    keys = sorted(k for k in set(flat_a) | set(flat_b) if not tracking.is_bookkeeping(k))
    return {
        k: (flat_a.get(k, "<absent>"), flat_b.get(k, "<absent>"))
        for k in keys
        if flat_a.get(k) != flat_b.get(k)
    }


@dataclass
class Design:
    name: str
    cells: list[tuple[int, ...]]  # one 0/1 level per factor (0 = A's value, 1 = B's)
    note: str


def make_design(k: int, design: str = "auto") -> Design:
    if design == "auto":
        design = "factorial" if k <= 4 else "oat"
    if design == "factorial":
        return Design(
            f"full factorial 2^{k}", list(itertools.product((0, 1), repeat=k)), "no aliasing"
        )
    if design == "oat":
        cells = {(0,) * k, (1,) * k}
        for j in range(k):
            cells.add(tuple(int(i == j) for i in range(k)))  # A plus one change
            cells.add(tuple(int(i != j) for i in range(k)))  # B minus one change
        note = "one-at-a-time from both ends: main effects only, interactions not estimable"
        return Design(f"one-at-a-time ({len(cells)} cells)", sorted(cells), note)
    raise ValueError(f"--design must be auto, factorial or oat, got {design!r}")


def parse_value(text: str):
    """A flattened value string back to its value (numbers, lists, None, booleans, strings)."""
    if text in ("<absent>", "None"):
        return None
    for number in (int, float):  # before YAML, which reads `1e-06` as a string
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def cell_config(
    base: dict,
    factors: dict[str, tuple[str, str]],
    levels: tuple[int, ...],
    seed: int,
    overrides: list[str],
) -> DictConfig:
    cfg = OmegaConf.create(base)
    for (key, values), level in zip(factors.items(), levels, strict=True):
        OmegaConf.update(cfg, key, parse_value(values[level]), force_add=True)
    cfg.seed = seed
    cfg.resume = None
    cfg.run_name = None
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def pooled_variance(
    data: pd.DataFrame, factors: list[str], metric: str
) -> tuple[float, int, float]:
    """Within-cell (seed-to-seed) variance pooled over cells, its dof, and t(0.975, dof); NaN without replicates."""
    cells = data.groupby(factors)[metric]
    dof = int(len(data) - cells.ngroups)
    if dof <= 0:
        return float("nan"), dof, float("nan")
    s2 = float(((data[metric] - cells.transform("mean")) ** 2).sum() / dof)
    return s2, dof, float(stats.t.ppf(0.975, dof))


def effects_table(
    results: pd.DataFrame, factors: list[str], metric: str, interactions: bool = True
) -> tuple[pd.DataFrame, dict]:
    """Main effects (and two-way interactions) with 95% CIs from the pooled seed-to-seed variance.

    `results` has one row per run: a 0/1 column per factor and the metric column. An effect is
    mean(metric | level B) - mean(metric | level A); its CI is t * sqrt(s2 (1/n_B + 1/n_A)), s2 the
    pooled within-cell variance. Verdict: `hurt`/`helped` when the CI excludes 0, else `within noise`.
    """
    data = results.dropna(subset=[metric])
    s2, dof, t = pooled_variance(data, factors, metric)
    sign = -1.0 if any(word in metric for word in LOWER_IS_BETTER) else 1.0
    contrasts = {f: data[f].to_numpy() for f in factors}
    if interactions and len(factors) > 1:
        for f, g in itertools.combinations(factors, 2):
            contrasts[f"{f} x {g}"] = (data[f].to_numpy() == data[g].to_numpy()).astype(int)
    rows = []
    for name, level in contrasts.items():
        at_b, at_a = data[metric][level == 1], data[metric][level == 0]
        effect = float(at_b.mean() - at_a.mean())
        half = t * math.sqrt(s2 * (1 / len(at_b) + 1 / len(at_a))) if dof > 0 else float("nan")
        if math.isnan(half):
            verdict = "no replicates"
        elif abs(effect) <= half:
            verdict = "within noise"
        else:
            verdict = "helped" if sign * effect > 0 else "hurt"
        rows.append(
            {
                "term": name,
                "effect": effect,
                "ci_low": effect - half,
                "ci_high": effect + half,
                "n_a": len(at_a),
                "n_b": len(at_b),
                "verdict": verdict,
            }
        )
    noise = {"seed_sd": math.sqrt(s2) if dof > 0 else float("nan"), "dof": dof, "runs": len(data)}
    return pd.DataFrame(rows), noise


def paired_case_tests(
    results: pd.DataFrame, factors: list[str], per_case: dict[str, pd.DataFrame]
) -> dict[str, float]:
    """Per factor: Wilcoxon signed-rank p over cases of per-case Dice, A-level vs B-level runs."""
    p_values = {}
    for factor in factors:
        means = []
        for level in (0, 1):
            tables = [
                per_case[r] for r in results.run_id[results[factor] == level] if r in per_case
            ]
            if not tables:
                break
            means.append(pd.concat(tables).groupby("case_id").dice.mean())
        if len(means) == 2:
            a, b = means[0].align(means[1], join="inner")
            differ = (a - b).abs() > 1e-12
            p_values[factor] = (
                float(stats.wilcoxon(a[differ], b[differ]).pvalue)
                if differ.sum() >= 5
                else float("nan")
            )
    return p_values


def plot_effects(effects: pd.DataFrame, metric: str, path: Path) -> Path:
    from segexp.report import _figure, _save

    fig, ax = _figure(figsize=(8, 1 + 0.5 * len(effects)))
    y = np.arange(len(effects))[::-1]
    colors = effects.verdict.map({"hurt": "tab:red", "helped": "tab:green"}).fillna("tab:gray")
    ax.barh(y, effects.effect, color=colors)
    ax.errorbar(
        effects.effect,
        y,
        xerr=[effects.effect - effects.ci_low, effects.ci_high - effects.effect],
        fmt="none",
        ecolor="black",
        capsize=3,
    )
    ax.axvline(0, color="black", lw=0.8)
    ax.set(
        yticks=y, yticklabels=effects.term, xlabel=f"effect on {metric} (B level - A level), 95% CI"
    )
    return _save(fig, path)


def blame(
    client,
    artifact_root: str,
    run_a: str,
    run_b: str,
    metric: str = "val/dice_best",
    seeds: int = 3,
    design: str = "auto",
    overrides: list[str] | None = None,
    dry_run: bool = False,
    out_dir: Path | None = None,
) -> dict:
    """Run the designed experiment between two runs and analyse it; returns the report pieces."""
    from segexp.train import train

    overrides = list(overrides or [])
    with tempfile.TemporaryDirectory() as tmp:
        config_a = OmegaConf.to_container(
            OmegaConf.load(client.download_artifacts(run_a, "config.yaml", f"{tmp}/a"))
        )
        config_b = OmegaConf.to_container(
            OmegaConf.load(client.download_artifacts(run_b, "config.yaml", f"{tmp}/b"))
        )
    factors = factors_between(config_a, config_b)
    names = list(factors)
    if not names:
        raise ValueError(f"runs {run_a} and {run_b} trained the same config: nothing to blame")
    plan = make_design(len(names), design)
    seed_list = [int(config_a["seed"]) + i for i in range(seeds)]
    lines = [
        f"factors ({len(names)}): "
        + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in factors.items()),
        f"design: {plan.name}; {plan.note}",
        f"seeds: {seed_list}; trainings at most: {len(plan.cells) * seeds}",
    ]
    print("\n".join(lines))
    if dry_run:
        return {"factors": factors, "design": plan, "seeds": seed_list}

    experiment = config_a["tracking"]["experiment"]
    existing = {}
    for run in client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], "attributes.status = 'FINISHED'"
    ):
        key = (run.data.tags.get("segexp.config_hash"), run.data.params.get("seed"))
        existing.setdefault(key, run.info.run_id)

    parent = tracking.TrackedRun(
        client, experiment, artifact_root, f"blame {run_a[:8]}->{run_b[:8]}"
    )
    start = time.time()
    rows, trained = [], 0
    with parent:
        parent.set_tags({"segexp.blame": f"{run_a}->{run_b}", "segexp.design": plan.name})
        for levels in plan.cells:
            for seed in seed_list:
                cfg = cell_config(config_a, factors, levels, seed, overrides)
                cfg.tracking.parent_run_id = parent.run_id
                key = (tracking.config_hash(OmegaConf.to_container(cfg, resolve=True)), str(seed))
                run_id = existing.get(key)  # reuse: A and B themselves count
                if run_id is None:
                    trained += 1
                    try:
                        run_id = train(
                            cfg,
                            [f"{k}={factors[k][lv]}" for k, lv in zip(names, levels, strict=True)]
                            + [f"seed={seed}"],
                        )["run_id"]
                    except Exception as err:  # a failed cell is recorded FAILED and left out
                        print(f"cell {levels} seed {seed} failed: {err}")
                value = client.get_run(run_id).data.metrics.get(metric) if run_id else None
                rows.append(
                    {
                        **dict(zip(names, levels, strict=True)),
                        "seed": seed,
                        "run_id": run_id,
                        metric: value,
                    }
                )
        results = pd.DataFrame(rows)
        effects, noise = effects_table(
            results, names, metric, interactions=plan.name.startswith("full")
        )
        per_case = {}
        for run_id in results.run_id.dropna():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    per_case[run_id] = pd.read_csv(
                        client.download_artifacts(run_id, "evaluation/val_cases.csv", tmp)
                    )
                except Exception:  # runs from before per-case CSVs: no paired test for them
                    continue
        p_values = paired_case_tests(results, names, per_case)
        effects["paired_p"] = effects.term.map(p_values)
        seconds = time.time() - start
        out_dir = Path(out_dir or tempfile.mkdtemp(prefix="segexp-blame-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        table = effects.to_string(index=False, float_format=lambda v: f"{v:+.4f}")
        summary = f"runs analysed: {noise['runs']}, trained now: {trained}, seed-to-seed SD of {metric}: {noise['seed_sd']:.4f} (dof {noise['dof']}), wall time {seconds:.0f} s"
        print(f"\n{table}\n\n{summary}")
        effects.to_csv(out_dir / "effects.csv", index=False)
        results.to_csv(out_dir / "runs.csv", index=False)
        plot_effects(effects, metric, out_dir / "effects.png")
        report = [
            "# blame " + f"{run_a} -> {run_b}",
            "",
            *[f"- {line}" for line in lines],
            f"- {summary}",
            "",
            "```",
            table,
            "```",
            "",
        ]
        (out_dir / "report.md").write_text("\n".join(report))
        for name in ("effects.csv", "runs.csv", "effects.png", "report.md"):
            parent.log_artifact(out_dir / name)
        parent.log_metrics({"blame/trainings": trained, "blame/seed_sd": noise["seed_sd"]}, step=0)
    return {
        "effects": effects,
        "results": results,
        "noise": noise,
        "trained": trained,
        "seconds": seconds,
        "parent_run_id": parent.run_id,
    }


def marginal_means(results: pd.DataFrame, factors: list[str], metric: str) -> pd.DataFrame:
    """Mean metric per level of each factor, with 95% CIs from the pooled within-config variance."""
    data = results.dropna(subset=[metric])
    s2, dof, t = pooled_variance(data, factors, metric)
    rows = []
    for factor in factors:
        for level, values in data.groupby(factor)[metric]:
            half = t * math.sqrt(s2 / len(values)) if dof > 0 else float("nan")
            rows.append(
                {
                    "factor": factor,
                    "level": level,
                    "mean": values.mean(),
                    "ci_low": values.mean() - half,
                    "ci_high": values.mean() + half,
                    "runs": len(values),
                }
            )
    return pd.DataFrame(rows)


def sweep_effects(client, parent_run_id: str, metric: str = "val/dice_best") -> pd.DataFrame:
    """`segexp effects`: marginal means per level of every param that varies across a parent's
    FINISHED child runs (a sweep or a blame), seeds as replicates; trains nothing."""
    kids = compare.children(client, client.get_run(parent_run_id))
    finished = [c for c in kids if c.info.status == "FINISHED"]
    if not finished:
        raise ValueError(f"run {parent_run_id} has no FINISHED child runs")
    params = pd.DataFrame([{**c.data.params, metric: c.data.metrics.get(metric)} for c in finished])
    varying = compare.differing_params(finished)
    if not varying:
        raise ValueError(f"the child runs of {parent_run_id} do not differ in any param")
    table = marginal_means(params, varying, metric)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table

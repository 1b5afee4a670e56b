"""`segexp blame RUN_A RUN_B`: which of the changes between two runs moved the metric, by how much.

The factors come from `segexp.factors` (a group switch is one factor), the cells from
`segexp.designs` (full 2^k for k <= 4, a resolution IV+ fraction for 5-8, or the ablation path),
the effects from `segexp.analysis` (OLS on the coded factors, Holm-adjusted verdicts). Cells train
as jobs of one Hydra multirun through the launcher the user chose (`hydra/launcher=joblib`, a
SLURM launcher), as child runs of the blame's parent run; FINISHED runs of the same config and seed
(A and B among them) are reused, so a re-run after Ctrl-C picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from scipy import stats

from segexp import compare, config, sweep, tracking
from segexp.config import ConfigError
from segexp.evaluation import lower_is_better

from . import analysis, designs, factors

LAUNCHER_KEYS = ("hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper")


def stored_config(client: MlflowClient, run_id: str) -> dict:
    """A run's logged config.yaml, refused when it names a target segexp may not build."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except Exception as err:
            raise ConfigError(f"run {run_id} has no readable config.yaml ({err})") from err
        return config.read_stored(path, run_id)


def finished_runs(client: MlflowClient, experiment_id: str) -> dict[tuple[str, str], str]:
    """(config hash, seed) -> run id of the latest FINISHED run, for reuse."""
    found = {}
    for run in client.search_runs(
        [experiment_id],
        "attributes.status = 'FINISHED'",
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    ):
        found[(run.data.tags.get("segexp.config_hash"), run.data.params.get("seed"))] = (
            run.info.run_id
        )
    return found


def launch(rows: list[dict], parent_run_id: str, launcher: list[str], work_dir: Path):
    """Train `rows` as the jobs of one `segexp train -m` through the chosen Hydra launcher."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, dir=work_dir) as handle:
        json.dump([{"name": r["name"], "overrides": r["overrides"]} for r in rows], handle)
    command = [
        sys.executable, "-m", "segexp.cli", "train", "-m", *launcher,
        f"work_dir={work_dir}", f"+blame.cells={handle.name}",
        "+blame.cell=" + ",".join(str(i) for i in range(len(rows))),
    ]  # fmt: skip
    env = {**os.environ, sweep.PARENT_ENV: parent_run_id}
    return subprocess.Popen(command, env=env), Path(handle.name)


def train_cells(
    client,
    rows: list[dict],
    parent,
    launcher: list[str],
    work_dir: Path,
    start: float,
    total: int,
    done_before: int,
) -> None:
    """Run the jobs and print a progress line per finished cell with the ETA."""
    if not rows:
        return
    proc, cells_file = launch(rows, parent.run_id, launcher, work_dir)
    seen: set[str] = set()
    by_name = {r["name"]: r for r in rows}
    try:
        while True:
            finished = proc.poll() is not None
            for run in compare.children(client, client.get_run(parent.run_id)):
                row = by_name.get(run.info.run_name)
                if row is None or run.info.status == "RUNNING" or run.info.run_id in seen:
                    continue
                seen.add(run.info.run_id)
                row["run_id"] = run.info.run_id
                done = done_before + len(seen)
                eta = (time.time() - start) / max(len(seen), 1) * (total - done)
                value = run.data.metrics.get("val/dice_best")
                result = f"val/dice_best {value:.3f}" if value is not None else run.info.status
                print(
                    f"cell {done}/{total} done ({row['name']}): {result}, ETA {eta / 60:.0f} min",
                    flush=True,
                )
            if finished:
                break
            time.sleep(2)
    finally:
        if proc.poll() is None:  # interrupted here: the jobs end too, their runs KILLED
            proc.terminate()
            proc.wait(timeout=120)
        cells_file.unlink(missing_ok=True)
    if proc.returncode not in (0, 1):  # 1: some job FAILED, which the analysis lists
        raise SystemExit(proc.returncode)


def blame(
    client: MlflowClient,
    artifact_root: str,
    run_a: str,
    run_b: str,
    metric: str = "val/dice_best",
    seeds: int | str = 3,
    design: str = "auto",
    overrides: list[str] | None = None,
    dry_run: bool = False,
    out_dir: Path | None = None,
    budget: int | None = None,
    work_dir: Path | None = None,
) -> dict:
    """Design, train (or reuse) and analyse the cells between A and B; returns the report pieces."""
    overrides = list(overrides or [])
    launcher = [o for o in overrides if o.startswith(LAUNCHER_KEYS)]
    extra = [o for o in overrides if o not in launcher]
    runs = {r: client.get_run(r) for r in (run_a, run_b)}
    config_a, config_b = stored_config(client, run_a), stored_config(client, run_b)
    change = factors.between(runs[run_a], runs[run_b], config_a, config_b)
    if not change.factors:
        raise ConfigError(f"runs {run_a} and {run_b} trained the same config: nothing to blame")
    names = [f.name for f in change.factors]
    plan = designs.make_design(len(names), "full" if design == "factorial" else design)
    path = plan.name.startswith("ablation")
    auto = seeds == "auto"
    first_seed, per_cell = int(config_a["seed"]), 2 if auto else int(seeds)
    rounds = designs.seed_rounds(budget, len(plan.cells)) if auto and budget else 4 if auto else 1
    # where every cell logs: A's store (bookkeeping keys, so config hashes are unaffected)
    work_dir = Path(work_dir or config_a["work_dir"]).resolve()
    extra = [f"work_dir={work_dir}", *extra]
    if client.tracking_uri != tracking.store_locations({}, work_dir)[0]:
        extra.insert(1, f"tracking.uri='{client.tracking_uri}'")
    cells = factors.Cells(change, extra)
    for levels in plan.cells:
        for seed in range(first_seed, first_seed + per_cell):
            cells.add(levels, seed)
    planned = len(cells.rows) + (per_cell * (len(names) * (len(names) + 1) // 2 - 1) if path else 0)
    lines = [
        f"factors ({len(names)}): " + ", ".join(f.label() for f in change.factors),
        f"design: {plan.name}; {plan.note}",
        f"seeds: {'auto: 2 per cell, then one more per round, at most ' + str(rounds) + ' rounds' if auto else list(range(first_seed, first_seed + per_cell))};"
        f" trainings at most: {planned if not auto else planned + (rounds - 1) * len(plan.cells)}"
        " (runs of the same config and seed already FINISHED, A and B among them, are reused)",
    ]
    if change.stored is not None:
        lines.append(
            "runs carry no recorded config-group choices: cells merge into A's stored config "
            "and train one after another in this process"
        )
    lines += [f"cannot compose cell {lv}: {why}" for lv, why in cells.impossible.items()]
    print("\n".join(lines), flush=True)
    if dry_run:
        return {"factors": change.factors, "design": plan, "impossible": cells.impossible}

    experiment = config_a["tracking"]["experiment"]
    reusable = finished_runs(client, tracking.experiment_id(client, experiment, artifact_root))
    start, trained, decision = time.time(), 0, None
    name = f"blame {runs[run_a].info.run_name} -> {runs[run_b].info.run_name}"[:250]
    parent = tracking.TrackedRun(client, experiment, artifact_root, name)
    with parent:
        parent.set_tags(
            {
                "segexp.role": "blame",
                "segexp.blame": f"{run_a}->{run_b}",
                "segexp.design": plan.name,
            }
        )
        for round_index in range(rounds * (len(names) + 1 if path else 1)):
            todo = []
            for row in cells.rows.values():
                if row["run_id"] is None:
                    row["run_id"] = reusable.get((row["hash"], str(row["seed"])))
                    todo += [] if row["run_id"] else [row]
            if budget is not None:
                todo = todo[: max(budget - trained, 0)]
            done_before = len(cells.rows) - len(todo)
            if change.stored is None:
                train_cells(
                    client, todo, parent, launcher, work_dir, start, len(cells.rows), done_before
                )
            else:
                train_in_process(todo, parent.run_id)
            trained += len(todo)
            table = cells.table(names, client, metric)
            if path:
                more = designs.path_next(table, names, metric, lower_is_better(metric))
                for levels in more:
                    for seed in range(first_seed, first_seed + per_cell):
                        cells.add(levels, seed)
                if more and not (budget is not None and trained >= budget):
                    continue
                break
            if not auto:
                break
            decision = analysis.seeds_decision(table, names, metric, max_rounds=rounds)
            out_of_budget = budget is not None and trained >= budget
            if decision["stop"] or round_index == rounds - 1 or out_of_budget:
                break
            next_seed = first_seed + per_cell + round_index
            for levels in {row["levels"] for row in cells.rows.values()}:
                cells.add(levels, next_seed)
        table = cells.table(names, client, metric)
        minutes = (time.time() - start) / 60
        if path:
            result = analysis.path_analysis(table, names, metric)
        elif decision is not None:  # tested at the level the stopping rule spent
            result = analysis.analyze(table, names, metric, alpha=decision["alpha"])
        else:
            result = analysis.analyze(table, names, metric)
        context = [*lines, f"trainings: {trained} now, {len(table)} runs analysed"]
        if decision is not None and decision["open"]:
            context.append(
                f"verdicts still open (more seeds or --budget): {', '.join(decision['open'])}"
            )
        for row in cells.rows.values():
            if reason := failure(client, row["run_id"]):
                context.append(f"failed cell {row['name']}: {reason}")
        out_dir = Path(out_dir or tempfile.mkdtemp(prefix="segexp-blame-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_dir / "runs.csv", index=False)
        labels = {f.name: f.label().split(": ", 1)[1] for f in change.factors}
        report = analysis.write_report(
            result, out_dir, title=f"blame {run_a} -> {run_b}", factor_labels=labels,
            trainings=trained, minutes=minutes, context=context,
            paired=paired_case_tests(client, table, names),
        )  # fmt: skip
        print("\n" + Path(report).read_text())
        for artifact in ("effects.csv", "runs.csv", "effects.png", "report.md"):
            if (out_dir / artifact).is_file():
                parent.log_artifact(out_dir / artifact)
        parent.log_metrics({"blame/trainings": trained, "blame/seed_sd": result.seed_sd}, step=0)
    return {
        "analysis": result, "effects": result.effects, "results": table, "trained": trained,
        "minutes": minutes, "parent_run_id": parent.run_id, "factors": change.factors,
        "out_dir": out_dir,
    }  # fmt: skip


def failure(client: MlflowClient, run_id: str | None) -> str | None:
    """Why a cell has no result (its run's failure reason, or that no run was made); None if it has."""
    if not run_id:
        return "no run (not trained: budget, or the job failed before its run existed)"
    run = client.get_run(run_id)  # one fetch for the status and the reason
    if run.info.status == "FINISHED":
        return None
    return (
        run.data.tags.get("failure_reason") or run.data.tags.get("stop_reason") or run.info.status
    )


def train_in_process(rows: list[dict], parent_run_id: str) -> None:
    """Fallback for runs without recorded choices: train the merged configs one by one."""
    from segexp.train import train

    for row in rows:
        cfg = row["cfg"]
        cfg.tracking.parent_run_id = parent_run_id
        cfg.run_name = row["name"]
        try:
            row["run_id"] = train(cfg, row["overrides"])["run_id"]
        except Exception as err:  # a failed cell is listed in the report, never dropped silently
            print(f"cell {row['name']} failed: {err}")


def paired_case_tests(
    client: MlflowClient, table: pd.DataFrame, names: list[str]
) -> pd.DataFrame | None:
    """Per factor: Wilcoxon signed-rank p over cases of per-case Dice, A-level vs B-level runs."""
    per_case = {}
    for run_id in table.run_id.dropna():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                per_case[run_id] = pd.read_csv(
                    client.download_artifacts(run_id, "evaluation/val_cases.csv", tmp)
                )
            except Exception:  # a run without per-case CSVs: no paired test for it
                continue
    rows = []
    for factor in names:
        means = []
        for level in (0, 1):
            tables = [per_case[r] for r in table.run_id[table[factor] == level] if r in per_case]
            if not tables:
                break
            means.append(pd.concat(tables).groupby("case_id").dice.mean())
        if len(means) == 2:
            a, b = means[0].align(means[1], join="inner")
            differ = (a - b).abs() > 1e-12
            p = (
                float(stats.wilcoxon(a[differ], b[differ]).pvalue)
                if differ.sum() >= 5
                else float("nan")
            )
            rows.append(
                {
                    "factor": factor,
                    "cases": len(a),
                    "mean_dice_a": a.mean(),
                    "mean_dice_b": b.mean(),
                    "wilcoxon_p": p,
                }
            )
    return pd.DataFrame(rows) if rows else None

"""`segexp blame RUN_A RUN_B`: which of the changes between two runs moved the metric, by how much.

Three steps: the plan (`plan.py`: factors from the two runs, a group switch one factor; the design,
full 2^k for k <= 4, a resolution IV+ fraction for 5-8, or the ablation path), the training
(`training.py`), the analysis (`analysis.py`: least squares on the coded factors, Holm verdicts). Cells train
as jobs of one Hydra multirun through the launcher the user chose (`hydra/launcher=joblib`, a
SLURM launcher), as child runs of the blame's parent run; FINISHED runs of the same config and seed
(A and B among them) are reused, so a re-run after Ctrl-C picks up where it stopped.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from segexp import tracking
from segexp.compare.fidelity import ab_gap
from segexp.config import ConfigError
from segexp.evaluation import lower_is_better
from segexp.tracking import tags

from . import ablation, analysis, designs, evidence, screening
from .analysis import Analysis
from .plan import Plan, compute_line, cost, make_plan
from .report import note, write_csv, write_report
from .screening import ScreenResult
from .training import failure, reuse, train_cells, train_in_process

FIDELITIES = ("auto", "full", "screen")
OUTPUTS = (
    "effects.csv", "runs.csv", "effects.png", "report.md", "screen_runs.csv", "screen_effects.csv"
)  # fmt: skip


@dataclass
class BlameResult:
    """A blame's plan and, unless it was a dry run, what it trained and found.

    `plan` gave the verdicts: the whole design at full fidelity, or a screen's confirmation
    (`screen` then holds what the screen trained, found and ruled out).
    """

    plan: Plan
    analysis: Analysis | None = None
    results: pd.DataFrame | None = None  # runs.csv: factor levels, seed, run_id, the metric
    trained_cells: list = field(default_factory=list)  # the cells this blame trained
    minutes: float = 0.0
    parent_run_id: str | None = None
    out_dir: Path | None = None
    screen: ScreenResult | None = None
    full: Plan | None = None  # the whole design at full fidelity: the compute yardstick

    @property
    def trained(self) -> int:
        return len(self.trained_cells) + (len(self.screen.trained) if self.screen else 0)

    @property
    def effects(self) -> pd.DataFrame:
        return self.analysis.effects


def screened_out(plan: Plan, used: Plan, probe: Plan) -> list[str]:
    """The factors the screen ruled out, each with the screen's fidelity and the level held."""
    detail = probe.cells.tags[tags.FIDELITY_DETAIL]
    held = [n for n in plan.names if n not in used.names]
    return [f"{n} (at {detail}; held at {'AB'[used.held]}'s level)" for n in held]


def blame(
    client: MlflowClient,
    artifact_root: str,
    run_a: str,
    run_b: str,
    metric: str | None = None,
    seeds: int | str = 3,
    design: str = "auto",
    overrides: list[str] | None = None,
    dry_run: bool = False,
    out_dir: Path | None = None,
    budget: int | None = None,
    work_dir: Path | None = None,
    nest_epochs: bool = True,
    fidelity: str = "auto",
    screen_options: dict | None = None,
    replicate: str = "seed",
) -> BlameResult:
    """Design, train (or reuse) and analyse the cells between A and B.

    `metric` None: A's `optimized_metric`. `nest_epochs`: read an epochs factor's smaller budget
    from the larger budget's histories where nothing else depends on it (nested.py).
    `fidelity`: `full`, `screen` (screening.py) or `auto` (screen where the full design costs more
    than 4 trainings of A); `screen_options`: the screen's `epochs`, `fraction`, `image_size`.
    """
    overrides = list(overrides or [])
    plan = make_plan(
        client, run_a, run_b, metric, seeds, design, overrides, budget, work_dir, nest_epochs,
        replicate,
    )  # fmt: skip
    probe, lines = choose_screen(client, plan, fidelity, screen_options or {})
    print("\n".join(plan.lines + lines), flush=True)
    if dry_run:
        return BlameResult(plan, full=plan)
    start = time.time()
    name = f"blame {plan.run_names[0]} -> {plan.run_names[1]}"[:250]
    role = {
        tags.ROLE: "blame",
        "segexp.blame": f"{run_a}->{run_b}",
        "segexp.design": plan.design.name,
    }
    parent = tracking.TrackedRun(client, plan.experiment, artifact_root, name, tags=role)
    with parent:
        screened = probe and run_screen(client, plan, parent, probe)
        used = screened.confirm if screened and screened.confirm else plan
        trained, decision = train_rounds(client, used, parent)
        table = used.cells.table(used.names, client, used.metric, used.nesting)
        if used is not plan and not confirmed_whole(client, used, screened, table):
            more, decision = train_rounds(client, plan, parent)  # the confirmation's are reused
            trained, used = trained + more, plan
            table = used.cells.table(used.names, client, used.metric, used.nesting)
        result = BlameResult(
            used, trained_cells=trained, parent_run_id=parent.run_id, screen=screened or None,
            full=plan, results=table,
        )  # fmt: skip
        result.minutes = (time.time() - start) / 60
        cases = evidence.val_cases(client, result.results.run_id.dropna())
        floors = evidence.mask_levels(cases, result.results)
        flat = evidence.stalled(client, result.results)
        result.analysis = analyse(used, result.results, decision, floors, flat)
        if screened and used is not plan:
            result.analysis.screened_out = screened_out(plan, used, probe)
        result.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="segexp-blame-"))
        write_outputs(client, used, result, decision, parent, cases)
    return result


def choose_screen(client: MlflowClient, plan: Plan, fidelity: str, given: dict):
    """(the screen's plan or None for full fidelity, the lines saying which and why)."""
    if fidelity not in FIDELITIES:
        raise ConfigError(f"--fidelity must be one of {', '.join(FIDELITIES)}, got {fidelity!r}")
    if fidelity == "full" or not screening.screenable(plan):
        why = "" if fidelity == "full" else ": no factor a screen can vary"
        return None, [f"fidelity: full{why}"]
    if plan.adaptive:
        return None, ["fidelity: full (the ablation path is walked at full fidelity)"]
    if plan.cells.replicate.crossed:
        return None, ["fidelity: full (folds as replicates: every fold trains at full fidelity)"]
    if fidelity == "auto" and not screening.worth_screening(plan, cost(plan, plan.planned())):
        return None, [
            f"fidelity: full (the design costs at most {screening.AUTO_TRAININGS} trainings of A; "
            "--fidelity screen screens anyway)"
        ]
    a, b = client.get_run(plan.run_a), client.get_run(plan.run_b)
    gaps, final = ab_gap(client, a, b, plan.metric)
    chosen = screening.choose_fidelity(plan, gaps, final, **given)
    probe = screening.sub_plan(
        plan, screening.screenable(plan), screening.screen_seeds(plan), "auto", chosen
    )
    held = [n for n in plan.names if n not in probe.names]
    lines = [
        f"fidelity: screen at {chosen.text()} ({screening.SCREEN_SEEDS} seeds per cell, "
        f"{len(probe.cells.rows)} trainings), then the suspects at full fidelity; only "
        "full-fidelity runs give verdicts"
        + (f"; not screened (the screen sets them): {', '.join(held)}" if held else ""),
    ]
    if gaps:
        shown = ", ".join(f"{e}: {g:+.3f}" for e, g in enumerate(gaps, 1))
        lines.append(f"A-vs-B gap on their own curves after 1, 2, ... epochs: {shown}")
    screen_cost = cost(probe, list(probe.cells.rows.values()))
    lines.append(compute_line(plan, screen_cost, "planned for the screen"))
    return probe, lines


def run_screen(client: MlflowClient, plan: Plan, parent, probe: Plan) -> ScreenResult:
    """Train the screen `probe`, check it against A and B, plan the confirmation of its suspects."""
    detail = probe.cells.tags[tags.FIDELITY_DETAIL]
    print(f"screen: {len(probe.cells.rows)} trainings at {detail}", flush=True)
    trained, _ = train_rounds(client, probe, parent)
    table = probe.cells.table(probe.names, client, plan.metric)
    found = ScreenResult(probe, trained, table)
    decision = screening.decide(
        table, probe.names, plan.metric, screening.full_gap(client, plan), detail
    )
    found.analysis, found.check, found.lines = decision.analysis, decision.check, decision.lines
    if decision.suspects is None:
        found.lines.append("the screen cannot be trusted here: every cell trains at full fidelity")
    else:
        keep = decision.suspects
        confirmed = [i for i, n in enumerate(plan.names) if n in keep or n not in probe.names]
        b_seed = int(client.get_run(plan.run_b).data.params.get("seed", -1))
        found.confirm = screening.confirmation(plan, confirmed, b_seed)
        held = [n for n in plan.names if n not in found.confirm.names]
        run = "AB"[found.confirm.held]
        found.lines.append(
            f"confirmed at full fidelity: {', '.join(found.confirm.names)}"
            + (f"; held at {run}'s levels ({run} is reused): {', '.join(held)}" if held else "")
            + f"; the effects are those at {run}'s levels of the others"
        )
        found.lines += found.confirm.lines
    print("\n".join(found.lines), flush=True)
    return found


def confirmed_whole(client: MlflowClient, confirm: Plan, found: ScreenResult, table) -> bool:
    """B against the confirmation's all-B cell, or A against its all-A cell where the others are
    held at B's levels (`table`: the confirmation's runs): whether the screened-out factors moved
    nothing."""
    level = 1 - confirm.held
    run = client.get_run((confirm.run_a, confirm.run_b)[level])
    value = run.data.metrics.get(confirm.metric)
    seed = int(run.data.params.get("seed", -1))
    try:
        result = analysis.analyze(table, confirm.names, confirm.metric)
    except (ValueError, np.linalg.LinAlgError):
        return True  # no confirmation to check: the report lists its failed cells
    held = screening.held_check(table, result, confirm.names, value, seed, level)
    lines = [held.line] + ([] if held.ok else ["every cell of the design trains at full fidelity"])
    found.lines += lines
    print("\n".join(lines), flush=True)
    return held.ok


def train_rounds(client: MlflowClient, plan: Plan, parent: tracking.TrackedRun):
    """Reuse or train every planned cell, adding path steps or seed rounds.

    Returns (the cells trained, the `--seeds auto` decision or None).
    """
    experiment_id = parent.experiment_id
    progress = tracking.Progress(total=len(plan.cells.rows))
    trained, decision = [], None
    for round_index in range(plan.rounds * (len(plan.names) + 1 if plan.adaptive else 1)):
        cells = list(plan.cells.rows.values())
        todo = plan.nested(reuse(client, experiment_id, cells, plan.fingerprint))
        if plan.budget is not None:
            todo = todo[: max(plan.budget - len(trained), 0)]
        progress.total, progress.done = len(plan.cells.rows), len(plan.cells.rows) - len(todo)
        if plan.change.stored is None:
            train_cells(
                client, todo, parent.run_id, plan.launcher, plan.work_dir, progress, plan.metric
            )
        else:
            train_in_process(todo, parent.run_id)
        trained += todo
        out_of_budget = plan.budget is not None and len(trained) >= plan.budget
        table = plan.cells.table(plan.names, client, plan.metric, plan.nesting)
        if plan.adaptive:
            more = designs.path_next(table, plan.names, plan.metric, lower_is_better(plan.metric))
            plan.add_cells(more)
            if more and not out_of_budget:
                continue
            break
        if not plan.auto:
            break
        decision = analysis.seeds_decision(
            table, plan.names, plan.metric, max_rounds=plan.rounds, round_index=round_index
        )
        if decision["stop"] or round_index == plan.rounds - 1 or out_of_budget:
            break
        plan.add_seed(plan.seeds[-1] + 1 + round_index)
    return trained, decision


def analyse(plan: Plan, table: pd.DataFrame, decision, floors=None, stalled=None) -> Analysis:
    """The path's steps, or the effects (at the level the `--seeds auto` rule spent).

    floors: the metric's values for constant predictions; stalled: per row, the training loss
    never fell (both: the run never learned).
    """
    if plan.adaptive:
        return ablation.path_analysis(table, plan.names, plan.metric, floors=floors)
    alpha = decision["alpha"] if decision is not None else 0.05
    return analysis.analyze(
        table, plan.names, plan.metric, alpha=alpha, floors=floors, stalled=stalled
    )


def write_outputs(client, plan: Plan, result: BlameResult, decision, parent, cases) -> None:
    """report.md, effects.csv, runs.csv and the figure: printed, and logged to the parent run."""
    found = result.screen
    context = [*result.full.lines, *(found.lines if found else [])]
    context.append(f"trainings: {result.trained} now, {len(result.results)} runs analysed")
    if plan.train_images:
        spent = cost(plan, result.trained_cells) + (cost(found.plan, found.trained) if found else 0)
        context.append(compute_line(result.full, spent, "spent"))
    if decision is not None and decision["open"]:
        context.append(
            f"verdicts still open (more seeds or --budget): {', '.join(decision['open'])}"
        )
    for cell in plan.cells.rows.values():
        if reason := failure(client, cell.source.run_id if cell.source else cell.run_id):
            context.append(f"failed cell {cell.name}: {reason}")
    out_dir = result.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(plan.cells.replicate.readable(result.results), out_dir / "runs.csv")
    labels = {f.name: f.label().split(": ", 1)[1] for f in plan.change.factors}
    evidence.explain(client, result.analysis)  # each left-out run's history
    ends = tuple(zip(plan.run_names, (plan.run_a, plan.run_b), strict=True))
    title = "blame " + " -> ".join(f"{name} ({run_id})" for name, run_id in ends)
    report = write_report(
        result.analysis, out_dir, title=title,
        factor_labels=labels, trainings=result.trained, minutes=result.minutes, context=context,
        cases=evidence.case_lines(
            cases, result.results, result.analysis, plan.cells.replicate.word
        ),
    )  # fmt: skip
    # the verdict where MLflow shows it: the parent's description (Overview, runs table)
    verdict = note(result.analysis, labels, ends, result.trained, result.minutes)
    parent.set_tags({"mlflow.note.content": verdict})
    print("\n" + Path(report).read_text())
    if found is not None:
        write_csv(plan.cells.replicate.readable(found.table), out_dir / "screen_runs.csv")
        if found.analysis is not None:
            write_csv(found.analysis.effects, out_dir / "screen_effects.csv")
    for artifact in OUTPUTS:
        if (out_dir / artifact).is_file():
            parent.log_artifact(out_dir / artifact)
    parent.log_metrics(
        {"blame/trainings": result.trained, "blame/seed_sd": result.analysis.seed_sd}, step=0
    )

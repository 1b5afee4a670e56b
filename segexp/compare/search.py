"""`segexp effects PARENT` on a search (a sweep whose configs a sampler proposed, e.g. Optuna's
TPE via `hparams_search=`): each searched parameter's importance over the FINISHED trials, from
Optuna's own evaluators (`optuna.importance`). Grids keep the ANOVA of `importance.py`.

The parent records its search space (tag `SEARCH_SPACE`); the distributions are rebuilt from it by
the sweeper's own parser, the trials' values come from each child's params and config-group choices.
PED-ANOVA runs where the installed optuna has it (3.6+), fANOVA where it runs; when neither does,
Optuna's mean decrease impurity ranks, and the output names the method and why the others did not.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from segexp import tracking
from segexp.evaluation import lower_is_better
from segexp.plots import figure, save

MDI = "MDI"  # the fallback where neither PED-ANOVA nor fANOVA runs
NAMES = {"PED-ANOVA": "PED-ANOVA", "fANOVA": "functional ANOVA", MDI: "mean decrease impurity"}


@dataclass
class SearchImportance:
    """Importance of each searched parameter over a search's FINISHED trials."""

    metric: str
    direction: str  # minimize / maximize: which trials are the best (PED-ANOVA's top quantile)
    trials: int
    method: str  # the evaluator the table is ranked by
    table: pd.DataFrame  # param, one importance column per method that ran, the best trial's value
    evaluators: dict[str, str] = field(default_factory=dict)  # method: optuna class that ran
    unavailable: dict[str, str] = field(default_factory=dict)  # method: why it did not run

    def lines(self) -> list[str]:
        """The printed report: header, ranked table, the methods used and those that were not."""
        header = (
            f"importance over {self.trials} FINISHED trials of the search "
            f"({self.metric}, {self.direction}), ranked by {self.method}:"
        )
        shown = self.table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
        used = [
            f"method: {m} = {NAMES[m]} (optuna.importance.{c})" for m, c in self.evaluators.items()
        ]
        missing = [f"not available: {m}: {why}" for m, why in self.unavailable.items()]
        return [header, shown, *used, *missing]


def is_search(parent: Run) -> bool:
    return tracking.tags.SEARCH_SPACE in parent.data.tags


def distributions(space: list[str]) -> dict:
    """{key: optuna distribution} of `key=distribution` overrides, parsed as the sweeper does."""
    try:  # the sweeper's own parser: the distributions its trials were drawn from
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    except ImportError:
        raise ValueError(
            "this sweep is a search: its importance needs the search extra "
            "(pip install 'segexp[search]')"
        ) from None
    found, _fixed = create_params_from_overrides(space)
    return found


def trial_value(raw: str | None, distribution):
    """A child's param string as the distribution holds it (a choice, an int or a float)."""
    from optuna.distributions import CategoricalDistribution

    if raw is None:
        return None
    if isinstance(distribution, CategoricalDistribution):
        return next((c for c in distribution.choices if str(c) == raw), None)
    number = float(raw)
    return int(number) if isinstance(distribution.low, int) else number


def frozen_trials(runs: list[Run], space: dict, metric: str) -> list:
    """One Optuna trial per run that holds the metric and a value for every searched key."""
    import optuna

    trials = []
    for run in runs:
        value = run.data.metrics.get(metric)
        choices = json.loads(run.data.tags.get(tracking.tags.CHOICES, "{}"))
        params = {}
        for key, distribution in space.items():
            name = key.lstrip("+~")
            raw = choices.get(name, run.data.params.get(name))
            params[key] = trial_value(raw, distribution)
        if value is None or not np.isfinite(value) or None in params.values():
            continue
        try:
            with warnings.catch_warnings():  # "experimental" in optuna 2.x
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                trial = optuna.trial.create_trial(params=params, distributions=space, value=value)
        except ValueError as err:  # a value outside the recorded space
            raise ValueError(f"run {run.info.run_id}: {err}") from None
        trials.append(trial)
    return trials


def evaluators() -> tuple[dict, dict[str, str]]:
    """({method: evaluator} to try, in order of preference; {method: why it is not there})."""
    import optuna
    from optuna import importance

    found, missing = {}, {}
    if hasattr(importance, "PedAnovaImportanceEvaluator"):
        found["PED-ANOVA"] = importance.PedAnovaImportanceEvaluator()
    else:
        missing["PED-ANOVA"] = f"needs optuna >= 3.6, this is optuna {optuna.__version__}{pin()}"
    found["fANOVA"] = importance.FanovaImportanceEvaluator(seed=0)
    return found, missing


def pin() -> str:
    """`(hydra-optuna-sweeper 1.3.0 requires optuna<3.0.0,>=2.10.0)`, or nothing."""
    from importlib import metadata

    try:
        requires = metadata.requires("hydra-optuna-sweeper") or []
        version = metadata.version("hydra-optuna-sweeper")
    except metadata.PackageNotFoundError:
        return ""
    wanted = [r.split(";")[0] for r in requires if r.startswith("optuna")]
    return f" (hydra-optuna-sweeper {version} requires {', '.join(wanted)})" if wanted else ""


def search_importance(trials: list, space: dict, metric: str) -> SearchImportance:
    """Importance of each searched key over `trials` by every evaluator that runs here."""
    import optuna
    from optuna import importance

    if len(trials) < 2:
        raise ValueError(f"{len(trials)} FINISHED trial(s) with {metric}: importance needs 2")
    if len({t.value for t in trials}) < 2:
        raise ValueError(f"{metric} is the same in every trial: there is nothing to rank")
    direction = "minimize" if lower_is_better(metric) else "maximize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(direction=direction)
        study.add_trials(trials)
    tried, unavailable = evaluators()
    scores, used = {}, {}
    for method, evaluator in tried.items():
        try:
            scores[method] = importance.get_param_importances(study, evaluator=evaluator)
        except ValueError as err:  # optuna 2.10's fANOVA with numpy >= 1.24
            unavailable[method] = failure(evaluator, err)
            continue
        used[method] = type(evaluator).__name__
    if not scores:  # the forest-based evaluator that optuna 2.x runs with today's numpy
        evaluator = importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
        scores[MDI] = importance.get_param_importances(study, evaluator=evaluator)
        used[MDI] = type(evaluator).__name__
    method = next(iter(scores))
    best = study.best_trial.params
    table = pd.DataFrame(
        {
            "param": list(space),
            **{m: [float(s.get(k, 0.0)) for k in space] for m, s in scores.items()},
            "best_trial": [best[k] for k in space],
        }
    ).sort_values(method, ascending=False, ignore_index=True)
    return SearchImportance(metric, direction, len(trials), method, table, used, unavailable)


def failure(evaluator, err: Exception) -> str:
    """Why an evaluator did not run, with the versions that made it fail."""
    import optuna

    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    from importlib.metadata import version

    return (
        f"optuna {optuna.__version__}'s {type(evaluator).__name__} failed here "
        f"(scikit-learn {version('scikit-learn')}, numpy {np.__version__}): {first}"
    )


def search_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The search's FINISHED trials: its children and the runs a `sweep.resume` reused."""
    runs = tracking.children(client, parent) + tracking.reused_runs(client, parent)
    unique = {r.info.run_id: r for r in runs if r.info.status == "FINISHED"}
    return list(unique.values())


def plot(result: SearchImportance, trials: list, space: dict, path: Path) -> Path:
    """One panel per parameter, most important first: the metric of each trial against its value."""
    from matplotlib.ticker import NullFormatter

    params = list(result.table.param)
    fig, axes = figure(1, len(params), figsize=(3.2 * len(params), 3.2), squeeze=False)
    scores = result.table.set_index("param")[result.method]
    for ax, param in zip(axes[0], params, strict=True):
        values = [t.params[param] for t in trials]
        metric = [t.value for t in trials]
        distribution = space[param]
        if hasattr(distribution, "choices"):
            labels = [str(c) for c in distribution.choices]
            ax.scatter([labels.index(str(v)) for v in values], metric, alpha=0.8)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=30, ha="right")
        else:
            ax.scatter(values, metric, alpha=0.8)
            if getattr(distribution, "log", "Log" in type(distribution).__name__):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^-3 ... labels overlap
        ax.set(title=f"{param}: {result.method} {scores[param]:.2f}", xlabel=param)
    axes[0][0].set_ylabel(f"{result.metric} per trial")
    return save(fig, path)


def effects(client: MlflowClient, parent_run_id: str, metric: str | None, out: Path):
    """`segexp effects`: a search's importance (SearchImportance), a grid's ANOVA (runs.effects)."""
    from .runs import effects as grid_effects

    parent = client.get_run(parent_run_id)
    if not is_search(parent):
        return grid_effects(client, parent_run_id, metric, out)
    runs = search_runs(client, parent)
    if not runs:
        raise ValueError(f"run {parent_run_id} has no FINISHED child runs")
    metric = metric or tracking.optimized_metric(runs)
    space = distributions(json.loads(parent.data.tags[tracking.tags.SEARCH_SPACE]))
    trials = frozen_trials(runs, space, metric)
    result = search_importance(trials, space, metric)
    print("\n".join(result.lines()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, trials, space, out)
    print(f"\nplot: {out}")
    client.log_artifact(parent_run_id, str(out), "effects")
    return result

"""Searches (`segexp train -m hparams_search=hc18_optuna`): Optuna proposes the configs, the sweep
is one MLflow parent with a child per trial, `segexp effects` ranks them with optuna.importance."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings

import numpy as np
import optuna
import pandas as pd
import pytest
from helpers import run_segexp
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from segexp import cli, config, sweep, tracking
from segexp.compare import search
from segexp.config import ConfigError

SEARCH = "hparams_search=hc18_optuna"
METRIC = "val/hc_mae_mm_best"  # hc18_best's optimized_metric: lower is better
SPACE = [
    "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
    "optimizer.weight_decay=tag(log, interval(1e-5, 1e-1))",
    "dataset.batch_size=choice(8, 16, 32)",
    "loss=choice(bce, dice, bce_dice)",
]


def multirun_config(*overrides: str):
    """conf/train.yaml composed as `segexp train -m ...` composes it, the hydra node kept."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config.CONFIG_DIR), version_base="1.3"):
        return GlobalHydra.instance().hydra.compose_config(
            "train", list(overrides), run_mode=RunMode.MULTIRUN, with_log_configuration=False
        )


def test_a_search_is_read_from_the_sweeper_and_checked_key_by_key():
    found = sweep.search_of(multirun_config(SEARCH, "hydra.sweeper.n_trials=4"))
    assert found.keys == ["optimizer.lr", "optimizer.weight_decay", "dataset.batch_size", "loss"]
    assert (found.trials, found.direction) == (4, "minimize")
    assert found.sampler["_target_"] == "optuna.samplers.TPESampler" and found.sampler["seed"] == 42
    other = sweep.search_of(multirun_config(SEARCH, "hydra.sweeper.n_trials=5"))
    assert found.grid() != other.grid()  # another trial count: another search to resume
    assert sweep.search_of(multirun_config("optimizer.lr=1e-3,3e-4")) is None  # a grid
    lgg = sweep.search_of(multirun_config("hparams_search=lgg_optuna"))
    assert lgg.direction == "maximize" and lgg.keys == found.keys  # val/dice_best: higher
    bad = {
        "hydra.sweeper.direction=maximize": "hydra.sweeper.direction='maximize'",
        "hydra.sweeper.n_trials=0": "hydra.sweeper.n_trials=0",
        "optimizer.lrr=interval(1e-4,1e-2)": "hydra.sweeper.params.optimizer.lrr",
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            sweep.search_of(multirun_config(SEARCH, override))


def planted_trials(n: int, effect, seed: int = 0) -> tuple[list, dict]:
    """`n` trials drawn over SPACE whose metric is `effect(params)` plus a little noise."""
    space = search.distributions(SPACE)
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n):
        params = {
            "optimizer.lr": float(10 ** rng.uniform(-4, -2)),
            "optimizer.weight_decay": float(10 ** rng.uniform(-5, -1)),
            "dataset.batch_size": int(rng.choice([8, 16, 32])),
            "loss": str(rng.choice(["bce", "dice", "bce_dice"])),
        }
        trials.append(trial(params, space, 100 + effect(params) + rng.normal(0, 0.5)))
    return trials, space


def trial(params: dict, space: dict, value: float):
    with warnings.catch_warnings():  # create_trial is "experimental" in optuna 2.x
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.trial.create_trial(params=params, distributions=space, value=value)


@pytest.mark.parametrize(
    "planted, effect",
    [
        ("optimizer.lr", lambda p: 40 * (np.log10(p["optimizer.lr"]) + 3) ** 2),
        ("loss", lambda p: 30 * (p["loss"] == "dice")),
    ],
)
def test_importance_ranks_the_planted_parameter_first_and_names_its_method(planted, effect):
    trials, space = planted_trials(30, effect)
    result = search.search_importance(trials, space, METRIC)
    assert result.table.param[0] == planted
    assert result.table[result.method][0] > 2 * result.table[result.method][1]
    assert result.direction == "minimize" and result.trials == 30
    assert result.method in result.evaluators and result.method in search.NAMES
    report = "\n".join(result.lines())
    assert f"ranked by {result.method}" in report and "optuna.importance." in report
    if not hasattr(optuna.importance, "PedAnovaImportanceEvaluator"):  # optuna < 3.6
        assert "not available: PED-ANOVA: needs optuna >= 3.6" in report
    order = [m for m in ("PED-ANOVA", "fANOVA", search.MDI) if m in result.evaluators]
    assert result.method == order[0]  # PED-ANOVA where it runs, then fANOVA, else MDI


def test_importance_needs_two_trials_that_differ():
    trials, space = planted_trials(3, lambda p: 0.0)
    with pytest.raises(ValueError, match="importance needs 2"):
        search.search_importance(trials[:1], space, METRIC)
    same = [trial(t.params, space, 1.0) for t in trials]
    with pytest.raises(ValueError, match="the same in every trial"):
        search.search_importance(same, space, METRIC)


def plant_search(client: MlflowClient, work_dir, trials: list) -> str:
    """A search's parent and one FINISHED child per trial, as `segexp train -m` logs them."""
    experiment = client.create_experiment("planted", (work_dir / "artifacts").as_uri())
    parent = client.create_run(
        experiment, tags={"segexp.role": "sweep", tracking.tags.SEARCH_SPACE: json.dumps(SPACE)}
    ).info.run_id
    for trial in trials:
        run_id = client.create_run(experiment, tags={tracking.tags.PARENT: parent}).info.run_id
        params = {k: str(v) for k, v in trial.params.items() if k != "loss"}
        params["optimized_metric"] = METRIC
        choices = json.dumps({"loss": trial.params["loss"], "model": "smp"})
        client.log_batch(
            run_id,
            metrics=[Metric(METRIC, trial.value, 0, 0)],
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag(tracking.tags.CHOICES, choices)],
        )
        client.set_terminated(run_id)
    client.set_terminated(parent)
    return parent


def test_effects_on_a_planted_search_prints_the_ranking_and_logs_the_plot(client, work_dir, capsys):
    trials, _ = planted_trials(16, lambda p: 30 * (p["dataset.batch_size"] == 32))
    parent = plant_search(client, work_dir, trials)
    out = work_dir / "effects.png"
    code = cli.main(["effects", parent, "--work-dir", str(work_dir), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith(f"importance over 16 FINISHED trials of the search ({METRIC}")
    assert lines[2].split()[0] == "dataset.batch_size"  # below the table's header
    assert any(line.startswith("method: ") for line in lines)
    assert out.stat().st_size > 5_000
    assert [a.path for a in client.list_artifacts(parent, "effects")] == ["effects/effects.png"]


@pytest.mark.slow
def test_a_search_whose_direction_contradicts_its_metric_stops_before_training(work_dir):
    done = run_segexp(
        "train", "-m", SEARCH, "hydra.sweeper.direction=maximize", work_dir=work_dir, timeout=120
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"segexp train: hydra.sweeper.direction='maximize' does not match optimized_metric "
        f"{METRIC} (better lower): set it to minimize"
    )
    assert "Launching" not in done.stdout + done.stderr  # no trial started
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    assert client.get_experiment_by_name("hc18_synthetic") is None  # no parent run either


# ------------------------------------------------------------ real trainings


@pytest.fixture(scope="module")
def searched(tmp_path_factory, hc18_root):
    """`segexp train -m hparams_search=hc18_optuna` with 4 one-epoch trials on synthetic data."""
    work_dir = tmp_path_factory.mktemp("search")
    args = ["train", "-m", SEARCH, "debug=tiny", f"dataset.root={hc18_root}"]
    args += ["trainer.max_epochs=1", "hydra.sweeper.n_trials=4"]
    done = run_segexp(*args, work_dir=work_dir)
    (work_dir / "search.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return work_dir, args


def parents(client: MlflowClient) -> list:
    found = client.get_experiment_by_name("hc18_synthetic")
    return client.search_runs([found.experiment_id], "tags.`segexp.role` = 'sweep'")


@pytest.mark.slow
def test_a_search_is_one_parent_with_a_finished_child_per_trial(searched):
    work_dir, _ = searched
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    log = (work_dir / "search.log").read_text()
    [parent] = parents(client)
    assert parent.info.status == "FINISHED", log[-3000:]
    assert parent.info.run_name == "sweep lr x wd x bs x loss (4 runs)"
    assert json.loads(parent.data.tags[tracking.tags.SEARCH_SPACE]) == SPACE
    kids = tracking.children(client, parent)
    assert [k.info.status for k in kids] == ["FINISHED"] * 4
    for kid in kids:  # named by the sampled values, 3 significant digits
        assert max(len(part) for part in kid.info.run_name.split()) <= 16, kid.info.run_name
        assert kid.info.run_name.startswith("lr=") and " wd=" in kid.info.run_name
        assert kid.info.run_name.endswith(
            f" loss={json.loads(kid.data.tags['segexp.choices'])['loss']}"
        )
        assert kid.data.params["trainer.max_epochs"] == "1"
    assert len(set(k.data.params["optimizer.lr"] for k in kids)) == 4  # proposed, not a grid
    progress = [line for line in log.splitlines() if line.startswith("job ")]
    assert [p.split()[1] for p in progress] == ["1/4", "2/4", "3/4", "4/4"], log[-3000:]
    assert all(f": {METRIC} " in p and "ETA" in p for p in progress)
    with tempfile.TemporaryDirectory() as tmp:
        summary = pd.read_csv(
            client.download_artifacts(parent.info.run_id, "sweep/summary.csv", tmp)
        )
    assert len(summary) == 4 and set(summary.status) == {"FINISHED"}
    assert {"optimizer.lr", "optimizer.weight_decay", METRIC} <= set(summary.columns)


@pytest.mark.slow
def test_effects_on_a_real_search_names_its_method(searched):
    work_dir, _ = searched
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    [parent] = parents(client)
    done = run_segexp(
        "effects", parent.info.run_id, "--out", str(work_dir / "e.png"), work_dir=work_dir
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("importance over 4 FINISHED trials of the search")
    assert {line.split()[0] for line in lines[2:6]} == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "dataset.batch_size",
        "loss",
    }
    method = lines[0].rsplit("ranked by ", 1)[1].rstrip(":")
    assert f"method: {method} = " in done.stdout


@pytest.mark.slow
def test_a_resumed_search_meets_the_same_trials_and_reuses_them(searched, tmp_path):
    work_dir = tmp_path / "copy"
    shutil.copytree(searched[0], work_dir)
    done = run_segexp(*searched[1], "sweep.resume=true", work_dir=work_dir)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("sweep.resume: reusing FINISHED run") == 4, done.stdout[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    [parent] = parents(client)  # the same parent, re-opened: seeded TPE proposed the same 4
    assert len(tracking.children(client, parent)) == 4
    assert parent.info.status == "FINISHED"

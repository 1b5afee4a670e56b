"""Runs as MLflow itself shows them: datasets in the runs table, the System metrics tab."""

from __future__ import annotations

import copy
import json
import shutil
import threading
from types import SimpleNamespace

import pytest
from helpers import make_cfg, only_run, steps
from mlflow import MlflowClient
from omegaconf import open_dict

import segexp.train
from segexp import report
from segexp.train import build_datamodule, train

MONITOR_THREAD = "SystemMetricsMonitor"  # the name MLflow gives its sampling thread
CPU = "system/cpu_utilization_percentage"


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == MONITOR_THREAD]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, store_template, tiny_cfg, hc18_root):
    """One tiny training, then resumed for one more epoch, sampling system metrics every second.

    Shared by the tests below: a training is the slow part. `log_inputs` records which runs
    called it, since MLflow's store would hide a second call by deduplicating.
    """
    work_dir = tmp_path_factory.mktemp("native")
    shutil.copy(store_template, work_dir / "mlflow.db")
    cfg = copy.deepcopy(tiny_cfg)
    with open_dict(cfg):
        cfg.work_dir, cfg.dataset.root = str(work_dir), str(hc18_root)
    calls, log_inputs = [], MlflowClient.log_inputs

    def recording(self, run_id, *args, **kwargs):
        calls.append(run_id)
        return log_inputs(self, run_id, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        patch.setattr(MlflowClient, "log_inputs", recording)
        run_id = train(cfg).run_id
        resume = [f"resume={run_id}", "trainer.max_epochs=3"]
        train(make_cfg(work_dir, *resume), resume)
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    return SimpleNamespace(client=client, run=client.get_run(run_id), calls=calls)


def test_training_and_validation_sets_are_logged_as_datasets(trained, hc18_root):
    """Contexts training/validation, digest = the data fingerprint, source = the dataset root."""
    run, tags = trained.run, trained.run.data.tags
    by_context = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset
        for i in run.inputs.dataset_inputs
    }
    assert sorted(by_context) == ["training", "validation"]
    for context, images in (
        ("training", "dataset.train_images"),
        ("validation", "dataset.val_images"),
    ):
        dataset = by_context[context]
        assert dataset.digest == tags["dataset.fingerprint"]
        assert json.loads(dataset.source) == {"uri": str(hc18_root.resolve())}
        profile = json.loads(dataset.profile)
        assert profile["num_rows"] == int(tags[images]) and profile["split_file"] == "split.csv"
        assert dataset.name.startswith("hc18_synthetic/")
        assert "image" not in json.loads(dataset.schema)["mlflow_colspec"][0]["name"]
    assert by_context["training"].name != by_context["validation"].name
    assert "split.csv" in {a.path for a in trained.client.list_artifacts(run.info.run_id)}
    # the runs table's Dataset column reads them from search results, not from get_run
    (listed,) = trained.client.search_runs([run.info.experiment_id])
    assert len(listed.inputs.dataset_inputs) == 2


def test_a_resumed_run_does_not_log_its_datasets_again(trained):
    """Only the fresh run calls log_inputs; the resumed one trained on, into the same run."""
    run_id = trained.run.info.run_id
    assert trained.calls == [run_id]
    assert len(trained.run.inputs.dataset_inputs) == 2
    assert steps(trained.client, run_id, "train/loss") == [0, 1, 2]  # the resume did train


def test_system_metrics_are_sampled_and_continue_on_resume(trained):
    """CPU and memory points in the run, at distinct steps across the resume; no thread left."""
    run_id = trained.run.info.run_id
    keys = {k for k in trained.run.data.metrics if k.startswith("system/")}
    assert {CPU, "system/system_memory_usage_megabytes"} <= keys
    cpu_steps = steps(trained.client, run_id, CPU)
    assert len(cpu_steps) >= 3 and len(set(cpu_steps)) == len(cpu_steps), cpu_steps
    assert not monitor_threads()


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_a_failed_or_killed_run_stops_its_monitor(cfg, client, monkeypatch, error, status):
    """The monitor's thread ends with the run and its last point is logged."""

    def broken(*args, **kwargs):
        assert monitor_threads()  # sampling while the run's block runs
        raise error

    monkeypatch.setattr(segexp.train, "build_trainer", broken)
    with pytest.raises(SystemExit if status == "KILLED" else RuntimeError):
        train(cfg)
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == status
    assert CPU in run.data.metrics
    assert not monitor_threads()


def test_system_metrics_are_off_with_one_key(cfg, client, monkeypatch):
    """`tracking.system_metrics=false`: no monitor thread, no system metrics."""

    def broken(*args, **kwargs):
        assert not monitor_threads()
        raise RuntimeError("stop before training")

    monkeypatch.setattr(segexp.train, "build_trainer", broken)
    cfg.tracking.system_metrics = False
    with pytest.raises(RuntimeError):
        train(cfg)
    run = only_run(client, "hc18_synthetic")
    assert not [k for k in run.data.metrics if k.startswith("system/")]


def test_another_split_of_the_same_files_is_another_dataset(cfg):
    """Same files, other split seed: same digest, other names (MLflow keys datasets on both)."""
    first = report.dataset_inputs(build_datamodule(cfg), "split.csv")
    cfg.dataset.split_seed += 1
    other = report.dataset_inputs(build_datamodule(cfg), "split.csv")
    for a, b in zip(first, other, strict=True):
        assert a.dataset.digest == b.dataset.digest and a.dataset.name != b.dataset.name

"""The best weights as an MLflow model: logged, registered, predicted from, refused when altered."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from omegaconf import open_dict
from PIL import Image

from segexp import cli
from segexp.config import ConfigError
from segexp.models import registry
from segexp.predict import predict
from segexp.train import train


@pytest.fixture(scope="module")
def model(tmp_path_factory, store_template, tiny_cfg, hc18_root):
    """One tiny training that logs its model and registers it as `hc18-unet`."""
    work_dir = tmp_path_factory.mktemp("registry")
    shutil.copy(store_template, work_dir / "mlflow.db")
    cfg = copy.deepcopy(tiny_cfg)
    with open_dict(cfg):
        cfg.work_dir, cfg.dataset.root = str(work_dir), str(hc18_root)
        cfg.tracking.log_model, cfg.tracking.register_as = True, "hc18-unet"
    run_id = train(cfg).run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    return SimpleNamespace(client=client, run=client.get_run(run_id), work_dir=work_dir)


def test_the_best_weights_are_a_logged_model_of_the_run_with_its_metrics(model):
    [output] = model.run.outputs.model_outputs
    logged = model.client.get_logged_model(output.model_id)
    assert logged.source_run_id == model.run.info.run_id and logged.name == registry.NAME
    linked = {m.key: m.value for m in logged.metrics}
    assert linked["val/dice_best"] == pytest.approx(model.run.data.metrics["val/dice_best"])
    files = {a.path for a in model.client.list_logged_model_artifacts(output.model_id)}
    assert {"MLmodel", "mlflow_code.py"} <= files  # models from code, no pickled model
    assert not any(path.endswith((".pkl", ".pickle")) for path in files)


def test_predict_from_the_registry_equals_predict_from_the_run(model, hc18_root, tmp_path):
    images, pixel_csv = hc18_root / "test_set", hc18_root / "test_set_pixel_size.csv"
    run_id = model.run.info.run_id
    by_run = predict(model.client, run_id, images, pixel_csv, tmp_path / "run.csv")
    by_name = predict(model.client, "models:/hc18-unet/1", images, pixel_csv, tmp_path / "m.csv")
    pd.testing.assert_frame_equal(by_run, by_name)


def test_mlflow_pyfunc_returns_masks_and_hc(model, hc18_root):
    with registry.fluent(model.client.tracking_uri, model.run.info.experiment_id):
        loaded = mlflow.pyfunc.load_model("models:/hc18-unet/1")
    table = pd.read_csv(hc18_root / "test_set_pixel_size.csv")
    paths = [str(hc18_root / "test_set" / name) for name in table.filename]
    array = np.asarray(Image.open(paths[0]).convert("L"))
    found = loaded.predict(
        pd.DataFrame({"image": [paths[0], array], "pixel_size_mm": table["pixel size(mm)"][:2]})
    )
    assert list(found.columns) == ["image", "mask", "hc_mm"] and len(found) == 2
    assert found["mask"][0].shape == array.shape and set(np.unique(found["mask"][0])) <= {0, 1}
    assert np.array_equal(found["mask"][0], found["mask"][1])  # a path and its pixels agree
    assert np.isfinite(found.hc_mm).all() or found["mask"][0].sum() == 0


def test_register_adds_a_version_from_the_cli(model, capsys):
    code = cli.main(
        [
            "register",
            model.run.info.run_id,
            "--name",
            "hc18-unet",
            "--work-dir",
            str(model.work_dir),
        ]
    )
    assert code == 0 and "models:/hc18-unet/2" in capsys.readouterr().out
    assert model.client.get_model_version("hc18-unet", "2").run_id == model.run.info.run_id


@pytest.mark.parametrize(
    "name, planted, refusal",
    [
        ("mlflow_code.py", b"\nimport os  # planted\n", "mlflow_code.py is not segexp's own"),
        ("artifacts/config.yaml", b"\nplanted:\n  _target_: os.system\n", "os.system"),
    ],
)
def test_a_model_whose_code_or_config_was_replaced_is_refused(
    model, tmp_path, name, planted, refusal
):
    [output] = model.run.outputs.model_outputs
    location = model.client.get_logged_model(output.model_id).artifact_location
    path = Path(location.removeprefix("file://")) / name
    original = path.read_bytes()
    path.write_bytes(original + planted)
    try:
        with pytest.raises(ConfigError, match=refusal):
            registry.model_files(model.client, "models:/hc18-unet/1", tmp_path)
    finally:
        path.write_bytes(original)


def test_an_unknown_model_version_is_one_line(model, tmp_path):
    with pytest.raises(ConfigError, match="models:/hc18-unet/99: no such registered model"):
        registry.model_files(model.client, "models:/hc18-unet/99", tmp_path)

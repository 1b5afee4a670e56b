"""The best weights as an MLflow model: a LoggedModel of the run, registered by name, read back.

The model is MLflow's models from code: segexp's own code file (mlflow_code.py) plus two
artifacts, the weights (a torch archive of tensors, loaded with weights_only) and the run's
config.yaml (read as data, targets checked). Nothing is pickled. MLflow's own loader
(`mlflow.pyfunc.load_model`) runs the model's stored code file; segexp never does: it reads
the two artifacts itself, and only where the stored code is this version's file, byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path, PurePosixPath

import mlflow
import torch
import yaml
from mlflow import MlflowClient
from mlflow.models import Model

from segexp import config
from segexp.config import ConfigError

from .checkpoint import load_checkpoint

CODE = Path(__file__).with_name("mlflow_code.py")
NAME = "model"  # the LoggedModel's name in the run's Models tab
MAX_MLMODEL_BYTES = 1 << 20
LIBRARIES = ("torch", "segmentation-models-pytorch", "mlflow", "pandas", "scikit-image")


@contextlib.contextmanager
def fluent(uri: str, experiment_id: str):
    """MLflow's fluent API pointed at segexp's store and the run's experiment."""
    # set_tracking_uri also sets MLFLOW_TRACKING_URI, which segexp reads: put back as it was
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def requirements() -> list[str]:
    return ["segexp", *(f"{name}=={version(name)}" for name in LIBRARIES)]


def log_model(client: MlflowClient, run_id: str, checkpoint: Path, step: int) -> str:
    """Log a checkpoint's network weights with the run's config.yaml as the run's LoggedModel,
    linked to the metrics of `step`; returns its model id."""
    found = load_checkpoint(checkpoint, ["state_dict"])
    weights = {k: v for k, v in found["state_dict"].items() if k.startswith("net.")}
    experiment = client.get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory() as tmp, fluent(client.tracking_uri, experiment):
        cfg_path = Path(client.download_artifacts(run_id, "config.yaml", tmp))
        config.read_stored(cfg_path, run_id)  # refused targets: no model of them
        path = Path(tmp) / "weights.pt"
        torch.save(
            {"state_dict": weights, "segexp_evaluation": found.get("segexp_evaluation")}, path
        )
        with warnings.catch_warnings():  # SegModel takes paths, arrays or frames: no type hints
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")
            info = Model.log(
                None, name=NAME, flavor=mlflow.pyfunc, run_id=run_id, python_model=str(CODE),
                artifacts={"weights": str(path), "config": str(cfg_path)},
                pip_requirements=requirements(), step=step,
            )  # fmt: skip
    return info.model_id


def register(client: MlflowClient, run_id: str, name: str) -> int:
    """A new version of registered model `name` from the run's LoggedModel (logged first from
    its best checkpoint if it has none); returns the version."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    if outputs:
        model_id = outputs[-1].model_id
    else:
        with tempfile.TemporaryDirectory() as tmp:
            best = client.download_artifacts(run_id, "checkpoints/best.ckpt", tmp)
            model_id = log_model(client, run_id, Path(best), 0)
    with fluent(client.tracking_uri, run.info.experiment_id):
        found = mlflow.register_model(f"models:/{model_id}", name)
    return int(found.version)


def logged_model_id(client: MlflowClient, uri: str) -> str:
    """The LoggedModel id of `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `models:/m-...`."""
    ref = uri.removeprefix("models:/").strip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            source = client.get_model_version_by_alias(name, alias).source
        elif "/" in ref:
            name, number = ref.rsplit("/", 1)
            source = client.get_model_version(name, number).source
        else:
            source = f"models:/{ref}"
    except Exception as err:  # MLflow raises its own types for unknown names and versions
        raise ConfigError(f"{uri}: no such registered model version ({err})") from None
    model_id = source.removeprefix("models:/").strip("/")
    if not model_id.startswith("m-") or "/" in model_id:
        raise ConfigError(f"{uri}: its source {source!r} is no logged model: refused")
    return model_id


def model_files(client: MlflowClient, uri: str, folder: Path) -> tuple[dict, Path]:
    """(the model's config, its weights file in `folder`), read as data; ConfigError naming
    `uri` where its code is not segexp's own or its files are missing or refused."""
    model = client.get_logged_model(logged_model_id(client, uri))

    def fetch(path: str) -> Path:
        parts = PurePosixPath(path).parts
        if not parts or parts[0] == "/" or ".." in parts:
            raise ConfigError(f"{uri}: file {path!r} is not a plain relative name: refused")
        try:
            found = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{model.artifact_location}/{path}", dst_path=str(folder),
                tracking_uri=client.tracking_uri,
            )  # fmt: skip
        except Exception as err:
            raise ConfigError(f"{uri}: its {path} is unreadable ({err})") from None
        return Path(found)

    mlmodel = fetch("MLmodel")
    if mlmodel.stat().st_size > MAX_MLMODEL_BYTES:
        raise ConfigError(f"{uri}: MLmodel is over {MAX_MLMODEL_BYTES} bytes: refused")
    try:
        flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
        code, files = Path(str(flavor["model_code_path"])).name, flavor["artifacts"]
        paths = {key: str(files[key]["path"]) for key in ("weights", "config")}
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise ConfigError(f"{uri}: MLmodel is not a segexp model ({err}): refused") from None
    if fetch(code).read_bytes() != CODE.read_bytes():
        raise ConfigError(f"{uri}: its code file {code} is not segexp's own: refused")
    cfg = config.read_stored(fetch(paths["config"]), uri)
    return cfg, fetch(paths["weights"])

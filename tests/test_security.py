"""Stored runs are data, not code: planted configs never run, whichever command reads them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import make_cfg, predict_args
from mlflow import MlflowClient

from segexp import cli, config
from segexp.config import ConfigError
from segexp.train import train

HUBCONF = """import pathlib
pathlib.Path({marker!r}).touch()


def evil(**kwargs):
    pathlib.Path({marker!r}).touch()
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory, store_template, hc18_root):
    """A real run whose config.yaml was replaced by one that loads a planted `hubconf.py`."""
    work_dir = tmp_path_factory.mktemp("planted")
    shutil.copy(store_template, work_dir / "mlflow.db")
    cfg = make_cfg(work_dir, "debug=tiny", f"dataset.root={hc18_root}", "trainer.max_epochs=1")
    run_id = train(cfg).run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    marker = work_dir / "pwned"
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    (work_dir / "hubconf.py").write_text(HUBCONF.format(marker=str(marker)))
    client.log_artifact(run_id, str(work_dir / "hubconf.py"))
    stored = yaml.safe_load((artifacts / "config.yaml").read_text())
    stored["model"] = {
        "_target_": "torch.hub.load",
        "repo_or_dir": str(artifacts),
        "model": "evil",
        "source": "local",
        "trust_repo": True,
    }
    (work_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    client.log_artifact(run_id, str(work_dir / "config.yaml"))
    return work_dir, run_id, marker, hc18_root


def test_predict_refuses_a_planted_target_and_nothing_runs(planted, capsys):
    work_dir, run_id, marker, hc18_root = planted
    code = cli.main(predict_args(run_id, hc18_root, work_dir))
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "model._target_='torch.hub.load' is refused" in err and "Traceback" not in err


def test_resume_refuses_a_planted_target_and_nothing_runs(planted):
    work_dir, run_id, marker, _ = planted
    with pytest.raises(ConfigError, match=r"model\._target_='torch\.hub\.load' is refused"):
        train(make_cfg(work_dir, f"resume={run_id}"), [f"resume={run_id}"])
    assert not marker.exists()


def test_blame_refuses_a_planted_run_before_any_training(planted, capsys):
    work_dir, run_id, marker, hc18_root = planted
    client = MlflowClient(tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}")
    other = train(
        make_cfg(
            work_dir, "debug=tiny", f"dataset.root={hc18_root}", "trainer.max_epochs=1", "seed=3"
        )
    ).run_id
    before = len(
        client.search_runs([client.get_experiment_by_name("hc18_synthetic").experiment_id])
    )
    code = cli.main(["blame", other, run_id, "--seeds", "1", "--work-dir", str(work_dir)])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "torch.hub.load" in err and "refused" in err
    after = client.search_runs([client.get_experiment_by_name("hc18_synthetic").experiment_id])
    assert len(after) == before, "a refused blame creates no run"


@pytest.mark.parametrize(
    "target, reason",
    [
        ("torch.hub.load", "is refused"),
        ("builtins.exec", "is refused"),
        ("torch.load", "is refused"),
        ("pickle.loads", "is refused"),
        ("os.system", "is refused"),
        ("torch.nn.Identity", "not an allowed target"),  # under `torch.`, but no config names it
        ("segexp.models.UNetX", "not an allowed target"),  # a prefix of an allowed name is not it
    ],
)
def test_only_named_targets_may_be_built(target, reason):
    node = {"model": {"_target_": "segexp.models.UNet"}, "loss": {"x": [{"_target_": target}]}}
    with pytest.raises(ConfigError, match=rf"loss\.x\.0\._target_='{target}' .*{reason}"):
        config.check_targets(node)


def test_a_user_allowlist_admits_exactly_its_targets(monkeypatch):
    node = {"model": {"_target_": "torch.nn.Identity"}}
    with pytest.raises(ConfigError, match="SEGEXP_ALLOWED_TARGETS"):
        config.check_targets(node)
    monkeypatch.setenv(config.ALLOW_ENV, "torch.nn.Identity, torch.hub.load")
    config.allowed_targets.cache_clear()
    try:
        config.check_targets(node)  # allowed now
        with pytest.raises(ConfigError, match="is refused"):  # never, whatever the list says
            config.check_targets({"model": {"_target_": "torch.hub.load"}})
    finally:
        monkeypatch.delenv(config.ALLOW_ENV)
        config.allowed_targets.cache_clear()


def test_every_shipped_config_target_and_library_class_is_allowed():
    allowed = config.allowed_targets()
    for name in (
        "segexp.models.UNet",
        "segmentation_models_pytorch.create_model",
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.OneCycleLR",
        "albumentations.Compose",
        "albumentations.CLAHE",  # any albumentations transform, from YAML
        "segmentation_models_pytorch.losses.FocalLoss",
        "pytorch_lightning.Trainer",
    ):
        assert name in allowed, name


def test_a_run_logged_before_performance_channels_last_still_predicts(
    cfg, work_dir, client, hc18_root
):
    cfg.trainer.max_epochs = 1
    run_id = train(cfg).run_id
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    stored = yaml.safe_load((artifacts / "config.yaml").read_text())
    stored["model"]["channels_last"] = stored.pop("performance")["channels_last"]  # old layout
    (artifacts / "config.yaml").write_text(yaml.safe_dump(stored))
    assert cli.main(predict_args(run_id, hc18_root, work_dir)) == 0
    assert len((work_dir / "sub.csv").read_text().splitlines()) == 1 + 3

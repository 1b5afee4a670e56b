"""Training and tracking: tiny real runs into a real MLflow store in tmp_path."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import (
    an_epoch_is_logged,
    make_cfg,
    only_run,
    run_segexp,
    start_long_run,
    start_segexp,
    steps,
    wait_for,
)
from hydra.utils import instantiate
from PIL import Image

from segexp import config, data, tracking
from segexp.config import ConfigError
from segexp.data import DataError
from segexp.evaluation import case_table
from segexp.models import build_net
from segexp.train import build_datamodule, build_module, resolve_speed, train

EXPERIMENTS = sorted(p.stem for p in (config.CONFIG_DIR / "experiment").glob("*.yaml"))
assert EXPERIMENTS, f"no experiment configs under {config.CONFIG_DIR}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment, tmp_path, hc18_root, lgg_root):
    data = (
        [f"dataset.root={lgg_root}", "dataset.val_count=1"]
        if experiment.startswith("lgg")
        else [f"dataset.root={hc18_root}"]
    )
    cfg = make_cfg(tmp_path, f"experiment={experiment}", *data, "dataset.image_size=32")
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    assert module(batch["image"]).shape == batch["mask"].shape
    assert module.volumetric == experiment.startswith("lgg")
    # the built module trains: its optimizer is the configured class and one step moves weights
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert type(optimizer).__name__ == cfg.optimizer._target_.rsplit(".", 1)[-1]
    before = [p.detach().clone() for p in module.parameters()]
    module.loss(module(batch["image"]), batch["mask"]).backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))


def test_lgg_experiments_state_the_reference_configs(tmp_path):
    one = make_cfg(tmp_path, "experiment=lgg_buda_1")
    two = make_cfg(tmp_path, "experiment=lgg_buda_2")
    assert (one.dataset.batch_size, one.optimizer.lr, one.trainer.max_epochs) == (16, 3e-4, 7)
    assert (
        two.dataset.batch_size,
        two.optimizer.lr,
        two.optimizer.weight_decay,
        two.trainer.max_epochs,
    ) == (32, 1e-3, 1e-4, 10)
    assert one.loss._target_.endswith("DiceLoss")
    assert list(one.augment.transforms[0].rotate) == [-15, 15]
    seed = make_cfg(tmp_path, "experiment=hc18_seed")
    assert (
        seed.dataset.image_size,
        seed.dataset.batch_size,
        seed.callbacks.early_stopping.patience,
    ) == (
        128,
        20,
        5,
    )
    assert seed.checkpoint.monitor == "val/loss"


@pytest.mark.parametrize("model", ["unet_small", "unet_buda", "smp"])
@pytest.mark.parametrize("loss", ["bce", "dice", "bce_dice"])
def test_models_and_losses_give_finite_gradients(model, loss, tmp_path):
    cfg = make_cfg(tmp_path, f"model={model}", f"loss={loss}")
    net, criterion = build_net(cfg.model), instantiate(cfg.loss)
    logits = net(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 1, 32, 32)
    # extreme logits: numerically stable losses stay finite
    value = criterion(logits * 1e4, (torch.rand(2, 1, 32, 32) > 0.5).float())
    value.backward()
    assert torch.isfinite(value) and all(
        torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None
    )


def test_dice_rule_for_empty_masks():
    table = case_table(
        [[0, 0, 0, 16, 16], [0, 4, 0, 12, 16], [2, 2, 4, 14, 16]], ["a", "b", "c"], ["g"] * 3
    )
    assert table.dice.tolist() == [1.0, 0.0, pytest.approx(2 * 2 / 6)]
    assert table.iou.tolist() == [1.0, 0.0, pytest.approx(2 / 4)]


def test_two_epoch_run_lands_in_mlflow(cfg, work_dir, client):
    long_name = "x" * 400  # params are logged whole, not cut at 250 characters
    cfg.run_name = long_name
    final = train(cfg, ["optimizer.lr=1e-3"])
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "FINISHED"
    for key in (
        "train/loss",
        "val/loss",
        "val/dice",
        "val/iou",
        "val/accuracy",
        "val/hd95_mm",
        "val/hc_mae_mm",
        "val/hc_bias_mm",
    ):
        assert steps(client, run.info.run_id, key) == [0, 1], key
    assert "val/dice_volume" not in run.data.metrics
    assert 0 <= run.data.metrics["val/dice_best"] <= 1 and run.data.metrics["best_epoch"] in (0, 1)
    assert final.metrics["val/dice_best"] == pytest.approx(run.data.metrics["val/dice_best"])
    assert run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["run_name"] == long_name
    assert run.data.params["dataset.image_size"] == "32"
    assert run.data.tags["hydra.overrides"] == "optimizer.lr=1e-3"
    assert len(run.data.tags["dataset.fingerprint"]) == 16
    assert run.data.tags["mlflow.runName"] == long_name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {
        a.path
        for d in ("evaluation", "plots", "checkpoints")
        for a in client.list_artifacts(run.info.run_id, d)
    }
    assert {
        "config.yaml",
        "split.csv",
        "evaluation/val_cases.csv",
        "plots/curves.png",
        "checkpoints/best.ckpt",
    } <= artifacts
    cases = pd.read_csv(
        client.download_artifacts(run.info.run_id, "evaluation/val_cases.csv", str(work_dir))
    )
    assert {
        "filename",
        "case_id",
        "dice",
        "pixel_size_mm",
        "hc_true_mm",
        "hc_pred_mm",
        "hc_abs_error_mm",
        "hd95_mm",
    } <= set(cases.columns)
    assert cases.hc_abs_error_mm.mean() == pytest.approx(run.data.metrics["val/hc_mae_mm_best"])
    # the artifact store is the explicit one under work_dir, never MLflow's default ./mlartifacts
    assert run.info.artifact_uri.startswith((work_dir / "artifacts").as_uri())
    output_dir = Path(run.data.tags["segexp.output_dir"])
    assert (output_dir / "checkpoints" / "last.ckpt").is_file() and str(output_dir).startswith(
        str(work_dir)
    )


def test_lgg_run_logs_per_patient_dice(work_dir, client, lgg_root):
    cfg = make_cfg(
        work_dir,
        "experiment=lgg_buda_1",
        "debug=tiny",
        f"dataset.root={lgg_root}",
        "dataset.val_count=1",
    )
    train(cfg)
    run = only_run(client, "lgg")
    assert steps(client, run.info.run_id, "val/dice_volume") == [0, 1]
    assert "val/dice_volume_best" in run.data.metrics and "val/hc_mae_mm" not in run.data.metrics
    assert steps(client, run.info.run_id, "val/hd95_px") == [0, 1]
    volumes = client.download_artifacts(
        run.info.run_id, "evaluation/val_volumes.csv", str(work_dir)
    )
    assert (
        len(Path(volumes).read_text().strip().splitlines()) == 2
    )  # header + one validation patient


def test_best_epoch_weights_are_restored_for_the_final_evaluation(cfg, client):
    # lr far too high: later epochs get worse, so the best epoch is not the last
    cfg.trainer.max_epochs = 4
    cfg.checkpoint.monitor, cfg.checkpoint.mode = "val/loss", "min"
    train(cfg)
    run = only_run(client, "hc18_synthetic")
    history = dict(
        sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss"))
    )
    best_epoch = min(history, key=history.get)
    assert run.data.metrics["best_epoch"] == best_epoch
    dice = dict((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/dice"))
    assert run.data.metrics["val/dice_best"] == pytest.approx(dice[best_epoch], abs=1e-6)


def test_early_stopping_stops_and_restores(work_dir, client, hc18_root):
    cfg = make_cfg(
        work_dir,
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "trainer.max_epochs=30",
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience=1",
        "checkpoint.monitor=val/loss",
        "checkpoint.mode=min",
        "optimizer.lr=0.5",
    )
    train(cfg)
    run = only_run(client, "hc18_synthetic")
    epochs = steps(client, run.info.run_id, "val/loss")
    assert epochs == list(range(len(epochs))) and len(epochs) < 30
    assert run.data.metrics["best_epoch"] <= len(epochs) - 2


def test_non_finite_loss_fails_the_run_with_its_reason(work_dir, client, hc18_root):
    cfg = make_cfg(
        work_dir,
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "optimizer=sgd",
        "optimizer.lr=1e30",
        "trainer.max_epochs=3",
    )
    with pytest.raises(tracking.NonFiniteMetricError):
        train(cfg)
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "FAILED"
    assert "NonFiniteMetricError" in run.data.tags["failure_reason"]
    for key in run.data.metrics:
        assert all(
            math.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, key)
        ), key


def test_bad_data_fails_before_any_run_is_created(cfg, client, hc18_root, tmp_path):
    import shutil

    root = shutil.copytree(hc18_root, tmp_path / "broken")
    (root / "training_set" / "000_HC_Annotation.png").unlink()
    cfg.dataset.root = str(root)
    with pytest.raises(DataError, match="000_HC.png: missing annotation"):
        train(cfg)
    experiments = client.search_experiments()
    assert not client.search_runs([e.experiment_id for e in experiments])


def test_targets_outside_the_allowlist_are_rejected_before_anything_runs(work_dir, client):
    cfg = make_cfg(work_dir, "model._target_=os.system", "+model.command=touch pwned")
    with pytest.raises(ConfigError, match="model._target_"):
        train(cfg)
    assert not Path("pwned").exists()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_secrets_never_reach_params_tags_or_config(work_dir, client, hc18_root):
    overrides = ["+db_password=hunter2", "+notes=postgresql://alice:s3cret@db.example/mlflow"]
    train(make_cfg(work_dir, "debug=tiny", f"dataset.root={hc18_root}", *overrides), overrides)
    run = only_run(client, "hc18_synthetic")
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    config = Path(
        client.download_artifacts(run.info.run_id, "config.yaml", str(work_dir))
    ).read_text()
    for secret in ("hunter2", "s3cret"):
        assert secret not in logged and secret not in config
    assert run.data.params["db_password"] == "***" and "alice:***@" in run.data.params["notes"]


def test_resume_continues_the_same_run_without_gaps_or_duplicates(cfg, work_dir, client):
    train(cfg)
    run_id = only_run(client, "hc18_synthetic").info.run_id
    overrides = [f"resume={run_id}", "trainer.max_epochs=4"]
    train(make_cfg(work_dir, *overrides), overrides)
    run = only_run(client, "hc18_synthetic")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in ("train/loss", "val/dice"):
        assert steps(client, run_id, key) == [0, 1, 2, 3], key


def test_resume_without_a_checkpoint_is_a_clear_error(cfg, work_dir, client):
    train(cfg)
    run = only_run(client, "hc18_synthetic")
    last = Path(run.data.tags["segexp.output_dir"]) / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(ConfigError, match="unreadable"):
        train(make_cfg(work_dir, f"resume={run.info.run_id}"))
    last.unlink()
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(make_cfg(work_dir, f"resume={run.info.run_id}"))
    with pytest.raises(ConfigError, match="no such run"):
        train(make_cfg(work_dir, "resume=0123456789abcdef"))


@pytest.mark.slow  # a whole process lifecycle: tens of seconds
def test_sigterm_marks_the_run_killed_and_resume_finishes_it(work_dir, client, hc18_root):
    proc = start_long_run(work_dir, client, hc18_root)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output[-3000:]
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "KILLED", output[-3000:]
    assert (work_dir / "out" / "checkpoints" / "on_exception.ckpt").is_file()

    done = steps(client, run.info.run_id, "val/dice")
    resumed = start_segexp(
        "train",
        f"resume={run.info.run_id}",
        f"trainer.max_epochs={done[-1] + 3}",
        work_dir=work_dir,
    )
    output, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, output[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "val/dice") == list(range(done[-1] + 3))


def test_client_of_a_fresh_store_has_an_explicit_artifact_root(tmp_path):
    client, artifacts = tracking.open_store(make_cfg(tmp_path).tracking, tmp_path)
    assert client.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert artifacts == (tmp_path / "artifacts").as_uri() and (tmp_path / "mlflow.db").is_file()
    explicit = make_cfg(tmp_path, "tracking.uri=http://127.0.0.1:5999")
    assert tracking.store_locations(explicit.tracking, tmp_path)[0] == "http://127.0.0.1:5999"


def test_an_unreachable_tracking_server_fails_fast_naming_its_uri(tmp_path, hc18_root):
    start = time.monotonic()
    with pytest.raises(tracking.StoreError, match="http://127.0.0.1:9"):
        tracking.open_store({"uri": "http://127.0.0.1:9"}, tmp_path)
    assert time.monotonic() - start < 10
    proc = start_segexp(
        "train", f"dataset.root={hc18_root}", "tracking.uri=http://127.0.0.1:9", work_dir=tmp_path
    )
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in output
    assert "segexp train: tracking server http://127.0.0.1:9 is unreachable" in output
    assert not (tmp_path / "cache").exists(), "no data work before the store answers"


def test_predict_writes_the_hc18_submission_and_plots_are_logged(
    cfg, work_dir, client, hc18_root, capsys
):
    from segexp import cli
    from segexp.predict import SUBMISSION_COLUMNS

    train(cfg)
    run = only_run(client, "hc18_synthetic")
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {
        "plots/curves.png",
        "plots/per_image.png",
        "plots/overlays.png",
        "plots/hc_agreement.png",
    } <= plots
    out = work_dir / "submission.csv"
    args = [
        "predict",
        run.info.run_id,
        "--images",
        str(hc18_root / "test_set"),
        "--pixel-csv",
        str(hc18_root / "test_set_pixel_size.csv"),
        "--out",
        str(out),
        "--masks",
        str(work_dir / "masks"),
        "--work-dir",
        str(work_dir),
    ]
    assert cli.main(args) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == SUBMISSION_COLUMNS and len(table) == 3
    assert sorted(table.filename) == sorted(p.name for p in (hc18_root / "test_set").glob("*.png"))
    assert table[SUBMISSION_COLUMNS[1:]].notna().all().all()
    masks = sorted((work_dir / "masks").glob("*_mask.png"))
    assert len(masks) == 3 and Image.open(masks[0]).size == (800, 540)
    # a listed image that is missing is named
    bad_csv = work_dir / "bad.csv"
    bad_csv.write_text("filename,pixel size(mm)\nnope_HC.png,0.1\n")
    assert cli.main([*args[:5], str(bad_csv), "--out", str(out), "--work-dir", str(work_dir)]) == 2
    assert "nope_HC.png" in capsys.readouterr().err


def test_lgg_run_logs_per_patient_plots(work_dir, client, lgg_root):
    cfg = make_cfg(
        work_dir,
        "experiment=lgg_buda_1",
        "debug=tiny",
        f"dataset.root={lgg_root}",
        "dataset.val_count=2",
    )
    train(cfg)
    run = only_run(client, "lgg")
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/per_patient.png", "plots/overlays.png"} <= plots


def test_bf16_mixed_and_channels_last_train_on_cpu(cfg, client):
    cfg.trainer.precision, cfg.performance.channels_last = "bf16-mixed", True
    cfg.trainer.max_epochs = 1
    datamodule = build_datamodule(cfg)
    net = build_module(cfg, datamodule).net
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # really NHWC, not just 1x1 kernels
    final = train(cfg)
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "FINISHED" and run.data.params["trainer.precision"] == "bf16-mixed"
    assert run.data.tags["segexp.channels_last"] == "True"
    assert math.isfinite(final.metrics["val/dice_best"]) and steps(
        client, run.info.run_id, "val/dice"
    ) == [0]


@pytest.mark.parametrize("scheduler", ["cosine", "plateau"])
def test_schedulers_step_during_training(scheduler, work_dir, client, hc18_root):
    train(
        make_cfg(
            work_dir,
            "debug=tiny",
            f"dataset.root={hc18_root}",
            f"scheduler={scheduler}",
            "trainer.max_epochs=4",
            # plateau: no epoch counts as an improvement, so the lr halves after every epoch
            *(
                ["scheduler.patience=0", "+scheduler.threshold=10"]
                if scheduler == "plateau"
                else []
            ),
        )
    )
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "FINISHED"
    lrs = [
        m.value
        for m in sorted(
            client.get_metric_history(run.info.run_id, "train/lr"), key=lambda m: m.step
        )
    ]
    assert len(lrs) == 4 and lrs[0] == pytest.approx(1e-3), lrs
    if scheduler == "cosine":
        assert lrs[0] > lrs[1] > lrs[2] > lrs[3], lrs
    else:  # the first epoch sets the best; every later one halves the lr
        assert lrs[1] == lrs[0] and lrs[2] == pytest.approx(lrs[0] / 2), lrs
        assert lrs[3] == pytest.approx(lrs[0] / 4), lrs


def test_ctrl_c_marks_the_run_killed(work_dir, client, hc18_root):
    proc = start_segexp(
        "train",
        "debug=tiny",
        f"dataset.root={hc18_root}",
        "trainer.max_epochs=200",
        work_dir=work_dir,
    )

    wait_for(lambda: an_epoch_is_logged(client))
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output[-3000:]  # the shell's code for Ctrl-C
    run = only_run(client, "hc18_synthetic")
    assert run.info.status == "KILLED", output[-3000:]


@pytest.mark.slow
def test_bf16_dice_matches_fp32_after_the_same_epochs(work_dir, client, tmp_path):
    # enough images and epochs that both runs reach the plateau: on a handful of images two
    # fp32 seeds already differ by more than 0.01
    root = data.make_hc18(tmp_path / "hc18", n=120, seed=3, n_test=0)
    common = [
        "debug=tiny",
        f"dataset.root={root}",
        "dataset.image_size=64",
        "dataset.batch_size=8",
        "loss=bce_dice",
        "optimizer.lr=3e-3",
        "scheduler=cosine",
        "trainer.max_epochs=25",
        "performance.channels_last=true",
    ]
    fp32 = train(make_cfg(work_dir, *common, "trainer.precision=32-true", "run_name=fp32"))
    bf16 = train(make_cfg(work_dir, *common, "trainer.precision=bf16-mixed", "run_name=bf16"))
    assert fp32.metrics["val/dice_best"] > 0.8, fp32  # a trained model, not two empty predictions
    # bf16 rounding moves the trajectory as another seed would, and by how much depends on the
    # CPU's bf16 kernels: 0.011 on an AMD EPYC with AVX-512 BF16, 0.023 on an Intel Xeon without
    gap = abs(fp32.metrics["val/dice_best"] - bf16.metrics["val/dice_best"])
    assert gap < 0.03, (fp32.metrics["val/dice_best"], bf16.metrics["val/dice_best"])


def test_precision_and_channels_last_auto_are_resolved_and_recorded(cfg, client, any_load_is_idle):
    cfg.trainer.max_epochs = 1
    # debug=tiny fixes them; compile stays off
    cfg.trainer.precision, cfg.performance.channels_last = "auto", "auto"
    choice = resolve_speed(cfg, build_datamodule(cfg), build_net(cfg.model))
    train(cfg)
    run = only_run(client, "hc18_synthetic")
    tags = run.data.tags
    assert run.data.params["trainer.precision"] == "auto"
    assert tags["speed.source"] == "cache"  # probed once above, per machine and model shape
    # the run trains with what the probe measured fastest, and records the figures
    assert tags["segexp.precision"] == choice.precision
    assert tags["segexp.channels_last"] == str(choice.channels_last)
    measured = {k: float(v) for k, v in tags.items() if k.startswith("speed.img_s.")}
    assert max(measured, key=measured.get) == "speed.img_s." + tags["speed.choice"]
    assert steps(client, run.info.run_id, "time/train_images_per_second") == [0]


@pytest.mark.slow  # a whole process lifecycle: tens of seconds
def test_ddp_preset_on_two_cpu_processes_makes_one_run(work_dir, client, hc18_root):
    """trainer=ddp, run on CPU with gloo: two ranks train, only rank 0 writes to MLflow."""
    done = run_segexp(
        *["debug=tiny", f"dataset.root={hc18_root}", "trainer=ddp", "trainer.accelerator=cpu"],
        *["trainer.devices=2", "trainer.sync_batchnorm=false", "trainer.precision=32-true"],
        module="segexp.train",  # not `segexp`: the DDP launcher re-runs argv[0] for rank 1
        work_dir=work_dir,
        env={"SEGEXP_THREADS": "1"},
        timeout=240,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run = only_run(client, "hc18_synthetic")  # rank 1 joined rank 0's run, made none
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "val/dice") == [0, 1]
    assert steps(client, run.info.run_id, "train/loss") == [0, 1]
    assert "val/dice_best" in run.data.metrics

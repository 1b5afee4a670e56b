"""HC18 accuracy recipe: non-square sizes, ellipse fits, flip TTA, flags, `hc18_best` end to end."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import make_cfg, only_run
from omegaconf import OmegaConf

from segexp import config, report
from segexp.data import SegDataModule
from segexp.evaluation import (
    Ellipse,
    clinical_table,
    ellipse_mask,
    hc_from_mask,
    measure_hc,
    ramanujan_perimeter,
    range_names,
    summarize,
)
from segexp.models import UNet, flip_tta_logits
from segexp.predict import SUBMISSION_COLUMNS, flags_path, load_model, predict
from segexp.train import train

HC18_SIZE = (540, 800)  # (H, W) of an HC18 image


# drawn ellipses hold the pixels whose centres are inside: the moment fit sees the true axes, the
# contour (traced half-way between inside and outside pixel centres) about half a pixel more
OFFSETS = {"moment": 0.0, "contour": 0.5}


@pytest.mark.parametrize("method", ["moment", "contour"])
@pytest.mark.parametrize("ratio", [1.0, 0.75, 0.5])
@pytest.mark.parametrize("theta", [0.0, 0.6, -1.2])
@pytest.mark.parametrize("defects", [False, True])
def test_ellipse_fit_hc_within_half_a_percent(method, ratio, theta, defects):
    a, b = 170.0, 170.0 * ratio
    mask = ellipse_mask(Ellipse(400, 270, a, b, theta), HC18_SIZE)
    if defects:
        mask[250:290, 380:420] = False  # a hole inside the head (unfilled: +2% HC)
        mask[10:40, 10:60] = True  # a spurious blob elsewhere
    truth = ramanujan_perimeter(a, b) * 0.1
    assert hc_from_mask(mask, 0.1, OFFSETS[method], method) == pytest.approx(truth, rel=0.005)


def test_contour_fit_measures_a_head_cut_by_the_border_whole():
    a, b = 200.0, 140.0
    mask = ellipse_mask(
        Ellipse(400, 80, a, b, 0.2), HC18_SIZE
    )  # the top ~65 rows of the head are off the image
    truth = ramanujan_perimeter(a, b)
    assert hc_from_mask(mask, 1.0, 0.5, "contour") == pytest.approx(truth, rel=0.005)
    assert hc_from_mask(mask, 1.0, 0.0, "moment") < 0.99 * truth  # the moments see a cut head


def symmetric_net() -> torch.nn.Module:
    """A U-Net whose kernels are left-right symmetric: it commutes with the horizontal flip."""
    net = UNet(1, 1, features=(4, 8)).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    return net


@torch.no_grad()
def test_flip_tta_of_a_symmetric_input_equals_the_plain_prediction():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 48)
    symmetric = (x + x.flip(-1)) / 2
    net = symmetric_net()
    assert torch.allclose(flip_tta_logits(net, symmetric), net(symmetric), atol=1e-5)
    # any net: TTA of the mirrored image is the mirrored TTA (mirrored back inside)
    plain = UNet(1, 1, features=(4, 8)).eval()
    assert torch.allclose(
        flip_tta_logits(plain, x.flip(-1)), flip_tta_logits(plain, x).flip(-1), atol=1e-5
    )
    assert not torch.allclose(plain(x.flip(-1)), plain(x).flip(-1), atol=1e-3)


def test_non_square_size_flows_through_data_and_metrics(hc18_root):
    dm = SegDataModule(
        "hc18_synthetic", "hc18", str(hc18_root), 1, image_size=[32, 48], batch_size=4
    )
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (1, 32, 48) and batch["mask"].shape[1:] == (1, 32, 48)
    masks = np.asarray(dm.masks[dm.val_idx]).astype(bool)  # (N, 32, 48)
    sizes = dm.original_sizes[dm.val_idx]
    pixel = np.array([dm.cases[i].pixel_size_mm for i in dm.val_idx])
    hc = np.array([dm.cases[i].hc_mm for i in dm.val_idx])
    shifted = np.roll(masks, 1, axis=2)  # one model pixel to the right
    table = clinical_table(np.stack([shifted, masks], 1), sizes, pixel, masks, hc, 0.95)
    spacing_x = sizes[:, 1] / 48 * pixel  # mm per model pixel along x, not along y
    assert np.allclose(table.hd95_mm, spacing_x, rtol=1e-6)
    down = np.roll(masks, 1, axis=1)  # one model pixel down
    below = clinical_table(np.stack([down, masks], 1), sizes, pixel)
    assert np.allclose(below.hd95_mm, sizes[:, 0] / 32 * pixel, rtol=1e-6)
    # the truth at 32x48, measured back at 800x540: within the resolution's few mm
    assert table.hc_abs_error_mm.median() < 0.03 * np.median(hc)
    metrics = summarize(table.assign(dice=1.0, iou=1.0, accuracy=1.0), volumetric=False)
    assert metrics["val/hc_outliers_10mm"] == (table.hc_abs_error_mm > 10).sum()
    assert not table.hc_flag.any()  # validation heads within the training range (dm.hc_plausible)
    assert dm.hc_plausible["hc_mm"][0] < dm.hc_plausible["hc_mm"][1]


def test_hc_flag_marks_missing_and_implausible_heads():
    probability = np.zeros((2, 32, 48), np.float32)
    probability[0, 8:24, 12:36] = 1  # a plausible head
    probability[1, 15:17, 2:46] = 1  # a long thin streak: eccentricity near 1
    sizes, pixel = np.array([[540, 800]] * 2), np.array([0.1, 0.1])
    plausible = {"hc_mm": (50.0, 350.0), "eccentricity": (0.0, 0.9)}
    masks = np.stack([probability > 0.5] * 2, 1)
    table = clinical_table(masks, sizes, pixel, probability, None, 0.0, plausible=plausible)
    assert table.hc_flag.tolist() == [False, True] and "hc_error_mm" not in table
    assert table.hc_flag_reason[1].startswith("eccentricity") and "hc_range" not in table
    empty = clinical_table(masks[:1] * False, sizes[:1], pixel[:1], probability[:1] * 0)
    assert empty.hc_flag.tolist() == [True] and empty.hc_pred_mm.tolist() == [0.0]


def soft_head(k: float, size=(64, 96), semi_axes=(20.0, 28.0)) -> np.ndarray:
    """A head's probability map, sigmoid(k (1 - r)) with r = 1 on the ellipse: small k hesitates."""
    yy, xx = np.mgrid[: size[0], : size[1]].astype(np.float32)
    r = np.hypot((yy - size[0] / 2) / semi_axes[0], (xx - size[1] / 2) / semi_axes[1])
    return (1 / (1 + np.exp(-k * (1 - r)))).astype(np.float32)


def test_boundary_width_measures_the_hesitant_band_and_flags_that_head():
    original, pixel = (540, 800), 0.1
    for k in (4.0, 8.0):
        head = measure_hc(soft_head(k), original, pixel)
        # 0.1 < p < 0.9 is the ring 1 - ln 9 / k < r < 1 + ln 9 / k: area pi A B (4 ln 9 / k)
        a, b = 28.0 * 800 / 96, 20.0 * 540 / 64  # the semi-axes in original pixels
        expected = math.pi * a * b * 4 * math.log(9) / k / ramanujan_perimeter(a, b)
        assert head.boundary_width_px == pytest.approx(expected, rel=0.05), (k, head)
    maps = np.stack([soft_head(40.0)] * 9 + [soft_head(4.0)])  # nine confident, one hesitant
    masks = np.stack([maps > 0.5] * 2, 1)
    sizes, pixels = np.array([original] * 10), np.full(10, pixel)
    table = clinical_table(masks, sizes, pixels, maps)
    assert table.hc_flag.tolist() == [False] * 9 + [True]
    assert (table.hc_pred_mm - table.hc_pred_mm[0]).abs().max() < 0.02 * table.hc_pred_mm[0]
    # a run's stored limit decides alone: above every width, nothing is flagged
    relaxed = clinical_table(masks, sizes, pixels, maps, width_limit_px=1e6)
    assert not relaxed.hc_flag.any()


@pytest.mark.slow  # the real recipe's net at 128 px: ~13 s
def test_hc18_best_trains_one_epoch_and_predicts_with_flags(hc18_root, work_dir, client):
    cfg = make_cfg(
        work_dir,
        "experiment=hc18_best",
        "dataset=hc18_synthetic",
        f"dataset.root={hc18_root}",
        "dataset.image_size=[32,64]",
        "dataset.batch_size=4",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
    )
    assert cfg.evaluation.flip_tta and cfg.evaluation.single_object
    final = train(cfg)
    run = only_run(client, "hc18_synthetic")
    for key in ("val/hc_mae_mm", "val/hc_bias_mm", "val/hc_outliers_10mm", "val/hc_flagged"):
        assert key in run.data.metrics
    cases = pd.read_csv(
        client.download_artifacts(run.info.run_id, "evaluation/val_cases.csv", str(work_dir))
    )
    assert {"hc_error_mm", "hc_range", "eccentricity", "hc_flag"} <= set(cases.columns)
    assert final.metrics["val/hc_outliers_10mm_best"] == (cases.hc_abs_error_mm > 10).sum()
    ranges = pd.read_csv(
        client.download_artifacts(run.info.run_id, "evaluation/val_hc_ranges.csv", str(work_dir))
    )
    assert set(ranges.hc_range) == set(cases.hc_range) and ranges.images.sum() == len(cases)
    for name in ranges.hc_range:
        assert f"val/hc_mae_mm_{name}" in run.data.metrics, name
        assert (
            f"val/hc_bias_mm_{name}_best" in final.metrics
            and f"val/hc_outliers_10mm_{name}_best" in final.metrics
        )
        assert (
            final.metrics[f"val/hc_mae_mm_{name}_last"] == run.data.metrics[f"val/hc_mae_mm_{name}"]
        )
    # predict flags with the width limit of the validation epoch the best weights had
    evaluation = load_model(client, run.info.run_id)[2]  # what the checkpoint carries
    assert evaluation["flip_tta"] and evaluation["single_object"]
    limit = evaluation["hc_width_limit_px"]
    assert limit == pytest.approx(1.5 * cases.boundary_width_px.median())

    out, pixel_csv = work_dir / "submission.csv", work_dir / "pixel_size.csv"
    pixels = pd.read_csv(hc18_root / "test_set_pixel_size.csv")
    pixels.iloc[0, 1] *= 20  # as a head 20x larger (in mm) than its pixels show: above training
    pixels.to_csv(pixel_csv, index=False)
    table = predict(client, run.info.run_id, hc18_root / "test_set", pixel_csv, out)
    assert list(pd.read_csv(out).columns) == SUBMISSION_COLUMNS and len(table) == 3
    flags = pd.read_csv(flags_path(out), keep_default_na=False)
    assert list(flags.columns) == [
        "filename",
        "hc_mm",
        "hc_range",
        "eccentricity",
        "boundary_width_px",
        "hc_flag",
        "hc_flag_reason",
    ]
    assert flags.filename.tolist() == table.filename.tolist()
    assert all(math.isfinite(v) for v in flags.hc_mm)
    assert flags.hc_range.tolist() == [name or "" for name in range_names(flags.hc_mm)]
    lo, hi = evaluation["hc_plausible"]["hc_mm"]
    big = flags.iloc[0]
    assert big.hc_flag and big.hc_range == "gt300"
    assert f"(> 300 mm heads) outside the training range {lo:.0f}-{hi:.0f} mm" in big.hc_flag_reason


def test_a_config_stored_with_evaluation_settings_in_dataset_reads_them_in_evaluation(tmp_path):
    old = make_cfg(tmp_path, "experiment=hc18_best", f"dataset.root={tmp_path}")
    stored = OmegaConf.to_container(old, resolve=True)
    stored["dataset"].update(stored.pop("evaluation"))  # where runs kept them before the node
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    read = config.read_stored(tmp_path / "config.yaml", "run")
    assert read["evaluation"] == {
        "flip_tta": True,
        "single_object": True,
        "hc_ellipse_fit": "moment",
    }
    assert not {"flip_tta", "single_object", "hc_ellipse_fit"} & set(read["dataset"])
    SegDataModule(**{k: v for k, v in read["dataset"].items() if k != "_target_"})  # predict's way


def test_hc_agreement_figure_plots_each_image_and_the_bias():
    cases = pd.DataFrame({"hc_true_mm": [100.0, 200.0, 300.0], "hc_pred_mm": [102.0, 201.0, 303.0]})
    fig = report.hc_agreement_figure(cases)
    scatter, bland_altman = fig.axes
    assert scatter.collections[0].get_offsets().tolist() == [[100, 102], [200, 201], [300, 303]]
    assert (scatter.get_xlabel(), scatter.get_ylabel()) == (
        "reference HC (mm)",
        "predicted HC (mm)",
    )
    assert bland_altman.collections[0].get_offsets().tolist() == [[101, 2], [200.5, 1], [301.5, 3]]
    assert bland_altman.get_title() == "bias +2.00 mm"
    assert len(bland_altman.get_lines()) == 3  # the bias and its 95% limits of agreement
    plt.close(fig)

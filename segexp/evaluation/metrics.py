"""Segmentation metrics: overlap (Dice, IoU, accuracy, per volume), HD95, the largest component.

Empty-mask rule (LGG has many empty slices): when prediction and ground truth are both empty,
Dice and IoU are 1 (a correct "no lesion"); an empty truth with a non-empty prediction scores 0.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

LOWER_IS_BETTER = ("loss", "hd95", "mae", "error")  # words in a metric name: better when lower


def lower_is_better(metric: str) -> bool:
    """Whether a metric is better when lower: named like a loss, a distance or an error."""
    return any(word in metric for word in LOWER_IS_BETTER)


COUNT_COLUMNS = ["intersection", "pred_pixels", "true_pixels", "correct_pixels", "pixels"]


@torch.no_grad()
def overlap_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-case counts (N, 5) in COUNT_COLUMNS order, from logits and targets (N, 1, H, W)."""
    pred = logits > 0
    true = target > 0.5
    dims = tuple(range(1, pred.ndim))
    pixels = torch.full_like(pred.sum(dims), pred[0].numel())
    return torch.stack(
        [(pred & true).sum(dims), pred.sum(dims), true.sum(dims), (pred == true).sum(dims), pixels],
        dim=1,
    )


def dice_iou(intersection, pred_pixels, true_pixels):
    """Dice and IoU arrays with the empty-vs-empty = 1 rule."""
    intersection, total = (
        np.asarray(intersection, float),
        np.asarray(pred_pixels, float) + np.asarray(true_pixels, float),
    )
    union = total - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(total > 0, 2 * intersection / total, 1.0)
        iou = np.where(union > 0, intersection / union, 1.0)
    return dice, iou


def case_table(counts: np.ndarray, case_ids: list[str], groups: list[str]) -> pd.DataFrame:
    """One row per case: ids, counts, dice, iou, accuracy."""
    table = pd.DataFrame(np.asarray(counts, np.int64), columns=COUNT_COLUMNS)
    table.insert(0, "case_id", case_ids)
    table.insert(1, "group", groups)
    table["dice"], table["iou"] = dice_iou(table.intersection, table.pred_pixels, table.true_pixels)
    table["accuracy"] = table.correct_pixels / table.pixels
    return table


def volume_table(cases: pd.DataFrame) -> pd.DataFrame:
    """Per-group (patient) Dice from summed counts over its slices, plus pixel accuracy."""
    sums = cases.groupby("group", sort=True)[COUNT_COLUMNS].sum().reset_index()
    sums["dice"], sums["iou"] = dice_iou(sums.intersection, sums.pred_pixels, sums.true_pixels)
    sums["accuracy"] = sums.correct_pixels / sums.pixels
    sums["slices"] = cases.groupby("group", sort=True).size().to_numpy()
    return sums


def summarize(cases: pd.DataFrame, volumetric: bool) -> dict[str, float]:
    """Epoch metrics: mean per-case dice/iou/accuracy, and mean per-volume dice when volumetric."""
    metrics = {
        "val/dice": float(cases.dice.mean()),
        "val/iou": float(cases.iou.mean()),
        "val/accuracy": float(cases.accuracy.mean()),
    }
    if volumetric:
        metrics["val/dice_volume"] = float(volume_table(cases).dice.mean())
    for column in ("hd95_mm", "hd95_px"):
        if column in cases:
            metrics[f"val/{column}"] = float(cases[column].mean())
    if "hc_error_mm" in cases:
        metrics.update({f"val/{k}": v for k, v in hc_errors(cases).items()})
    if "hc_range" in cases:  # `val/hc_mae_mm_200_300`, ...; a range without images logs nothing
        for row in hc_range_table(cases).to_dict("records"):
            metrics.update({f"val/{k}_{row['hc_range']}": row[k] for k in HC_ERROR_METRICS})
    if "hc_flag" in cases:
        metrics["val/hc_flagged"] = float(cases.hc_flag.sum())
    return metrics


HC_ERROR_METRICS = ("hc_mae_mm", "hc_bias_mm", "hc_outliers_10mm")


def hc_errors(cases: pd.DataFrame) -> dict[str, float]:
    """HC_ERROR_METRICS of the cases' `hc_error_mm` (predicted - reference): MAE, bias, outliers."""
    errors = cases.hc_error_mm
    return {
        "hc_mae_mm": float(errors.abs().mean()),
        "hc_bias_mm": float(errors.mean()),
        # a count of images, not a share: "3 of 148 images are off by more than 10 mm"
        "hc_outliers_10mm": float((errors.abs() > 10).sum()),
    }


def hc_error_scales(cases: pd.DataFrame) -> dict[str, float]:
    """The MAE relative to the head (`hc_mae_pct`) and, with `pixel_size_mm`, in the original
    image's pixels (`hc_mae_px`): a range whose mm error grows only with its pixel size has the
    same px error as the others, and more resolution of the model would not shrink it."""
    errors = cases.hc_error_mm.abs()
    scales = {"hc_mae_pct": float((100 * errors / cases.hc_true_mm).mean())}
    if "pixel_size_mm" in cases:
        scales["hc_mae_px"] = float((errors / cases.pixel_size_mm).mean())
    return scales


def hc_mae_interval(cases: pd.DataFrame, level: float = 0.95) -> dict[str, float]:
    """How far the cases' HC MAE may be from the model's on such heads: a `level` confidence
    interval (`hc_mae_lo_mm`, `hc_mae_hi_mm`), nan with fewer than 3 exams.

    Images of one exam (`group`) share a head, so their errors are not independent: the
    standard error is clustered by exam and the t quantile has exams - 1 degrees of freedom.
    """
    import statsmodels.api as sm

    errors = cases.hc_error_mm.abs().to_numpy(float)
    exams = cases["group"] if "group" in cases else pd.Series(range(len(cases)))
    codes = pd.factorize(exams.astype(str))[0]
    if len(set(codes)) < 3:
        return {"hc_mae_lo_mm": math.nan, "hc_mae_hi_mm": math.nan}
    if np.ptp(errors) == 0:  # every error the same: no spread to estimate, the MAE is exact
        return {"hc_mae_lo_mm": float(errors[0]), "hc_mae_hi_mm": float(errors[0])}
    fit = sm.OLS(errors, np.ones((len(errors), 1))).fit(
        cov_type="cluster", cov_kwds={"groups": codes}, use_t=True
    )
    lo, hi = fit.conf_int(alpha=1 - level)[0]
    return {"hc_mae_lo_mm": float(max(lo, 0.0)), "hc_mae_hi_mm": float(hi)}


def hc_row(cases: pd.DataFrame) -> dict:
    """The image count, `hc_errors`, `hc_mae_interval`, `hc_error_scales` and, with `hc_flag`,
    the flagged count."""
    row = {"images": len(cases), **hc_errors(cases), **hc_mae_interval(cases)}
    row |= hc_error_scales(cases)
    if "hc_flag" in cases:
        row["hc_flagged"] = int(cases.hc_flag.sum())
    return row


def hc_range_table(cases: pd.DataFrame) -> pd.DataFrame:
    """One `hc_row` per head-size range that has images (`hc_range`), smallest heads first."""
    # sorted by reference HC, groups come in order of their smallest head
    groups = cases.sort_values("hc_true_mm").groupby("hc_range", sort=False)
    return pd.DataFrame([{"hc_range": name, **hc_row(group)} for name, group in groups])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a binary mask, holes filled (empty stays empty)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(mask.shape, bool)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.binary_fill_holes(largest)


def hd95(pred: np.ndarray, true: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th-percentile symmetric Hausdorff distance between mask boundaries, in `spacing` units.

    0 when both masks are empty; the image diagonal (the worst possible) when exactly one is.
    """
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if not pred.any() and not true.any():
        return 0.0
    if not pred.any() or not true.any():
        return float(math.hypot(pred.shape[0] * spacing[0], pred.shape[1] * spacing[1]))

    def border(m):
        return m & ~ndimage.binary_erosion(m)

    bp, bt = border(pred), border(true)
    to_true = ndimage.distance_transform_edt(~bt, sampling=spacing)[bp]
    to_pred = ndimage.distance_transform_edt(~bp, sampling=spacing)[bt]
    return float(np.percentile(np.concatenate([to_true, to_pred]), 95))

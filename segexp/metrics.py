"""Segmentation metrics: overlap (Dice, IoU, accuracy, per volume), HD95, head circumference.

Empty-mask rule (LGG has many empty slices): when prediction and ground truth are both empty,
Dice and IoU are 1 (a correct "no lesion"); an empty truth with a non-empty prediction scores 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

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
        metrics["val/hc_mae_mm"] = float(cases.hc_abs_error_mm.mean())
        metrics["val/hc_bias_mm"] = float(cases.hc_error_mm.mean())
    return metrics


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ellipse perimeter from semi-axes a, b (Ramanujan's second approximation)."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


@dataclass(frozen=True)
class Ellipse:
    """Centre (x, y), semi-axes a >= b and angle of the a axis from +x (y down), in pixels/radians."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a binary mask, holes filled (empty stays empty)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(mask.shape, bool)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return ndimage.binary_fill_holes(largest)


def ellipse_from_mask(mask: np.ndarray, boundary_offset_px: float = 0.0) -> Ellipse | None:
    """The ellipse of the largest component, from its second moments; None for an empty mask.

    A filled region's second moments give its semi-axes exactly (a = 2 sqrt(eigenvalue)), with
    no contour-tracing bias. `boundary_offset_px` is how far the masks extend beyond the ellipse
    the reference measures (the annotation stroke): it is subtracted from both semi-axes.
    """
    region = largest_component(np.asarray(mask) > 0)
    ys, xs = np.nonzero(region)
    if len(xs) < 5:
        return None
    cx, cy = xs.mean(), ys.mean()
    cov = np.cov(np.stack([xs - cx, ys - cy]), bias=True)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    a = 2 * math.sqrt(max(eigenvalues[1], 0.0)) - boundary_offset_px
    b = 2 * math.sqrt(max(eigenvalues[0], 0.0)) - boundary_offset_px
    angle = math.atan2(eigenvectors[1, 1], eigenvectors[0, 1])
    angle = (angle + math.pi / 2) % math.pi - math.pi / 2  # the axis, not its direction
    return Ellipse(float(cx), float(cy), max(a, 0.0), max(b, 0.0), angle)


def hc_from_mask(mask: np.ndarray, pixel_size_mm: float, boundary_offset_px: float = 0.0) -> float:
    """Head circumference in mm of a binary mask at the image's original resolution.

    Largest component, holes filled, moment ellipse, Ramanujan perimeter, times the pixel size.
    An empty mask (no head found) measures 0 mm.
    """
    ellipse = ellipse_from_mask(mask, boundary_offset_px)
    return 0.0 if ellipse is None else ramanujan_perimeter(ellipse.a, ellipse.b) * pixel_size_mm


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


def clinical_table(
    masks: np.ndarray,
    original_sizes: np.ndarray | None = None,
    pixel_sizes: np.ndarray | None = None,
    probabilities: np.ndarray | None = None,
    hc_true: np.ndarray | None = None,
    boundary_offset_px: float = 0.0,
) -> pd.DataFrame:
    """Per-case HD95 and, with probabilities and reference HC, head circumference columns.

    Args:
        masks: (N, 2, S, S) bool, predicted and true masks at the model's resolution.
        original_sizes: (N, 2) (H, W) on disk; with pixel_sizes, HD95 is in mm, else in pixels.
        probabilities: (N, S, S) foreground probabilities, resized to the original size and
            thresholded at 0.5 before HC is measured there.
    """
    size = masks.shape[-1]
    table = pd.DataFrame(index=range(len(masks)))
    in_mm = pixel_sizes is not None and original_sizes is not None
    spacings = (
        (np.asarray(original_sizes) / size) * np.asarray(pixel_sizes)[:, None]
        if in_mm
        else np.ones((len(masks), 2))
    )
    table["hd95_mm" if in_mm else "hd95_px"] = [
        hd95(m[0], m[1], tuple(sp)) for m, sp in zip(masks, spacings, strict=True)
    ]
    if probabilities is not None and hc_true is not None:
        import cv2

        predicted = []
        for prob, (h, w), pixel_mm in zip(probabilities, original_sizes, pixel_sizes, strict=True):
            full = (
                cv2.resize(
                    np.asarray(prob, np.float32), (int(w), int(h)), interpolation=cv2.INTER_LINEAR
                )
                >= 0.5
            )
            predicted.append(hc_from_mask(full, float(pixel_mm), boundary_offset_px))
        table["pixel_size_mm"] = pixel_sizes
        table["hc_true_mm"] = hc_true
        table["hc_pred_mm"] = predicted
        table["hc_error_mm"] = table.hc_pred_mm - table.hc_true_mm
        table["hc_abs_error_mm"] = table.hc_error_mm.abs()
    return table

"""Segmentation metrics from logits: per-case overlap counts, Dice, IoU, accuracy, per-volume Dice.

Empty-mask rule (LGG has many empty slices): when prediction and ground truth are both empty,
Dice and IoU are 1 (a correct "no lesion"); an empty truth with a non-empty prediction scores 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

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
    return metrics

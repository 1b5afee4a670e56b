"""`segexp predict`: a run's (or registered model's) best weights on new images, as an HC18
challenge submission CSV."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from PIL import Image

from segexp import tracking
from segexp.data import SegDataModule, scan_listed
from segexp.evaluation import flag_reasons, measure_hc, range_names, width_limit
from segexp.models import build_net, flip_tta_logits, load_checkpoint, registry

SUBMISSION_COLUMNS = [
    "filename",
    "center_x_mm",
    "center_y_mm",
    "semi_axes_a_mm",
    "semi_axes_b_mm",
    "angle_rad",
]


def model_from_checkpoint(cfg: dict, path, name: str) -> tuple[torch.nn.Module, dict, dict]:
    """The network of a stored config (targets checked) with a checkpoint's weights (no pickle)."""
    cfg = OmegaConf.create(cfg)
    checkpoint = load_checkpoint(path, ["state_dict"], name)
    net = build_net(cfg.model)
    net.load_state_dict(
        {
            k.removeprefix("net."): v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith("net.")
        }
    )
    # runs from before flip TTA and plausibility ranges: plain prediction, nothing flagged
    evaluation = checkpoint.get("segexp_evaluation") or {}
    return net.eval(), cfg, evaluation


def load_model(client, ref: str) -> tuple[torch.nn.Module, dict, dict]:
    """The network of a run id or a `models:/NAME/VERSION` URI, its config, its evaluation."""
    if ref.startswith("models:/"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg, weights = registry.model_files(client, ref, Path(tmp))
            return model_from_checkpoint(cfg, weights, f"weights.pt of {ref}")
    cfg = tracking.stored_config(client, ref)  # data: targets checked
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(ref, "checkpoints/best.ckpt", tmp)
        return model_from_checkpoint(cfg, path, f"checkpoints/best.ckpt of run {ref}")


def measure_cases(net, cfg, evaluation: dict, cases: list) -> tuple[list, list]:
    """Per case its mask at the image's size (uint8 0/1) and its head where the pixel size is
    known (else None)."""
    probabilities, sizes = run_probabilities(net, cfg, cases, evaluation.get("flip_tta", False))
    offset = cfg.dataset.get("hc_boundary_offset_px") or 0.0
    method = evaluation.get("hc_ellipse_fit", "moment")
    masks, heads = [], []
    for case, prob, (h, w) in zip(cases, probabilities, sizes, strict=True):
        full = cv2.resize(prob, (int(w), int(h)), interpolation=cv2.INTER_LINEAR) >= 0.5
        masks.append(full.astype(np.uint8))
        mm = case.pixel_size_mm
        heads.append(measure_hc(prob, (int(h), int(w)), mm, offset, method) if mm else None)
    return masks, heads


def flags_path(out: Path) -> Path:
    """The side CSV next to the submission: `submission.csv` -> `submission_flags.csv`."""
    out = Path(out)
    return out.with_name(f"{out.stem}_flags.csv")


@torch.no_grad()
def run_probabilities(net, cfg, cases: list, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w) probabilities of `cases`, preprocessed as the run's data, and (N, 2) sizes."""
    # the run's own preprocessing (size, channels, normalisation), through its DataModule
    args = OmegaConf.to_container(cfg.dataset, resolve=True)
    args.pop("_target_", None)
    loader = SegDataModule(**args).loader_of(cases, cache=False)
    probabilities = torch.cat(
        [
            torch.sigmoid(flip_tta_logits(net, b["image"]) if flip else net(b["image"]))[:, 0]
            for b in loader
        ]
    ).numpy()
    return probabilities, loader.dataset.original_sizes


def flag_table(filenames: list[str], measured: list, evaluation: dict) -> pd.DataFrame:
    """Per image the HC, its head-size range, eccentricity, boundary width, `hc_flag` and
    `hc_flag_reason` (see `predict`)."""
    # the run's validation limit; a run from before it: these images' own (unsupervised)
    limit = evaluation.get("hc_width_limit_px") or width_limit(
        [m.boundary_width_px for m in measured]
    )
    reasons = flag_reasons(measured, evaluation.get("hc_plausible"), limit)
    hc = [m.hc_mm for m in measured]
    return pd.DataFrame(
        {
            "filename": filenames,
            "hc_mm": hc,
            "hc_range": range_names(hc),  # by the predicted HC; empty where no head
            "eccentricity": [m.eccentricity for m in measured],
            "boundary_width_px": [m.boundary_width_px for m in measured],
            "hc_flag": [bool(reason) for reason in reasons],
            "hc_flag_reason": reasons,
        }
    )


def predict(
    client, run_id: str, images_dir: Path, pixel_csv: Path, out: Path, masks_dir: Path | None = None
) -> pd.DataFrame:
    """Write the submission CSV of a run id or `models:/NAME/VERSION` (the 6 official columns; zeros where no head was found).

    Beside it, `flags_path(out)` lists per image the HC in mm, its head-size range (`hc_range`,
    `segexp.evaluation.HEAD_SIZE_RANGES`), the eccentricity, the boundary width and `hc_flag`:
    True where no plausible, confident ellipse was found (no head, HC or eccentricity outside the
    range of the run's training masks, or a boundary wider than the run's validation limit), i.e.
    the predictions to check by hand; `hc_flag_reason` says why, naming an out-of-range head's
    size range (`segexp.evaluation.flag_reasons`).
    """
    net, cfg, evaluation = load_model(client, run_id)
    cases = scan_listed(images_dir, pixel_csv)
    masks, measured = measure_cases(net, cfg, evaluation, cases)
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for case, mask, head in zip(cases, masks, measured, strict=True):
        if masks_dir is not None:
            Image.fromarray(mask * 255).save(Path(masks_dir) / f"{case.case_id}_mask.png")
        mm, e = case.pixel_size_mm, head.ellipse
        values = (0.0,) * 5 if e is None else (e.cx * mm, e.cy * mm, e.a * mm, e.b * mm, e.angle)
        rows.append([Path(case.image).name, *values])
    table = pd.DataFrame(rows, columns=SUBMISSION_COLUMNS)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, quoting=csv.QUOTE_MINIMAL)
    flag_table(list(table.filename), measured, evaluation).to_csv(flags_path(out), index=False)
    return table

"""`segexp predict`: a run's best checkpoint on new images, as an HC18 challenge submission CSV."""

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
from torch.utils.data import DataLoader

from segexp.cases import Case, DataError
from segexp.data import SegDataset, load_arrays, volume_stats
from segexp.metrics import ellipse_from_mask

SUBMISSION_COLUMNS = [
    "filename",
    "center_x_mm",
    "center_y_mm",
    "semi_axes_a_mm",
    "semi_axes_b_mm",
    "angle_rad",
]


def image_cases(images_dir: Path, pixel_csv: Path) -> list[Case]:
    """One case per row of an HC18-style pixel-size CSV (`filename`, `pixel size(mm)`)."""
    table = pd.read_csv(pixel_csv)
    table.columns = [c.strip() for c in table.columns]
    if not {"filename", "pixel size(mm)"} <= set(table.columns):
        raise DataError(
            pixel_csv, [(str(pixel_csv), "needs columns 'filename' and 'pixel size(mm)'")]
        )
    cases, problems = [], []
    for _, row in table.iterrows():
        path = Path(images_dir) / str(row["filename"]).strip()
        if not path.is_file():
            problems.append((str(path), f"listed in {Path(pixel_csv).name} but no such image"))
            continue
        cases.append(
            Case(path.stem, path.stem, str(path), pixel_size_mm=float(row["pixel size(mm)"]))
        )
    if problems:
        raise DataError(images_dir, problems)
    return cases


def load_run_model(client, run_id: str) -> tuple[torch.nn.Module, dict]:
    """The network of a run with its best weights, and the run's resolved config."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
        checkpoint = torch.load(
            client.download_artifacts(run_id, "checkpoints/best.ckpt", tmp),
            map_location="cpu",
            weights_only=True,
        )
    from segexp.models import build_net

    net = build_net(cfg.model)
    net.load_state_dict(
        {
            k.removeprefix("net."): v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith("net.")
        }
    )
    return net.eval(), cfg


@torch.no_grad()
def predict(
    client, run_id: str, images_dir: Path, pixel_csv: Path, out: Path, masks_dir: Path | None = None
) -> pd.DataFrame:
    """Write the submission CSV (one row per image; zeros where no head was found)."""
    net, cfg = load_run_model(client, run_id)
    cases = image_cases(images_dir, pixel_csv)
    size, channels = cfg.dataset.image_size, cfg.dataset.channels
    images, _, original_sizes = load_arrays(cases, size, channels, entry=None)
    stats = (
        volume_stats(images, [c.group for c in cases])
        if cfg.dataset.normalize == "volume"
        else None
    )
    loader = DataLoader(
        SegDataset(images, None, cases, range(len(cases)), stats=stats), batch_size=16
    )
    offset = cfg.dataset.get("hc_boundary_offset_px") or 0.0
    probabilities = torch.cat(
        [torch.sigmoid(net(batch["image"]))[:, 0] for batch in loader]
    ).numpy()
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for case, prob, (h, w) in zip(cases, probabilities, original_sizes, strict=True):
        mask = cv2.resize(prob, (int(w), int(h)), interpolation=cv2.INTER_LINEAR) >= 0.5
        if masks_dir is not None:
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                Path(masks_dir) / f"{case.case_id}_mask.png"
            )
        e = ellipse_from_mask(mask, offset)
        mm = case.pixel_size_mm
        values = (0.0,) * 5 if e is None else (e.cx * mm, e.cy * mm, e.a * mm, e.b * mm, e.angle)
        rows.append([Path(case.image).name, *values])
    table = pd.DataFrame(rows, columns=SUBMISSION_COLUMNS)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, quoting=csv.QUOTE_MINIMAL)
    return table

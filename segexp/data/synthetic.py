"""Synthetic datasets written in the exact on-disk layouts of HC18 and LGG (`kaggle_3m`).

The loaders in `segexp.data` read these exactly as they read the real data, so tests and the
demo exercise the real code path. Ground truth is known analytically (ellipse parameters, HC).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw

from segexp.evaluation import ramanujan_perimeter

HC18_SIZE = (540, 800)  # (H, W) of every official HC18 image
LGG_INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")


def _speckle(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Multiplicative Rayleigh speckle, spatially correlated like ultrasound."""
    noise = rng.rayleigh(1.0, size=shape)
    return ndimage.gaussian_filter(noise, sigma) / ndimage.gaussian_filter(np.ones(shape), sigma)


def _hc18_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One ultrasound-like image (H, W) uint8, its 1-px outline annotation, and the ellipse."""
    h, w = HC18_SIZE
    # whole pixels, because the annotation is drawn with integer centre and radii
    a = float(round(rng.uniform(70, 230)))  # semi-axis along the rotated x direction
    b = float(round(a * rng.uniform(0.72, 0.95)))
    theta = rng.uniform(0, math.pi)
    cy = float(round(rng.uniform(0.35, 0.65) * h))
    cx = float(round(rng.uniform(0.3, 0.7) * w))

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(theta) + dy * math.sin(theta)
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1.0 on the ellipse

    thickness = rng.uniform(0.03, 0.07)
    skull = np.exp(-(((r - 1 - thickness / 2) / (thickness / 2)) ** 2))
    # inside: mid-gray brain with the bright midline echo along the major axis
    midline = np.exp(-((v / (0.02 * b)) ** 2)) * (np.abs(u) < 0.8 * a)
    brain = 0.32 + 0.06 * np.sin(5 * u / a + rng.uniform(0, 6)) + 0.35 * midline
    # outside: dark amniotic fluid around the head, brighter uterine tissue further out
    fluid_width = rng.uniform(0.1, 0.4)
    tissue = np.where(r < 1 + thickness + fluid_width, 0.06, 0.3 + 0.1 * np.sin(yy / 37 + xx / 53))
    signal = np.where(r < 1, brain, tissue) + 0.75 * skull
    # the fan-shaped field of view of a curvilinear probe
    angle = np.arctan2(xx - w / 2, yy + 0.6 * h)
    fan = (np.abs(angle) < 0.62).astype(np.float64)
    img = signal * _speckle(rng, (h, w), 1.2) * fan * 190
    img = np.clip(img + rng.normal(0, 4, (h, w)), 0, 255).astype(np.uint8)

    annotation = np.zeros((h, w), np.uint8)
    # skimage takes (row radius, column radius) = (b, a) and the same rotation sense as ours
    rr, cc = draw.ellipse_perimeter(int(cy), int(cx), int(b), int(a), theta, shape=(h, w))
    annotation[rr, cc] = 255
    return img, annotation, (cx, cy, a, b, theta)


def make_hc18(out: Path, n: int = 100, seed: int = 0, n_test: int | None = None) -> Path:
    """Write a synthetic HC18 set: training_set/, test_set/ and the two CSVs (official layout)."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "training_set").mkdir(parents=True, exist_ok=True)
    (out / "test_set").mkdir(parents=True, exist_ok=True)
    names, exam = [], 0
    while len(names) < n:
        names.append(f"{exam:03d}_HC")
        repeats = rng.choice([0, 1, 2], p=[0.75, 0.2, 0.05])  # `_2HC`, `_3HC` as in HC18
        names += [f"{exam:03d}_{k + 2}HC" for k in range(repeats)]
        exam += 1
    names = names[:n]

    with open(out / "training_set_pixel_size_and_HC.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "pixel size(mm)", "head circumference (mm)"])
        for name in names:
            img, annotation, (_, _, a, b, _) = _hc18_image(rng)
            pixel_mm = rng.uniform(0.052, 0.326)
            Image.fromarray(img).save(out / "training_set" / f"{name}.png")
            Image.fromarray(annotation).save(out / "training_set" / f"{name}_Annotation.png")
            writer.writerow(
                [f"{name}.png", f"{pixel_mm:.9f}", f"{ramanujan_perimeter(a, b) * pixel_mm:.2f}"]
            )

    n_test = max(2, n // 10) if n_test is None else n_test
    with open(out / "test_set_pixel_size.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "pixel size(mm)"])
        for i in range(n_test):
            img, _, _ = _hc18_image(rng)
            Image.fromarray(img).save(out / "test_set" / f"{i:03d}_HC.png")
            writer.writerow([f"{i:03d}_HC.png", f"{rng.uniform(0.052, 0.326):.9f}"])
    return out


def _lgg_patient(
    rng: np.random.Generator, n_slices: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One MRI volume (S, H, W, 3) uint8 (pre-contrast, FLAIR, post-contrast) and masks (S, H, W)."""
    z, y, x = np.mgrid[0:n_slices, 0:size, 0:size].astype(np.float32)
    zc = (z - (n_slices - 1) / 2) / (n_slices / 2)  # -1..1 through the head
    yc, xc = (y - size / 2) / (size / 2), (x - size / 2) / (size / 2)
    head_r = np.sqrt(np.clip(1 - zc**2, 0, 1)) * rng.uniform(0.7, 0.85)
    r = np.sqrt((xc / 0.85) ** 2 + yc**2)
    brain = r < head_r
    skull = (r >= head_r) & (r < head_r + 0.06)

    # lesion: an ellipsoid blob spanning consecutive slices, off-centre in one hemisphere
    lz = rng.uniform(-0.45, 0.45)
    lr = rng.uniform(0.08, 0.25, size=3)  # radii in z, y, x (normalised units)
    ly, lx = rng.uniform(-0.35, 0.35, size=2)
    d = np.sqrt(
        ((zc - lz) / (lr[0] * 2.5)) ** 2 + ((yc - ly) / lr[1]) ** 2 + ((xc - lx) / lr[2]) ** 2
    )
    wobble = ndimage.gaussian_filter(rng.normal(0, 1, d.shape).astype(np.float32), 3) * 0.6
    lesion = (d + wobble < 1) & brain

    texture = ndimage.gaussian_filter(
        rng.normal(0, 1, (n_slices, size, size)).astype(np.float32), (0, 2, 2)
    )
    channels = []
    for base, lesion_gain in ((0.45, -0.08), (0.4, 0.35), (0.42, 0.12)):
        c = base * brain + 0.75 * skull + lesion_gain * lesion + 0.05 * texture * brain
        c = ndimage.gaussian_filter(c, (0, 0.8, 0.8))
        c = c * rng.uniform(0.8, 1.2) + rng.normal(0, 0.015, c.shape)
        channels.append(c)
    volume = np.clip(np.stack(channels, axis=-1) * 255, 0, 255).astype(np.uint8)
    return volume, lesion.astype(np.uint8) * 255


def make_lgg(
    out: Path,
    n: int = 10,
    seed: int = 0,
    size: int = 256,
    slices: tuple[int, int] = (20, 88),
) -> Path:
    """Write a synthetic LGG set in the `kaggle_3m` layout: one folder per patient, .tif slices."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    used = set()
    while len(used) < n:
        pid = (
            f"TCGA_{rng.choice(LGG_INSTITUTIONS)}_{rng.integers(1000, 9999)}_"
            f"{rng.integers(1995, 2001)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
        )
        if pid in used:
            continue
        used.add(pid)
        n_slices = int(rng.integers(slices[0], slices[1] + 1))
        volume, masks = _lgg_patient(rng, n_slices, size)
        folder = out / pid
        folder.mkdir(exist_ok=True)
        for i in range(n_slices):
            Image.fromarray(volume[i]).save(folder / f"{pid}_{i + 1}.tif")
            Image.fromarray(masks[i]).save(folder / f"{pid}_{i + 1}_mask.tif")
        rows.append(
            [pid, int(rng.integers(1, 4)), int((masks.reshape(n_slices, -1) > 0).any(1).sum())]
        )
    with open(out / "data.csv", "w", newline="") as f:  # like kaggle_3m's: the loaders ignore it
        writer = csv.writer(f)
        writer.writerow(["Patient", "tumor_grade", "lesion_slices"])
        writer.writerows(rows)
    return out

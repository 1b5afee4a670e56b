"""Ellipse geometry: fits from a mask's moments or from points, perimeter, eccentricity, filling.

Coordinates are pixels, x to the right and y down; angles are radians from +x.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .metrics import largest_component


@dataclasses.dataclass(frozen=True)
class Ellipse:
    """Centre (x, y), semi-axes a >= b and angle of the a axis from +x (y down), in pixels/radians."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float

    def shrunk(self, by_px: float) -> Ellipse:
        """Both semi-axes `by_px` shorter, never below 0."""
        return dataclasses.replace(self, a=max(self.a - by_px, 0.0), b=max(self.b - by_px, 0.0))


def axis_angle(angle: float) -> float:
    """`angle` in [-pi/2, pi/2): the direction of an axis, not which way along it."""
    return float((angle + math.pi / 2) % math.pi - math.pi / 2)


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ellipse perimeter from semi-axes a, b (Ramanujan's second approximation)."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def eccentricity(ellipse: Ellipse) -> float:
    """sqrt(1 - b^2 / a^2): 0 for a circle, towards 1 for a flat ellipse."""
    return math.sqrt(max(0.0, 1 - (ellipse.b / ellipse.a) ** 2)) if ellipse.a > 0 else 1.0


def moment_ellipse(xs: np.ndarray, ys: np.ndarray) -> Ellipse:
    """The ellipse with the second moments of the points (xs, ys): a = 2 sqrt(larger eigenvalue).

    Exact for the pixels of a whole filled ellipse, with no contour-tracing bias.
    """
    cx, cy = xs.mean(), ys.mean()
    cov = np.cov(np.stack([xs - cx, ys - cy]), bias=True)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    a = 2 * math.sqrt(max(eigenvalues[1], 0.0))
    b = 2 * math.sqrt(max(eigenvalues[0], 0.0))
    angle = axis_angle(math.atan2(eigenvectors[1, 1], eigenvectors[0, 1]))
    return Ellipse(float(cx), float(cy), a, b, angle)


def fit_ellipse(points: np.ndarray) -> Ellipse | None:
    """Least-squares ellipse through (K, 2) float points (x, y) (`skimage.measure.EllipseModel`).

    None when the fit fails.
    """
    from skimage import measure

    model = measure.EllipseModel.from_estimate(points)
    if not model:  # falsy when the fit failed
        return None
    (cx, cy), axes = model.center, model.axis_lengths
    angle = model.theta if axes[0] >= axes[1] else model.theta + math.pi / 2
    return Ellipse(float(cx), float(cy), float(max(axes)), float(min(axes)), axis_angle(angle))


def ellipse_mask(ellipse: Ellipse, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels whose centres lie inside `ellipse`."""
    from skimage import draw

    mask = np.zeros(shape, bool)
    # skimage.draw.ellipse's rotation turns the other way round (rows, cols) from the angle
    e = ellipse
    rr, cc = draw.ellipse(e.cy, e.cx, e.b, e.a, shape=shape, rotation=-e.angle)
    mask[rr, cc] = True
    return mask


def ellipse_from_mask(
    mask: np.ndarray, boundary_offset_px: float = 0.0, method: str = "moment"
) -> Ellipse | None:
    """The ellipse of the largest component (holes filled); None for an empty mask.

    `moment`: `moment_ellipse` of the filled region's pixels. `contour`: `fit_ellipse` of the
    region's outer contour without the points that lie on the image border, so a head cut by the
    border is still measured whole. `boundary_offset_px` is how far the masks extend beyond the
    ellipse the reference measures (the annotation stroke): it is subtracted from both semi-axes.
    """
    if method not in ("moment", "contour"):
        raise ValueError(f"ellipse fit method must be 'moment' or 'contour', got {method!r}")
    region = largest_component(np.asarray(mask) > 0)
    ys, xs = np.nonzero(region)
    if len(xs) < 5:
        return None
    fitted = _contour_ellipse(region) if method == "contour" else None
    if fitted is None:  # the moments, also where a contour fit failed
        fitted = moment_ellipse(xs, ys)
    return fitted.shrunk(boundary_offset_px)


def _contour_ellipse(region: np.ndarray) -> Ellipse | None:
    """`fit_ellipse` of the outer contour of a filled region off the image border, or None."""
    from skimage import measure

    h, w = region.shape
    # padded: a region touching the border still has a closed contour; (row, col) + 1 offset
    contour = max(measure.find_contours(np.pad(region, 1).astype(np.float32), 0.5), key=len) - 1
    rows, cols = contour[:, 0], contour[:, 1]
    inside = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)  # not the image's edge
    if inside.sum() < 10:
        return None
    e = fit_ellipse(np.column_stack([cols[inside], rows[inside]]))
    if e is None or not all(math.isfinite(v) for v in (e.cx, e.cy, e.a, e.b)):
        return None
    return None if e.a > 4 * max(h, w) else e

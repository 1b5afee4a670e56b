"""Evaluation: overlap metrics, HD95, ellipse fits and head circumference of predicted masks."""

from .ellipse import (
    Ellipse,
    eccentricity,
    ellipse_from_mask,
    ellipse_mask,
    fit_ellipse,
    moment_ellipse,
    ramanujan_perimeter,
)
from .hc import (
    clinical_table,
    hc_from_mask,
    head_flags,
    measure_hc,
    pixel_spacings,
    shape_ranges,
    width_limit,
)
from .metrics import (
    case_table,
    hd95,
    largest_component,
    lower_is_better,
    overlap_counts,
    summarize,
    volume_table,
)

__all__ = [
    "lower_is_better",
    "case_table",
    "hd95",
    "largest_component",
    "overlap_counts",
    "summarize",
    "volume_table",
    "Ellipse",
    "eccentricity",
    "ellipse_from_mask",
    "ellipse_mask",
    "fit_ellipse",
    "moment_ellipse",
    "ramanujan_perimeter",
    "clinical_table",
    "hc_from_mask",
    "head_flags",
    "measure_hc",
    "pixel_spacings",
    "shape_ranges",
    "width_limit",
]

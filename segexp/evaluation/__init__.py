"""Evaluation: overlap metrics, HD95 and head circumference from predicted masks."""

from .hc import (
    clinical_table,
    ellipse_from_mask,
    hc_from_mask,
    head_flags,
    measure_hc,
    ramanujan_perimeter,
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
    "clinical_table",
    "ellipse_from_mask",
    "hc_from_mask",
    "head_flags",
    "measure_hc",
    "ramanujan_perimeter",
    "shape_ranges",
    "width_limit",
]

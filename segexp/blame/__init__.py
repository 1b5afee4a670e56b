"""Blame: which of the changes between two runs moved the metric, by how much, beyond noise."""

from .analysis import analyze, from_table, headline, path_analysis, seeds_decision, write_report
from .command import blame
from .designs import letters, make_design, path_next, path_steps, seed_rounds
from .factors import Change, from_choices, from_leaves
from .ols import estimate, model

__all__ = [
    "letters",
    "make_design",
    "path_next",
    "path_steps",
    "seed_rounds",
    "Change",
    "from_choices",
    "from_leaves",
    "estimate",
    "model",
    "analyze",
    "from_table",
    "headline",
    "path_analysis",
    "seeds_decision",
    "write_report",
    "blame",
]

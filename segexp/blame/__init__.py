"""Blame: which of the changes between two runs moved the metric, by how much, beyond noise."""

from .ablation import path_analysis
from .analysis import Analysis, LeftOut, Takeoff, analyze, seeds_decision
from .command import BlameResult, blame
from .designs import letters, make_design, path_next, path_steps, seed_rounds
from .factors import Change, from_choices, from_leaves
from .ols import estimate, model
from .plan import Plan
from .report import headline, note, write_csv, write_report
from .robust import Screen, screen
from .tables import from_table

__all__ = [
    "BlameResult",
    "Plan",
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
    "Analysis",
    "LeftOut",
    "Takeoff",
    "Screen",
    "screen",
    "analyze",
    "from_table",
    "headline",
    "note",
    "write_csv",
    "path_analysis",
    "seeds_decision",
    "write_report",
    "blame",
]

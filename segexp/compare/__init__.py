"""Compare: runs side by side with their curves, a sweep's summary (folds pooled as a
cross-validation), and the importance of swept parameters (ANOVA over a grid,
optuna.importance over a search: `effects` picks by the parent)."""

from .crossval import CrossValidation, cross_validation, is_cross_validation
from .importance import importance_table, marginal_means, plot_marginal_means
from .runs import (
    by_replicates,
    compare,
    expand,
    plot_runs,
    ranked,
    runs_table,
    show,
)
from .search import SearchImportance, effects, search_importance
from .summary import write_summary

__all__ = [
    "importance_table",
    "marginal_means",
    "plot_marginal_means",
    "by_replicates",
    "compare",
    "effects",
    "expand",
    "plot_runs",
    "ranked",
    "runs_table",
    "show",
    "SearchImportance",
    "search_importance",
    "CrossValidation",
    "cross_validation",
    "is_cross_validation",
    "write_summary",
]

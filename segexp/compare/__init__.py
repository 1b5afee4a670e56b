"""Compare: runs side by side with their curves, and the importance of swept parameters."""

from .importance import importance_table, marginal_means, plot_marginal_means
from .runs import (
    by_replicates,
    compare,
    effects,
    expand,
    plot_runs,
    ranked,
    runs_table,
    show,
)

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
]

"""Figures shared by run reports, `segexp compare` and `segexp blame`: headless, epoch-aware."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI

# 12 colours that stay apart on screen and in print (tab10 plus two darker ones), each run also
# gets its own marker and line style, so lines that overlap remain tellable apart.
COLORS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939",
]  # fmt: skip
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]
LINESTYLES = ["-", "--", "-.", ":"]


def figure(rows: int = 1, cols: int = 1, **kwargs):
    """`plt.subplots` on the Agg backend: (fig, axes)."""
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt.subplots(rows, cols, **kwargs)


def save(fig, path: Path) -> Path:
    """Write the figure as PNG and free it (long sweeps make many)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def epoch_axis(ax, label: str = "epoch") -> None:
    """Label the x axis `epoch` with integer ticks only (epochs are whole numbers)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def run_styles(n: int) -> list[dict]:
    """`n` distinct (color, marker, linestyle) styles for `ax.plot(**style)`."""
    styles = itertools.cycle(
        {"color": c, "marker": m, "linestyle": LINESTYLES[i // len(COLORS) % len(LINESTYLES)]}
        for i, (c, m) in enumerate(zip(COLORS * 4, MARKERS * 4, strict=True))
    )
    return [next(styles) for _ in range(n)]

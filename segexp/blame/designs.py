"""Which cells to train for `segexp blame`: two-level designs between run A (all 0) and run B (all 1).

A cell is a tuple of 0/1 levels, one per changed key (0 = A's value, 1 = B's). Full factorials for
few changes, regular fractional factorials of resolution IV or higher for 5 to 8, the adaptive
ablation path (Fawcett & Hoos 2016) and the one-at-a-time design (each change alone) on request. The path is
adaptive: `path_next` says which cells to train next; ablation.path_analysis reads it.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

KINDS = ("auto", "full", "fractional", "path", "oat")
ALIASES = {"factorial": "full"}  # other names `--design` accepts

# Minimum-aberration generators (Montgomery, Design and Analysis of Experiments, table 8.14):
# the generated factor's column is the product of the named base columns in -1/+1 coding.
GENERATORS = {
    5: {"E": "ABCD"},
    6: {"E": "ABC", "F": "BCD"},
    7: {"E": "ABC", "F": "BCD", "G": "ACD"},
    8: {"E": "BCD", "F": "ACD", "G": "ABC", "H": "ABD"},
}


@dataclass
class Design:
    kind: str  # one of KINDS but auto
    name: str
    cells: list[tuple[int, ...]]  # one 0/1 level per factor (0 = A's value, 1 = B's)
    note: str
    generators: dict[str, str] = field(default_factory=dict)  # fractional: "E" -> "ABCD"
    defining_relation: list[str] = field(default_factory=list)  # words equal to I, e.g. "ABCDE"
    resolution: int | None = None  # shortest word; None for full factorials and non-regular
    aliases: list[list[str]] = field(
        default_factory=list
    )  # alias chains of 2FIs, e.g. ["AB", "CE"]


def letters(k: int) -> str:
    """The factor letters A, B, ... used in generators and alias statements."""
    return string.ascii_uppercase[:k]


def word_product(a: str, b: str) -> str:
    """Product of two effect words: letters that appear twice cancel (A*A = I)."""
    return "".join(sorted(set(a) ^ set(b)))


def defining_relation(generators: dict[str, str]) -> list[str]:
    """All words of the defining relation I = ... spanned by the generators `E = ABC` (I = ABCE)."""
    base = [word_product(new, word) for new, word in generators.items()]
    words = set()
    for r in range(1, len(base) + 1):
        for combo in itertools.combinations(base, r):
            product = ""
            for w in combo:
                product = word_product(product, w)
            words.add(product)
    return sorted(words, key=lambda w: (len(w), w))


def alias_chains(k: int, relation: list[str]) -> list[list[str]]:
    """Two-factor interactions that share a column: chains of length > 1, e.g. [["AB", "CE"]]."""
    pairs = ["".join(p) for p in itertools.combinations(letters(k), 2)]
    chains, seen = [], set()
    for pair in pairs:
        if pair in seen:
            continue
        chain = [pair] + [w for w in (word_product(pair, word) for word in relation) if len(w) == 2]
        chain = sorted(set(chain))
        seen.update(chain)
        if len(chain) > 1:
            chains.append(chain)
    return chains


def fractional(k: int) -> Design:
    """Regular 2^(k-p) fraction from GENERATORS, with runs A and B added when not in it."""
    if k not in GENERATORS:
        raise ValueError(f"fractional designs are tabled for 5 to 8 changes, not {k}")
    generators = GENERATORS[k]
    n_base = k - len(generators)
    names = letters(k)
    cells = []
    for base in itertools.product((-1, 1), repeat=n_base):
        column = dict(zip(names[:n_base], base, strict=True))
        for new, word in generators.items():
            column[new] = int(np.prod([column[c] for c in word]))
        cells.append(tuple(int(column[c] > 0) for c in names))
    relation = defining_relation(generators)
    resolution = min(len(w) for w in relation)
    added = [c for c in ((0,) * k, (1,) * k) if c not in cells]
    cells = sorted(set(cells) | set(added))
    gens = ", ".join(f"{new}={word}" for new, word in generators.items())
    clear = "main effects and two-factor interactions" if resolution >= 5 else "main effects"
    note = (
        f"resolution {roman(resolution)} ({gens}; I = {' = '.join(relation)}): {clear} clear of "
        "each other" + ("" if resolution >= 5 else "; two-factor interactions aliased in chains")
    )
    if added:
        note += f"; run {' and '.join('A' if sum(c) == 0 else 'B' for c in added)} added"
    return Design(
        "fractional",
        f"fractional factorial 2^({k}-{len(generators)}) {roman(resolution)}, {len(cells)} cells",
        cells,
        note,
        dict(generators),
        relation,
        resolution,
        alias_chains(k, relation),
    )


def roman(n: int) -> str:
    return {3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}.get(n, str(n))


def oat(k: int) -> Design:
    """The one-at-a-time design from both ends: A, B, A plus each change, B minus each change."""
    cells = {(0,) * k, (1,) * k}
    for j in range(k):
        cells.add(tuple(int(i == j) for i in range(k)))
        cells.add(tuple(int(i != j) for i in range(k)))
    note = "one-at-a-time from both ends: main effects only (unbiased by OLS), interactions not estimable"
    return Design("oat", f"one-at-a-time ({len(cells)} cells)", sorted(cells), note)


def make_design(k: int, kind: str = "auto") -> Design:
    """The cells to train for `k` changes; `path` returns only A and B (drive it with path_next)."""
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"--design must be one of {', '.join(KINDS)}, got {kind!r}")
    if k < 1:
        raise ValueError("nothing changed between A and B: no design")
    if kind == "auto":
        if k > 8:
            raise ValueError(
                f"{k} changes is too many to blame at once (at most 8): narrow the change set, "
                "e.g. blame between intermediate runs, or choose --design path or oat"
            )
        kind = "full" if k <= 4 else "fractional"
    if kind == "full":
        cells = list(itertools.product((0, 1), repeat=k))
        return Design("full", f"full factorial 2^{k}", cells, "no aliasing; contains A and B")
    if kind == "fractional":
        return fractional(k)
    if kind == "oat":
        return oat(k)
    note = (
        f"ablation path: adaptive, {k * (k + 1) // 2} configurations beyond A; drive with path_next"
    )
    cells = [(0,) * k, (1,) * k]
    return Design("path", f"ablation path ({k * (k + 1) // 2 + 1} cells)", cells, note)


def cell_means(
    results: pd.DataFrame, factors: list[str], metric: str, how: str = "mean"
) -> dict[tuple, float]:
    """Mean (or another groupby reduction) of the metric per cell; all runs failed gives NaN."""
    grouped = results.groupby(factors)[metric].agg(how)
    return {
        tuple(int(v) for v in (key if isinstance(key, tuple) else (key,))): float(m)
        for key, m in grouped.items()
    }


def path_steps(
    results: pd.DataFrame, factors: list[str], metric: str, lower_is_better: bool = False
):
    """Walk the ablation path through the finished cells: (chosen path, cells still missing).

    The path starts at A; each step flips the remaining change that moves the metric most in
    the direction from A to B (most harm first when B is worse or ties). Returns ([(factor index, cell),
    ...], missing cells); missing is empty once the path is complete.
    """
    k = len(factors)
    a, b = (0,) * k, (1,) * k
    means = cell_means(results, factors, metric) if len(results) else {}
    if a not in means or b not in means:
        return [], [c for c in (a, b) if c not in means]
    gap = means[b] - means[a]
    harm = 1.0 if lower_is_better else -1.0  # the sign of a change for the worse
    toward = np.sign(gap) if np.isfinite(gap) and gap != 0 else harm
    current, path = a, []
    while current != b:
        flips = [j for j in range(k) if current[j] == 0]
        candidates = {j: current[:j] + (1,) + current[j + 1 :] for j in flips}
        missing = [c for c in candidates.values() if c not in means]
        if missing:
            return path, missing
        scored = {j: toward * (means[c] - means[current]) for j, c in candidates.items()}
        scored = {j: s for j, s in scored.items() if np.isfinite(s)}
        if not scored:  # every candidate failed: flip the first so the path can go on
            scored = {flips[0]: 0.0}
        j = max(scored, key=lambda i: (scored[i], -i))
        current = candidates[j]
        path.append((j, current))
    return path, []


def path_next(
    results: pd.DataFrame, factors: list[str], metric: str, lower_is_better: bool = False
) -> list[tuple[int, ...]]:
    """Cells the ablation path needs next given the runs so far ([] when complete).

    `results`: one row per finished or failed run, 0/1 factor columns and the metric (NaN =
    failed). The first call (empty table) asks for A and B; each later call asks for the
    candidates of the next step. Run every returned cell with all seeds, then call again.
    lower_is_better (analysis.lower_is_better(metric)) only breaks a tie between A and B.
    """
    if not len(results):
        return [(0,) * len(factors), (1,) * len(factors)]
    return path_steps(results, factors, metric, lower_is_better)[1]


def seed_rounds(budget: int, cells: int, first: int = 2, per_round: int = 1) -> int:
    """How many looks `--seeds auto` can take: `first` seeds per cell, then `per_round` more per
    round, at most `budget` trainings in all (pass the result to seeds_decision as max_rounds)."""
    if budget < first * cells:
        raise ValueError(f"a budget of {budget} trainings cannot give {cells} cells {first} seeds")
    return 1 + (budget - first * cells) // (per_round * cells)

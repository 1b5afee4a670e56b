"""Which cells to train for `segexp blame`: two-level designs between run A (all 0) and run B (all 1).

A cell is a tuple of 0/1 levels, one per changed key (0 = A's value, 1 = B's). Full factorials for
few changes, regular fractional factorials of resolution IV or higher for 5 to 8, the adaptive
ablation path (Fawcett & Hoos 2016) and v1's one-at-a-time design on request. Also what to
train next: the path's next cells, when to stop adding seeds (`seeds_decision`), and the
finished path's own analysis.
"""

from __future__ import annotations

import itertools
import math
import string
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from segexp.analysis import SIGNIFICANT, Analysis, analyze, lower_is_better, t_tests, verdicts

KINDS = ("auto", "full", "fractional", "path", "oat")

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
    """v1's one-at-a-time design from both ends: A, B, A plus each change, B minus each change."""
    cells = {(0,) * k, (1,) * k}
    for j in range(k):
        cells.add(tuple(int(i == j) for i in range(k)))
        cells.add(tuple(int(i != j) for i in range(k)))
    note = "one-at-a-time from both ends: main effects only (unbiased by OLS), interactions not estimable"
    return Design(f"one-at-a-time ({len(cells)} cells)", sorted(cells), note)


def make_design(k: int, kind: str = "auto") -> Design:
    """The cells to train for `k` changes; `path` returns only A and B (drive it with path_next)."""
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
        return Design(f"full factorial 2^{k}", cells, "no aliasing; contains A and B")
    if kind == "fractional":
        return fractional(k)
    if kind == "oat":
        return oat(k)
    note = (
        f"ablation path: adaptive, {k * (k + 1) // 2} configurations beyond A; drive with path_next"
    )
    return Design(f"ablation path ({k * (k + 1) // 2 + 1} cells)", [(0,) * k, (1,) * k], note)


def cell_means(
    results: pd.DataFrame, factors: list[str], metric: str, how: str = "mean"
) -> dict[tuple, float]:
    """Mean (or another groupby reduction) of the metric per cell; all runs failed gives NaN."""
    grouped = results.groupby(factors)[metric].agg(how)
    return {
        tuple(int(v) for v in (key if isinstance(key, tuple) else (key,))): float(m)
        for key, m in grouped.items()
    }


def path_steps(results: pd.DataFrame, factors: list[str], metric: str):
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
    harm = 1.0 if lower_is_better(metric) else -1.0  # the sign of a change for the worse
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


def path_next(results: pd.DataFrame, factors: list[str], metric: str) -> list[tuple[int, ...]]:
    """Cells the ablation path needs next given the runs so far ([] when complete).

    `results`: one row per finished or failed run, 0/1 factor columns and the metric (NaN =
    failed). The first call (empty table) asks for A and B; each later call asks for the
    candidates of the next step. Run every returned cell with all seeds, then call again.
    """
    if not len(results):
        return [(0,) * len(factors), (1,) * len(factors)]
    return path_steps(results, factors, metric)[1]


def path_analysis(results: pd.DataFrame, factors: list[str], metric: str, alpha: float = 0.05):
    """A finished ablation path as an Analysis: one row per step in path order.

    A step's effect is the mean over seeds of its cell minus that of the previous cell, with a t
    CI from the seed variance pooled over all path cells; Holm over the steps. The order is
    chosen on the same data, so the first steps' effects lean towards B (winner's curse).
    """
    steps, missing = path_steps(results, factors, metric)
    if missing:
        raise ValueError(f"the ablation path is not finished: still needs cells {missing}")
    observed = results[results[metric].notna()]
    cells = observed.groupby(factors)[metric]
    dof = int(len(observed) - cells.ngroups)
    s2 = float(((observed[metric] - cells.transform("mean")) ** 2).sum() / dof) if dof else np.nan
    means, counts = (
        cell_means(results, factors, metric),
        cell_means(observed, factors, metric, "size"),
    )
    previous, rows = (0,) * len(factors), []
    for step, (j, cell) in enumerate(steps, start=1):
        effect = means[cell] - means[previous]
        se = (
            math.sqrt(s2 * (1 / counts[cell] + 1 / counts[previous]))
            if np.isfinite(effect)
            else np.nan
        )
        rows.append({"term": factors[j], "kind": "step", "step": step, "effect": effect, "se": se})
        previous = cell
    table = pd.DataFrame(rows)
    fitted = table.effect.notna().to_numpy()
    scale = float(np.abs(observed[metric]).max())
    out = t_tests(
        table.effect[fitted].to_numpy()[:, None],
        table.se[fitted].to_numpy()[:, None],
        dof,
        alpha,
        scale,
    )
    for key in ("effect", "se", "ci_low", "ci_high", "p", "p_holm"):
        table.loc[fitted, key] = out[key][:, 0]
    table["verdict"] = np.where(fitted, "no replicates", "inestimable")
    if dof > 0:
        table.loc[fitted, "verdict"] = verdicts(out["effect"], out["p_holm"], metric, alpha)[:, 0]
    table["aliased_with"] = ""
    failed = results[results[metric].isna()]
    seed_sd = math.sqrt(s2) if dof > 0 else float("nan")
    return Analysis(table, metric, list(factors), seed_sd, dof, len(observed), failed, alpha)


def seed_rounds(budget: int, cells: int, first: int = 2, per_round: int = 1) -> int:
    """How many looks `--seeds auto` can take: `first` seeds per cell, then `per_round` more per
    round, at most `budget` trainings in all (pass the result to seeds_decision as max_rounds)."""
    if budget < first * cells:
        raise ValueError(f"a budget of {budget} trainings cannot give {cells} cells {first} seeds")
    return 1 + (budget - first * cells) // (per_round * cells)


def seeds_decision(
    results: pd.DataFrame,
    factors: list[str],
    metric: str,
    max_rounds: int,
    margin: float | None = None,
    alpha: float = 0.05,
) -> dict:
    """`--seeds auto`: after a round of seeds, which terms are settled and whether to stop.

    Each look (round) tests at alpha / max_rounds (Bonferroni over looks), so however the stopping
    falls out the chance of any false hurt/helped verdict over all looks stays <= alpha; report
    the final analysis at that same level (returned). A term is settled when its verdict is
    hurt/helped, or when its (1 - alpha/max_rounds) CI lies inside +-margin (practically zero;
    margin defaults to 0.5 x the current seed SD, itself an estimate), or when it is inestimable
    or aliased (more seeds cannot help). Returns {stop, settled: {term: reason}, open: [terms],
    alpha, analysis}.
    """
    level = alpha / max_rounds
    result = analyze(results, factors, metric, alpha=level)
    margin = 0.5 * result.seed_sd if margin is None else margin
    settled, still_open = {}, []
    for row in result.effects.itertuples():
        if row.verdict in SIGNIFICANT or row.verdict in ("inestimable", "aliased"):
            settled[row.term] = row.verdict
        elif row.verdict == "within noise" and -margin < row.ci_low and row.ci_high < margin:
            settled[row.term] = f"within +-{margin:.3g}"
        else:
            still_open.append(row.term)
    return {
        "stop": not still_open,
        "settled": settled,
        "open": still_open,
        "alpha": level,
        "analysis": result,
    }

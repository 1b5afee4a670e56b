"""`segexp blame --from-table`: a runs table checked, never silently changed, then analysed.

Every column is accounted for: a factor coded other than 0/1 (-1/+1, 1/2) is recoded with a note,
columns that are no factor are named in a note, and what cannot be analysed (a duplicate column,
text in the metric or a factor, one row, no residual dof) is one error line naming the row and
column. CSV cells written back start with no formula character (spreadsheet formula injection).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .analysis import Analysis, analyze
from .report import write_report

# columns of runs.csv that are not factors; `replicate`, where present, is the block (folds)
KEYS = ("seed", "replicate", "fold", "run_id")


def read_table(path: Path) -> pd.DataFrame:
    """The CSV as text cells, refusing duplicate column names (pandas would rename them)."""
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise ValueError(f"{path}: no header row")
    twice = [name for name, count in Counter(header).items() if count > 1]
    if twice:
        where = {n: [i + 1 for i, h in enumerate(header) if h == n] for n in twice}
        named = "; ".join(f"{n!r} (columns {', '.join(map(str, c))})" for n, c in where.items())
        raise ValueError(f"{path}: duplicate column names: {named}")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def row_name(table: pd.DataFrame, i, source: str) -> str:
    """ "runs.csv line 8" for a CSV (header = line 1), "row 6" for a DataFrame."""
    position = table.index.get_loc(i)
    return f"{source} line {position + 2}" if source else f"row {i}"


def numbers(table: pd.DataFrame, column: str, source: str, empty_ok: bool) -> pd.Series:
    """A column as floats; a cell that is no number is an error naming its row and column."""
    raw = table[column]
    text = raw.astype(str).fillna("").str.strip()
    values = pd.to_numeric(text.where(text != "", None), errors="coerce")
    bad = values.isna() & (text != "") & ~text.str.lower().isin(["nan", "none", "null"])
    if not empty_ok:
        bad |= values.isna()
    if bad.any():
        i = bad.idxmax()
        cell = raw.loc[i]
        raise ValueError(
            f"{row_name(table, i, source)}: column {column!r} holds {cell!r}, not a number"
        )
    return values


def failed_notes(table: pd.DataFrame, values: pd.Series, metric: str, source: str) -> list[str]:
    """Runs whose metric is empty, NaN or infinite: named, analysed as failed runs."""
    notes = []
    for what, mask in (
        ("no number (empty or NaN)", values.isna()),
        ("infinite", values.notna() & ~np.isfinite(values.to_numpy(float))),
    ):
        if mask.any():
            rows = ", ".join(row_name(table, i, source) for i in table.index[mask][:5])
            more = f" and {int(mask.sum()) - 5} more" if mask.sum() > 5 else ""
            notes.append(f"{metric} is {what} in {rows}{more}: analysed as failed runs")
    return notes


def factor_codes(table, metric: str, factors, source: str) -> tuple[list[str], list[str]]:
    """In place: factor columns recoded to 0/1; returns (factors, notes on every other column)."""
    notes, found, skipped = [], [], []
    named = factors is not None
    for column in factors if named else [c for c in table.columns if c not in (metric, *KEYS)]:
        if column not in table:
            raise ValueError(f"{source or 'table'}: no factor column {column!r}")
        values = pd.to_numeric(table[column].astype(str).fillna("").str.strip(), errors="coerce")
        levels = sorted(values.dropna().unique())
        if values.isna().any():
            i = values.isna().idxmax()
            if named or len(levels) == 2:  # a factor with a cell that is no level
                raise ValueError(
                    f"{row_name(table, i, source)}: factor column {column!r} holds "
                    f"{table[column].loc[i]!r}, not a level (0 = A's, 1 = B's)"
                )
            skipped.append(f"{column} (text)")
            continue
        if len(levels) != 2:
            if named:
                shown = ", ".join(f"{v:g}" for v in levels[:5])
                raise ValueError(f"factor column {column!r} has values {shown}: it needs two")
            skipped.append(f"{column} ({len(levels)} value{'s' if len(levels) > 1 else ''})")
            continue
        if levels != [0, 1]:
            notes.append(
                f"factor {column} coded {levels[0]:g}/{levels[1]:g}: {levels[0]:g} read as A's "
                f"level (0), {levels[1]:g} as B's (1)"
            )
        table[column] = (values == levels[1]).astype(int)
        found.append(column)
    if skipped:
        notes.append(f"columns that are not factors (two levels needed): {', '.join(skipped)}")
    if not found:
        raise ValueError(
            f"{source or 'table'}: no factor column (two levels, 0 = A's and 1 = B's) besides "
            f"{metric}{': ' + ', '.join(skipped) if skipped else ''}"
        )
    return found, notes


def checked(path_or_df, metric: str, factors: list[str] | None = None):
    """(table, factors, notes): the runs table parsed and checked for --from-table."""
    source = "" if isinstance(path_or_df, pd.DataFrame) else str(path_or_df)
    if isinstance(path_or_df, pd.DataFrame):
        table = path_or_df.copy()
        twice = table.columns[table.columns.duplicated()].unique().tolist()
        if twice:
            raise ValueError(f"duplicate column names: {', '.join(map(repr, twice))}")
    else:
        table = read_table(Path(path_or_df))
    if metric not in table:
        raise ValueError(f"no column {metric!r}; columns: {', '.join(map(str, table.columns))}")
    if len(table) < 2:
        raise ValueError(
            f"{source or 'table'}: {len(table)} row{'s' if len(table) != 1 else ''}: "
            "a verdict needs runs of two cells, two of one cell at least"
        )
    values = numbers(table, metric, source, empty_ok=True)
    notes = failed_notes(table, values, metric, source)
    table[metric] = values.where(np.isfinite(values.to_numpy(float)))
    block = "replicate" if "replicate" in table else "seed"
    if block in table:
        table["seed"] = numbers(table, block, source, empty_ok=False)
    factors, coding = factor_codes(table, metric, factors, source)
    return table, factors, coding + notes


def from_table(
    path_or_df, metric: str, out_dir: Path, factors: list[str] | None = None
) -> Analysis:
    """Re-analyse a runs table without training: writes effects.csv, report.md, effects.png.

    Raises ValueError, one line naming the row and column, for what cannot be analysed.
    """
    table, factors, notes = checked(path_or_df, metric, factors)
    result = analyze(table, factors, metric)
    result.notes = notes + result.notes
    verdicts = set(result.effects.verdict) - {"inestimable", "aliased", "no replicates"}
    if result.dof <= 0 or not verdicts:
        cells = table.loc[table[metric].notna(), factors].drop_duplicates()
        source = "" if isinstance(path_or_df, pd.DataFrame) else f"{path_or_df}: "
        raise ValueError(
            f"{source}{result.runs} runs with a value in {len(cells)} cells leave no residual "
            "degrees of freedom: no verdict is possible; add seeds (two runs of a cell)"
        )
    write_report(result, out_dir, title=f"blame re-analysis of {metric}")
    return result

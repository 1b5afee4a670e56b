"""From a dataset root on disk to a validated list of cases: layouts, input checks, splits.

HC18 (official layout) and LGG (Kaggle `kaggle_3m` layout) are scanned into `Case` records.
Every problem found is collected and raised once as a `DataError` that names each offending file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

HC18_NAME = re.compile(r"^(?P<exam>\d+)_(?P<repeat>\d*)HC$")
MAX_LISTED_ERRORS = 25


class DataError(ValueError):
    """Bad input data; the message lists every offending file (capped) with its reason."""

    def __init__(self, root: Path | str, problems: list[tuple[str, str]]):
        self.root, self.problems = str(root), problems
        lines = [f"  {path}: {reason}" for path, reason in problems[:MAX_LISTED_ERRORS]]
        if len(problems) > MAX_LISTED_ERRORS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_ERRORS} more")
        super().__init__(f"{len(problems)} problem(s) in dataset at {root}:\n" + "\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Case:
    """One image (and its annotation, when there is one) with what is known about it."""

    case_id: str  # file stem: `010_2HC`, `TCGA_CS_4941_19960909_12`
    group: str  # exam id (HC18) or patient id (LGG): splits never cut a group
    image: str
    mask: str | None = None
    slice_index: int = 0  # LGG slice number n of `<patient>_<n>.tif`
    pixel_size_mm: float | None = None
    hc_mm: float | None = None


PIXEL_SIZE, HC = "pixel size(mm)", "head circumference (mm)"  # HC18's CSV columns


def read_pixel_csv(csv_path: Path, root: Path | str, columns: list[str]) -> pd.DataFrame:
    """An HC18-style CSV (`filename`, `pixel size(mm)`, ...), column names stripped.

    Raises DataError (at `root`) naming the CSV when it is missing, unreadable, lacks one of
    `filename` and `columns`, or lists a file on more than one row.
    """
    if not Path(csv_path).is_file():
        raise DataError(root, [(str(csv_path), "missing CSV")])
    try:
        table = pd.read_csv(csv_path)
    except Exception as err:  # pandas raises several types for broken CSVs
        raise DataError(root, [(str(csv_path), f"unreadable CSV: {err}")]) from err
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ["filename", *columns] if c not in table.columns]
    if missing:
        raise DataError(root, [(str(csv_path), f"missing column(s) {missing}")])
    names = table["filename"].astype(str).str.strip()
    repeated = sorted(set(names[names.duplicated()]))
    if repeated:  # rows looked up by filename would keep the last one without a word
        lines = {
            name: ", ".join(str(i + 2) for i in names.index[names == name]) for name in repeated
        }
        raise DataError(  # line 1 is the header
            root,
            [
                (str(csv_path), f"{n} is listed on more than one row (lines {at})")
                for n, at in lines.items()
            ],
        )
    return table


def scan_hc18(root: Path, subset: str = "training") -> list[Case]:
    """Cases of an HC18 root in the official layout; `subset` is `training` or `test`."""
    root = Path(root)
    folder = root / f"{subset}_set"
    csv_path = root / (
        "training_set_pixel_size_and_HC.csv" if subset == "training" else "test_set_pixel_size.csv"
    )
    problems: list[tuple[str, str]] = []
    if not folder.is_dir():
        raise DataError(root, [(str(folder), "missing folder (is dataset.root the HC18 root?)")])
    table = read_pixel_csv(
        csv_path, root, [PIXEL_SIZE, HC] if subset == "training" else [PIXEL_SIZE]
    )
    rows = {str(r["filename"]).strip(): r for _, r in table.iterrows()}

    images = sorted(p for p in folder.glob("*.png") if not p.stem.endswith("_Annotation"))
    on_disk = {p.name for p in images}
    cases = []
    for path in images:
        match = HC18_NAME.match(path.stem)
        if not match:
            problems.append((str(path), "file name is not NNN_HC.png or NNN_<k>HC.png"))
            continue
        annotation = path.with_name(f"{path.stem}_Annotation.png")
        if subset == "training" and not annotation.is_file():
            problems.append((str(path), f"missing annotation {annotation.name}"))
            continue
        row = rows.get(path.name)
        if row is None:
            problems.append((str(path), f"no row in {csv_path.name}"))
            continue
        pixel_mm = positive_cell(row, PIXEL_SIZE, csv_path, path.name, problems)
        hc_mm = None
        if subset == "training":
            hc_mm = positive_cell(row, HC, csv_path, path.name, problems)
        if pixel_mm is None or (subset == "training" and hc_mm is None):
            continue
        cases.append(
            Case(
                case_id=path.stem,
                group=match["exam"],
                image=str(path),
                mask=str(annotation) if subset == "training" else None,
                pixel_size_mm=pixel_mm,
                hc_mm=hc_mm,
            )
        )
    for name in sorted(set(rows) - on_disk):
        problems.append((str(folder / name), f"listed in {csv_path.name} but no such image"))
    for path in sorted(folder.glob("*_Annotation.png")):
        if not path.with_name(path.name.replace("_Annotation", "")).is_file():
            problems.append((str(path), "annotation without image"))
    if not cases and not problems:
        problems.append((str(folder), "no images found"))
    if problems:
        raise DataError(root, problems)
    return cases


def positive_cell(row, column: str, csv_path, image: str, problems: list) -> float | None:
    """The row's `column` as a positive float, or None with a problem naming the CSV and image."""
    try:
        value = float(row[column])
    except (TypeError, ValueError):
        value = float("nan")
    if value > 0:  # NaN (`abc`, empty) fails this too
        return value
    problems.append((str(csv_path), f"{image}: {column} {row[column]!r} is not a positive number"))
    return None


def scan_listed(images_dir: Path, pixel_csv: Path) -> list[Case]:
    """One case per row of an HC18-style pixel-size CSV (`filename`, `pixel size(mm)`)."""
    table = read_pixel_csv(pixel_csv, pixel_csv, [PIXEL_SIZE])
    cases, problems = [], []
    for _, row in table.iterrows():
        path = Path(images_dir) / str(row["filename"]).strip()
        if not path.is_file():
            problems.append((str(path), f"listed in {Path(pixel_csv).name} but no such image"))
            continue
        pixel_mm = positive_cell(row, PIXEL_SIZE, pixel_csv, path.name, problems)
        if pixel_mm is not None:
            cases.append(Case(path.stem, path.stem, str(path), pixel_size_mm=pixel_mm))
    if problems:
        raise DataError(images_dir, problems)
    return cases


def lgg_root(root: Path) -> Path:
    """Accept the `kaggle_3m` folder itself or the download folder that contains it."""
    root = Path(root)
    return root / "kaggle_3m" if (root / "kaggle_3m").is_dir() else root


def scan_lgg(root: Path, subset: str = "training") -> list[Case]:
    """Cases of an LGG root in the `kaggle_3m` layout (one folder per patient)."""
    del subset  # kaggle_3m has no separate test set: the split makes validation patients
    root = lgg_root(root)
    if not root.is_dir():
        raise DataError(
            root, [(str(root), "missing folder (is dataset.root the kaggle_3m folder?)")]
        )
    problems: list[tuple[str, str]] = []
    cases = []
    slice_name = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)$")
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        patient = folder.name
        for path in sorted(folder.glob("*.tif")):
            stem = path.stem
            if stem.endswith("_mask"):
                if not path.with_name(stem[: -len("_mask")] + ".tif").is_file():
                    problems.append((str(path), "mask without image"))
                continue
            match = slice_name.match(stem)
            if not match or match["patient"] != patient:
                problems.append((str(path), f"file name is not {patient}_<n>.tif"))
                continue
            mask = path.with_name(f"{stem}_mask.tif")
            if not mask.is_file():
                problems.append((str(path), f"missing mask {mask.name}"))
                continue
            cases.append(Case(stem, patient, str(path), str(mask), slice_index=int(match["n"])))
    if not cases and not problems:
        problems.append((str(root), "no patient folders with <patient>_<n>.tif slices found"))
    if problems:
        raise DataError(root, problems)
    # numeric slice order within each patient (`_10` after `_9`)
    return sorted(cases, key=lambda c: (c.group, c.slice_index))


SCANNERS = {"hc18": scan_hc18, "lgg": scan_lgg}


def split_groups(
    cases: Iterable[Case], val_fraction: float | None, val_count: int | None, seed: int
) -> set[str]:
    """Seeded choice of validation groups; independent of the order files were listed in."""
    groups = sorted({c.group for c in cases})
    if val_count is None:
        if val_fraction is None or not 0 <= val_fraction < 1:
            raise ValueError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
        val_count = int(round(val_fraction * len(groups)))
    if not 0 <= val_count < len(groups):
        raise ValueError(f"dataset.val_count must be in [0, {len(groups)}), got {val_count}")
    order = np.random.default_rng(seed).permutation(len(groups))
    return {groups[i] for i in order[:val_count]}


def fingerprint(cases: Iterable[Case], extra: dict | None = None) -> str:
    """Hash of every file's name, size and mtime (plus `extra` settings): changes when data does.

    A file is named by its folder and name (`training_set/000_HC.png`), so the same dataset
    reached by a relative or an absolute root is the same data.
    """
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True).encode())
    for case in cases:
        for path in (case.image, case.mask):
            if path is not None:
                path = Path(path)
                st = path.stat()
                name = f"{path.parent.name}/{path.name}"
                h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
